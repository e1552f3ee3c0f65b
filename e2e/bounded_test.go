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
func memoryOf(t *testing.T, out string) (rmem, wqueued int64) {
	t.Helper()
	for _, line := range strings.Split(out, "\n") {
		if _, err := fmt.Sscanf(line, "memory max_rmem=%d max_wqueued=%d", &rmem, &wqueued); err == nil {
			return rmem, wqueued
		}
	}
	t.Fatalf("no memory line in %q", out)
	return 0, 0
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
	// The same exchanges between processes outside the mesh: what TCP
	// alone holds.
	outside := testenv.NewCgroup(t)
	n.server(outside, "127.0.0.1:9001")
	const size = 512 << 20
	for _, scenario := range []string{"slow", "slow-waitall", "slow-lowat", "stalled"} {
		t.Run(scenario, func(t *testing.T) {
			before := n.stats()
			out := n.client(n.enrolled, scenario, addr, fmt.Sprint(size))
			rmem, wq := memoryOf(t, out)
			after := n.stats()
			t.Logf("reader held at most %d KiB, writer queued at most %d KiB; spliced %d MiB, then %d MiB by TCP",
				rmem>>10, wq>>10, (after.bytes-before.bytes)>>20, (after.demotedBytes-before.demotedBytes)>>20)
			limit := int64(connMemLimit)
			if scenario == "stalled" {
				// A reader that does not read for 10 s lets TCP fill
				// its receive buffer (autotuned, several MiB here):
				// the mesh may add its queue limit to that, no more.
				tcpRmem, tcpWq := memoryOf(t, n.client(outside, scenario, "127.0.0.1:9001", fmt.Sprint(size)))
				t.Logf("without the mesh: reader %d KiB, writer %d KiB", tcpRmem>>10, tcpWq>>10)
				limit = tcpRmem + tcpWq + spliceQueueLimit + 256<<10
			}
			if rmem+wq > limit {
				t.Errorf("the connection held %d KiB in the kernel (reader %d, writer %d), want at most %d",
					(rmem+wq)>>10, rmem>>10, wq>>10, limit>>10)
			}
			if after.demotions == before.demotions {
				t.Errorf("no demotion: the writer never got ahead by splice_queue_limit?")
			}
			if moved := (after.bytes - before.bytes) + (after.demotedBytes - before.demotedBytes); moved < size {
				t.Errorf("sk_msg saw %d bytes, want at least %d (the connection was not spliced)", moved, size)
			}
		})
	}
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
