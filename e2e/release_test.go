package e2e

import (
	"fmt"
	"testing"

	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// released reads how many sockets smeshd's sockops took out of the
// sockhash (release() in sockops.c).
func (n *node) released() uint64 {
	n.t.Helper()
	c, err := datapath.CountersOf(n.smeshd.PID())
	if err != nil {
		n.t.Fatalf("reading counters: %v", err)
	}
	return c.Released
}

// TestReleaseDemoted: once a spliced direction is demoted and the other
// direction never spliced, sockops takes the demoted sender out of the
// sockhash, and it goes on as a plain TCP socket. Every byte still arrives
// once and in order: readers slow, fast, waiting in the kernel (blocking
// recv(MSG_WAITALL), slow or as fast as they can, or interrupted by a
// signal every millisecond), and four threads writing one socket at once. A sender
// whose peer spliced to it first ("greeted") is released only once the peer's
// direction closes too (close_own in skmsg.c), here at the server's answer
// at the very end, so whether it is released before it closes is the
// kernel's timing; its bytes arrive as well. (pkg/datapath's
// TestReleaseKeepAlive releases both ends of such a connection.)
func TestReleaseDemoted(t *testing.T) {
	requireBoundedSplice(t)
	n, addr := sameNode(t, "splice")
	const size = 512 << 20
	for _, c := range []struct {
		scenario string
		release  bool // want a release (else: not checked)
	}{
		{"slow", true},
		{"fast", true},
		{"slow-waitall", true},
		{"fast-waitall", true},
		{"signalled", true},
		{"writers", true},
		{"greeted", false},
	} {
		t.Run(c.scenario, func(t *testing.T) {
			before, rel0 := n.stats(), n.released()
			n.client(n.enrolled, c.scenario, addr, fmt.Sprint(size))
			after, rel1 := n.stats(), n.released()
			t.Logf("spliced %d MiB, then %d MiB by TCP; %d demotions, %d sockets released",
				(after.bytes-before.bytes)>>20, (after.demotedBytes-before.demotedBytes)>>20,
				after.demotions-before.demotions, rel1-rel0)
			if after.demotions == before.demotions {
				t.Fatalf("no demotion: the writer never got ahead by splice_queue_limit?")
			}
			if c.release && rel1 == rel0 {
				t.Errorf("the demoted writer was not released from the sockhash")
			}
			// Released sockets count what they sent without sk_msg as
			// TCP acknowledges it: every byte once. Besides the bulk:
			// the request (7 bytes), the server's answer (32) and its
			// greeting (1).
			want := uint64(size + 7 + 32)
			if c.scenario == "greeted" {
				want++
			}
			if moved := after.carried() - before.carried(); moved != want {
				t.Errorf("counted %d bytes, moved %d", moved, want)
			}
		})
	}
	t.Run("released in the metrics", func(t *testing.T) {
		_, m := n.admin("/metrics")
		if v, want := testenv.Metric(t, m, "smesh_splice_released_total", nil), n.released(); v != float64(want) || want < 4 {
			t.Errorf("smesh_splice_released_total = %v, want %d (the counter), at least the 4 releases above", v, want)
		}
	})
}
