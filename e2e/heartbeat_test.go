package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/daemon"
	"github.com/smesh-dev/smesh/pkg/handover"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// TestHeartbeatAfterKill: a real smeshd hands everything over to a
// "successor" (this test, through handover.sock) that never says ready, and
// is killed with SIGKILL: its listeners and, in "open" mode, its links are
// held by the test, as systemd's store or a successor in flight would hold
// them. A captured connect then waits in the held listener's queue, but
// only until the heartbeat is [daemon] restart_hold old: from then on
// "open" sends it to its destination (uncaptured), "closed" refuses it at
// once (EPERM from connect4), instead of it waiting for ever.
func TestHeartbeatAfterKill(t *testing.T) {
	for _, onFailure := range []string{"open", "closed"} {
		t.Run(onFailure, func(t *testing.T) {
			a, b := newNode(t), newNode(t)
			b.capture = "[]"
			_, addrB := testenv.Link(t, a.ns, b.ns)
			server := netip.AddrPortFrom(addrB, 9000).String()
			b.server("", server)
			b.start("splice", "")
			a.runtimeDir = t.TempDir()
			if onFailure == "closed" {
				a.captureExtra = fmt.Sprintf("on_failure = \"closed\"\npin_dir = %q", testPinDir(t))
			}
			const hold = 3 * time.Second
			a.start("splice", fmt.Sprintf("[daemon]\nrestart_hold = %q", hold.String()))
			if !captured(a, a.enrolled, server) {
				t.Fatal("not captured while smeshd runs")
			}

			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			sess, err := handover.Dial(ctx, filepath.Join(a.runtimeDir, daemon.HandoverSocketName), handover.Hello{})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				sess.Abort()
				for _, f := range sess.Files {
					f.Close()
				}
			})
			a.smeshd.Stop() // SIGKILL, the hand-over not done
			killed := time.Now()

			a.client(a.enrolled, "queued", server)
			if since := time.Since(killed); since >= hold {
				t.Fatalf("the queued check ended %v after the kill, past restart_hold: cannot tell", since)
			}
			time.Sleep(time.Until(killed.Add(hold + 500*time.Millisecond)))
			began := time.Now()
			if onFailure == "open" {
				if captured(a, a.enrolled, server) {
					t.Error("restart_hold after the kill, still captured (into a listener nobody serves)")
				}
			} else {
				a.client(a.enrolled, "eperm", server)
			}
			if took := time.Since(began); took > 2*time.Second {
				t.Errorf("the connect after restart_hold took %v: want an answer at once", took)
			}
		})
	}
}
