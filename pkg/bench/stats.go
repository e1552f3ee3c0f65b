package bench

import (
	"math"
	"math/bits"
	"slices"
	"time"
)

// histogram counts round trips in log-linear buckets: 16 sub-buckets per
// power of two of nanoseconds, so any percentile is exact to within about
// 6%, with a fixed size however many samples go in.
type histogram struct {
	counts [histBuckets]int64
}

const (
	histSub     = 16
	histBuckets = 40 * histSub // up to 2^40 ns, about 18 minutes
)

func bucketOf(ns int64) int {
	if ns < histSub {
		return int(max(ns, 0))
	}
	exp := 63 - bits.LeadingZeros64(uint64(ns)) // position of the top bit, >= 4
	sub := int(ns>>(exp-4)) - histSub           // the next 4 bits
	return min((exp-3)*histSub+sub, histBuckets-1)
}

// bucketValue is the middle of a bucket, in nanoseconds.
func bucketValue(b int) float64 {
	if b < histSub {
		return float64(b)
	}
	exp := b/histSub + 3
	sub := b % histSub
	lo := float64(int64(histSub+sub) << (exp - 4))
	return lo + math.Ldexp(1, exp-4)/2
}

func (h *histogram) add(d time.Duration) { h.counts[bucketOf(int64(d))]++ }

func (h *histogram) merge(counts []int64) {
	for i := range min(len(counts), len(h.counts)) {
		h.counts[i] += counts[i]
	}
}

// percentile returns the value below which fraction p (0..1) of the
// samples fall, in microseconds; NaN without samples.
func (h *histogram) percentile(p float64) float64 {
	var total int64
	for _, c := range h.counts {
		total += c
	}
	if total == 0 {
		return math.NaN()
	}
	rank := int64(math.Ceil(p * float64(total)))
	var seen int64
	for b, c := range h.counts {
		seen += c
		if seen >= max(rank, 1) {
			return bucketValue(b) / 1e3
		}
	}
	return bucketValue(histBuckets-1) / 1e3
}

// median of the values, NaN when there are none.
func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
