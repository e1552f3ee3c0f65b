package e2e

import (
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
// reader's queue when smeshd exits are still delivered, in order.
func TestQueuedBytesSurviveSmeshdExit(t *testing.T) {
	n := newNode(t)
	addr := "127.0.0.1:9000"
	n.server(n.enrolled, addr)
	n.start("splice", "")
	// The server stalls 3 s before reading; smeshd exits meanwhile.
	stall := testenv.StartHelper(t, n.enrolled, n.ns.Name, "client", "stall", addr, scaledArg(64<<20))
	time.Sleep(time.Second)
	n.stop()
	if err := stall.Wait(); err != nil {
		t.Fatalf("transfer across smeshd's exit: %v\n%s", err, stall.Stderr())
	}
}
