package e2e

import (
	"fmt"
	"strings"
	"testing"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// spliceQueueLimit is [datapath] splice_queue_limit's default.
const spliceQueueLimit = 2 << 20

// connMemLimit is what one spliced connection may hold in the kernel at
// most (issue: a few MiB; TCP alone holds up to its tcp_rmem and tcp_wmem
// maxima).
const connMemLimit = 8 << 20

// memoryOf parses the "memory ..." line of a slow scenario.
func memoryOf(t *testing.T, out string) slowMemory {
	t.Helper()
	var m slowMemory
	for _, line := range strings.Split(out, "\n") {
		if _, err := fmt.Sscanf(line, "memory max_rmem=%d max_wqueued=%d max_over_rcvbuf=%d", &m.rmem, &m.wqueued, &m.overRcvbuf); err == nil {
			return m
		}
	}
	t.Fatalf("no memory line in %q", out)
	return m
}

// TestBoundedSplice: a writer much faster than its reader, spliced. The
// direction is demoted to TCP once the reader's queue passes
// splice_queue_limit: every byte arrives in order, the connection's kernel
// memory stays bounded, and the writer never sees ENOMEM; with readers that
// wait inside the kernel too (MSG_WAITALL, SO_RCVLOWAT), and with one that
// stalls for 10 s.
func TestBoundedSplice(t *testing.T) {
	requireBoundedSplice(t)
	n, addr := sameNode(t, "splice")
	const size = 512 << 20
	for _, scenario := range []string{"slow", "slow-waitall", "slow-lowat", "stalled"} {
		t.Run(scenario, func(t *testing.T) {
			before := n.stats()
			out := n.client(n.enrolled, scenario, addr, fmt.Sprint(size))
			m := memoryOf(t, out)
			after := n.stats()
			t.Logf("reader held at most %d KiB (%d KiB beyond its receive buffer), writer queued at most %d KiB; spliced %d MiB, then %d MiB by TCP",
				m.rmem>>10, m.overRcvbuf>>10, m.wqueued>>10, (after.bytes-before.bytes)>>20, (after.demotedBytes-before.demotedBytes)>>20)
			// Beyond what TCP's own flow control lets the reader's socket
			// hold (its receive buffer), the mesh adds its queue at most.
			if m.overRcvbuf > spliceQueueLimit+256<<10 {
				t.Errorf("the reader's socket held %d KiB beyond its receive buffer, want at most splice_queue_limit (%d KiB)",
					m.overRcvbuf>>10, spliceQueueLimit>>10)
			}
			// A reader that keeps reading keeps TCP's receive buffer small:
			// the connection stays within a few MiB. (One that stalls lets
			// TCP grow it, as without the mesh.)
			if scenario != "stalled" && m.rmem+m.wqueued > connMemLimit {
				t.Errorf("the connection held %d KiB in the kernel (reader %d, writer %d), want at most %d",
					(m.rmem+m.wqueued)>>10, m.rmem>>10, m.wqueued>>10, connMemLimit>>10)
			}
			if after.demotions == before.demotions {
				t.Errorf("no demotion: the writer never got ahead by splice_queue_limit?")
			}
			if moved := after.carried() - before.carried(); moved < size {
				t.Errorf("sk_msg saw %d bytes, want at least %d (the connection was not spliced)", moved, size)
			}
		})
	}
	t.Run("demotions in the metrics", func(t *testing.T) {
		_, m := n.admin("/metrics")
		if v := testenv.Metric(t, m, "smesh_splice_demotions_total", nil); v < 4 {
			t.Errorf("smesh_splice_demotions_total = %v, want the 4 demotions above at least", v)
		}
		// Into those readers most of each 512 MiB went by TCP.
		if v := testenv.Metric(t, m, "smesh_splice_demoted_bytes_total", map[string]string{"direction": "tx"}); v < 4*size/2 {
			t.Errorf("smesh_splice_demoted_bytes_total{direction=tx} = %v, want at least %d", v, 4*size/2)
		}
	})
	t.Run("request-response never demoted", func(t *testing.T) {
		before := n.stats()
		n.client(n.enrolled, "rr", addr, "20000")
		n.client(n.enrolled, "short", addr, "500")
		after := n.stats()
		if after.demotions != before.demotions {
			t.Errorf("%d demotions for traffic that never backs up", after.demotions-before.demotions)
		}
		if got := after.msgs - before.msgs; got < 2*20000 {
			t.Errorf("spliced %d messages, want the %d of the exchanges at least", got, 2*20000)
		}
	})
}
