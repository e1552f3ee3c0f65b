package bench

import (
	"bytes"
	"math"
	"testing"
	"time"
)

func TestHistogramPercentiles(t *testing.T) {
	var h histogram
	// 1..1000 microseconds, one sample each.
	for us := 1; us <= 1000; us++ {
		h.add(time.Duration(us) * time.Microsecond)
	}
	for _, c := range []struct{ p, want float64 }{
		{0.5, 500}, {0.99, 990}, {0.999, 999}, {0.01, 10},
	} {
		got := h.percentile(c.p)
		if math.Abs(got-c.want)/c.want > 0.07 {
			t.Errorf("p%v = %.1f us, want %.1f within 7%%", c.p*100, got, c.want)
		}
	}
	var empty histogram
	if !math.IsNaN(empty.percentile(0.5)) {
		t.Error("percentile of an empty histogram is a number")
	}
}

func TestHistogramBucketsMonotonic(t *testing.T) {
	prev := -1
	for ns := int64(0); ns < 1<<30; ns = ns*5/4 + 1 {
		b := bucketOf(ns)
		if b < prev {
			t.Fatalf("bucketOf(%d) = %d after %d", ns, b, prev)
		}
		if v := bucketValue(b); ns >= histSub && math.Abs(v-float64(ns))/float64(ns) > 0.07 {
			t.Fatalf("bucket %d of %d ns has value %.0f", b, ns, v)
		}
		prev = b
	}
}

func TestMedian(t *testing.T) {
	if m := median([]float64{3, 1, 2}); m != 2 {
		t.Errorf("median = %v", m)
	}
	if m := median([]float64{4, 1, 2, 3}); m != 2.5 {
		t.Errorf("median = %v", m)
	}
	if !math.IsNaN(median(nil)) {
		t.Error("median of nothing is a number")
	}
}

func TestPatternCheck(t *testing.T) {
	stream := func(n int) []byte {
		b := make([]byte, n)
		for off := 0; off < n; off += bulkWrite {
			fillPattern(b[off:min(off+bulkWrite, n)], int64(off))
		}
		return b
	}
	good := stream(3 * bulkWrite)
	// Reads of odd sizes split block indexes across reads.
	if n, ok := checkPattern(&oddReader{r: bytes.NewReader(good)}); !ok || n != int64(len(good)) {
		t.Errorf("intact stream: n=%d ok=%v", n, ok)
	}
	lost := append(append([]byte{}, good[:blockSize]...), good[2*blockSize:]...)
	if _, ok := checkPattern(bytes.NewReader(lost)); ok {
		t.Error("a lost block went unnoticed")
	}
	swapped := append([]byte{}, good...)
	copy(swapped[blockSize:2*blockSize], good[2*blockSize:3*blockSize])
	copy(swapped[2*blockSize:3*blockSize], good[blockSize:2*blockSize])
	if _, ok := checkPattern(bytes.NewReader(swapped)); ok {
		t.Error("reordered blocks went unnoticed")
	}
	if _, ok := checkPattern(bytes.NewReader(good[:len(good)-1])); ok {
		t.Error("a truncated stream went unnoticed")
	}
}

type oddReader struct {
	r *bytes.Reader
	i int
}

func (o *oddReader) Read(p []byte) (int, error) {
	o.i++
	return o.r.Read(p[:min(len(p), 1+o.i*7%5000)])
}
