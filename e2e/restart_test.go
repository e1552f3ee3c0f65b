package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// TestTwoProgramSetsAtOnce is an experiment of docs/restart.md (3.2, "never
// two program sets at once"): a second smeshd with maps and programs of its
// own, attached to the same enrolled cgroup beside the first one's (cgroup
// multi-attach; other ports), as a successor that does not adopt would be.
// Does a same-node connection still get its bytes? It reports what
// happens; it fails only if bytes are lost or corrupted silently (the
// client checks every byte).
func TestTwoProgramSetsAtOnce(t *testing.T) {
	n := newNode(t)
	addr := "127.0.0.1:9000"
	n.server(n.enrolled, addr)
	n.start("splice", "")
	first := n.smeshd

	// The second one: its own cgroup, its own ports.
	second := *n
	second.smeshCg = testenv.NewCgroup(t)
	second.start("splice", `
[outbound]
listen = "127.0.0.1:18100"
listen6 = "[::1]:18100"
[tunnel]
listen = "[::]:18101"
[admin]
listen = "127.0.0.1:15100"`)
	if n.smeshd != first {
		t.Fatal("the harness replaced the first smeshd")
	}
	results := map[string]string{}
	for _, sc := range []struct{ name, scenario, size string }{
		{"echo 1 MB", "echo", "1000000"},
		{"echo 100 B", "echo", "100"},
		{"concurrent", "concurrent", "100000"},
	} {
		args := []string{sc.scenario, addr}
		if sc.size != "" {
			args = append(args, sc.size)
		}
		h := testenv.StartHelper(t, n.enrolled, n.ns.Name, "client", args...)
		err := h.Wait()
		out := strings.TrimSpace(h.Stdout())
		results[sc.name] = fmt.Sprintf("err=%v out=%q stderr=%q", err, out, strings.TrimSpace(h.Stderr()))
		t.Logf("two program sets, %s: %s", sc.name, results[sc.name])
	}
	t.Logf("first smeshd's counters: %+v; second's: %+v", n.stats(), second.stats())
}

// TestRestartBaseline measures what restarts do today (docs/restart.md,
// section 1), in this harness: two nodes, 200 connections a second from
// node a to a server on node b (steady: each checked), and marker
// transfers one after another, while a's smeshd is restarted (SIGTERM,
// then a new process) and then b's. It reports the failed connections and
// the marker frames seen in clear on the wire between the nodes; it asserts
// nothing, as today's answer is known to be wrong (issue 24). Issue 24's
// test (docs/restart.md, section 4) turns these numbers into goals.
// Run with SMESH_RESTART_BASELINE=1.
func TestRestartBaseline(t *testing.T) {
	if os.Getenv("SMESH_RESTART_BASELINE") == "" {
		t.Skip("a measurement of today's restarts; SMESH_RESTART_BASELINE=1 runs it")
	}
	for _, onFailure := range []string{"open", "closed"} {
		t.Run(onFailure, func(t *testing.T) {
			a, b, _, addrB := meshPair(t, "splice", "", "")
			if onFailure == "closed" {
				for _, n := range []*node{a, b} {
					n.stop()
					n.captureExtra = fmt.Sprintf("on_failure = \"closed\"\npin_dir = %q", testPinDir(t))
					n.start("splice", "")
				}
			}
			addr := netip.AddrPortFrom(addrB, 9000).String()
			b.server(b.enrolled, addr)
			s := sniff(t, a.ns, "eth0", Marker)

			steadyClient := testenv.StartHelper(t, a.enrolled, a.ns.Name, "client", "steady", addr, "8")
			var markers, markerFailed atomic.Int64
			stop := make(chan struct{})
			done := make(chan struct{})
			go func() {
				defer close(done)
				for {
					select {
					case <-stop:
						return
					default:
					}
					h := testenv.StartHelper(t, a.enrolled, a.ns.Name, "client", "marker", addr, "65536")
					if h.Wait() != nil {
						markerFailed.Add(1)
					}
					markers.Add(1)
				}
			}()
			time.Sleep(1500 * time.Millisecond)
			a.stop()
			a.start("splice", "")
			time.Sleep(2 * time.Second)
			b.stop()
			b.start("splice", "")
			err := steadyClient.Wait()
			close(stop)
			<-done
			time.Sleep(200 * time.Millisecond)
			s.stop()
			t.Logf("on_failure = %q: steady: %s %v; marker transfers: %d, %d failed; marker frames in clear on the wire: %d of %d; first steady failures: %s",
				onFailure, strings.TrimSpace(steadyClient.Stdout()), err, markers.Load(), markerFailed.Load(), s.matches.Load(), s.frames.Load(), strings.TrimSpace(steadyClient.Stderr()))
		})
	}
}
