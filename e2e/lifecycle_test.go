package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// TestConnectionsOutliveSmeshd: a same-node connection opened before smeshd
// starts, and a spliced one opened while it runs, both keep exchanging
// bytes, intact, while smeshd starts and after it stops.
func TestConnectionsOutliveSmeshd(t *testing.T) {
	n := newNode(t)
	addr := "127.0.0.1:9000"
	n.server(n.enrolled, addr)

	const exchanges = "300" // 10 ms apart: about 3 s
	early := testenv.StartHelper(t, n.enrolled, n.ns.Name, "client", "paced", addr, exchanges)
	if line, err := early.ReadLine(5 * time.Second); err != nil || line != "connected" {
		t.Fatalf("early client: %q %v %s", line, err, early.Stderr())
	}
	n.start("splice", "")
	before := n.stats()
	spliced := testenv.StartHelper(t, n.enrolled, n.ns.Name, "client", "paced", addr, exchanges)
	if line, err := spliced.ReadLine(5 * time.Second); err != nil || line != "connected" {
		t.Fatalf("spliced client: %q %v %s", line, err, spliced.Stderr())
	}
	time.Sleep(time.Second)
	if n.stats().bytes == before.bytes {
		t.Fatal("the connection opened under smeshd is not spliced")
	}
	n.stop()
	for name, h := range map[string]*testenv.Helper{"opened before smeshd": early, "spliced": spliced} {
		if err := h.Wait(); err != nil {
			t.Errorf("connection %s: %v\n%s", name, err, h.Stderr())
		}
	}
}

// TestQueuedBytesSurviveSmeshdExit: bytes already spliced into a stalled
// reader's queue when smeshd exits are still delivered, in order. The
// transfer stays within splice_queue_limit, so that every byte of it is
// spliced (the counters must say so before smeshd exits), none by TCP.
func TestQueuedBytesSurviveSmeshdExit(t *testing.T) {
	n := newNode(t)
	addr := "127.0.0.1:9000"
	srv := n.server(n.enrolled, addr)
	n.start("splice", "")
	before := n.stats()
	// The server stalls 10 s before reading; smeshd exits meanwhile.
	const size = spliceQueueLimit / 2
	stalled := testenv.StartHelper(t, n.enrolled, n.ns.Name, "client", "stalled", addr, fmt.Sprint(size))
	after := n.waitSpliced(before, size)
	if d := after.demotedBytes - before.demotedBytes; d != 0 {
		t.Errorf("%d bytes demoted to TCP, want all %d spliced", d, size)
	}
	if strings.Contains(srv.Stdout(), "result slow") {
		t.Fatalf("the server read before smeshd exited: nothing waited in its queue\n%s", srv.Stdout())
	}
	n.stop()
	if err := stalled.Wait(); err != nil {
		t.Fatalf("transfer across smeshd's exit: %v\n%s", err, stalled.Stderr())
	}
}
