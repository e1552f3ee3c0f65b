package e2e

import (
	"fmt"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// upgrade starts a successor smeshd beside the running one, with the same
// configuration and runtime directory, as an upgrade does (docs/restart.md,
// 3.4): the successor takes the listeners and the capture over through the
// hand-over socket and says it is ready; the predecessor then drains what
// it relays and exits by itself.
func (n *node) upgrade(newCgroup bool) {
	n.t.Helper()
	old := n.smeshd
	if newCgroup {
		// As a new pod's smeshd: the listeners it takes were made in
		// the predecessor's cgroup, whose programs its accepted sockets
		// run (datapath's inheritedAttachments).
		n.smeshCg = testenv.NewCgroup(n.t)
	}
	n.launch(nil, n.confPath)
	n.waitReady()
	exited := make(chan error, 1)
	go func() { exited <- old.Wait() }()
	select {
	case err := <-exited:
		if err != nil {
			n.t.Fatalf("the predecessor smeshd exited with %v: %s", err, old.Stderr())
		}
	case <-time.After(20 * time.Second):
		n.t.Fatalf("the predecessor smeshd did not exit after the hand-over: %s", old.Stderr())
	}
}

// TestUpgradeUnderLoad is issue 24's test (docs/restart.md, section 4):
// two nodes; from node a, 200 connections a second (divided by
// SMESH_TEST_SCALE) to a server on node b
// (through the tunnel) and as many to a server on a itself (spliced), each
// checked byte for byte, and marker transfers to b one after another, while
// each node's smeshd is upgraded three times by a successor started beside
// it, the second and third time with another [datapath] map_size (the
// sockhash, smesh_orig_dst and smesh_dirs then have another layout: the
// successor makes them anew, docs/restart.md 3.6). Not one connection may
// fail, and the marker must never cross the wire between the nodes in
// clear: in both on_failure modes.
func TestUpgradeUnderLoad(t *testing.T) {
	const upgrades = 3
	const daemonConf = "[daemon]\ndrain_timeout = \"5s\""
	for _, onFailure := range []string{"open", "closed"} {
		t.Run(onFailure, func(t *testing.T) {
			a, b := newNode(t), newNode(t)
			_, addrB := testenv.Link(t, a.ns, b.ns)
			for _, n := range []*node{a, b} {
				n.runtimeDir = t.TempDir()
				if onFailure == "closed" {
					n.captureExtra = fmt.Sprintf("on_failure = \"closed\"\npin_dir = %q", testPinDir(t))
				}
				n.start("splice", daemonConf)
			}
			remote := netip.AddrPortFrom(addrB, 9000).String()
			b.server(b.enrolled, remote)
			local := "127.0.0.1:9001"
			a.server(a.enrolled, local)
			s := sniff(t, a.ns, "eth0", Marker)

			// 200 connections a second each (fewer under emulation,
			// SMESH_TEST_SCALE).
			seconds, interval := fmt.Sprint(4+2*2*upgrades), fmt.Sprint(5*dataScale())
			steadyRemote := testenv.StartHelper(t, a.enrolled, a.ns.Name, "client", "steady", remote, seconds, interval)
			steadyLocal := testenv.StartHelper(t, a.enrolled, a.ns.Name, "client", "steady", local, seconds, interval)
			var markers, markerFailed atomic.Int64
			var firstFailure atomic.Value
			stop, done := make(chan struct{}), make(chan struct{})
			go func() {
				defer close(done)
				for {
					select {
					case <-stop:
						return
					default:
					}
					h := testenv.StartHelper(t, a.enrolled, a.ns.Name, "client", "marker", remote, "65536")
					if err := h.Wait(); err != nil {
						markerFailed.Add(1)
						firstFailure.CompareAndSwap(nil, fmt.Sprintf("%v: %s", err, h.Stderr()))
					}
					markers.Add(1)
				}
			}()
			time.Sleep(2 * time.Second)
			remade := 0
			for _, n := range []*node{a, b} {
				for i := range upgrades {
					if i > 0 {
						// Another map layout: 65536 (the default)
						// -> 16384 -> 65536.
						n.writeConfig("splice", fmt.Sprintf("map_size = %d\n%s", []int{16384, 65536}[i-1], daemonConf))
					}
					// a's successors share its cgroup (as smeshd
					// upgrade's), b's each start in a new one.
					n.upgrade(n == b)
					remade += strings.Count(n.smeshd.Stderr(), "map made anew")
					time.Sleep(2 * time.Second)
				}
			}
			errRemote, errLocal := steadyRemote.Wait(), steadyLocal.Wait()
			close(stop)
			<-done
			time.Sleep(200 * time.Millisecond)
			s.stop()
			t.Logf("steady to b: %s; steady on a: %s; marker transfers: %d, %d failed; frames on the wire: %d, marker in %d",
				strings.TrimSpace(steadyRemote.Stdout()), strings.TrimSpace(steadyLocal.Stdout()),
				markers.Load(), markerFailed.Load(), s.frames.Load(), s.matches.Load())
			if errRemote != nil {
				t.Errorf("connections to node b failed during the upgrades: %v: %s", errRemote, steadyRemote.Stderr())
			}
			if errLocal != nil {
				t.Errorf("connections on node a failed during the upgrades: %v: %s", errLocal, steadyLocal.Stderr())
			}
			if n := markerFailed.Load(); n > 0 {
				t.Errorf("%d of %d marker transfers failed; the first: %v", n, markers.Load(), firstFailure.Load())
			}
			if n := s.matches.Load(); n > 0 {
				t.Errorf("the marker crossed the wire between the nodes in clear in %d frames", n)
			}
			// sockhash, orig_dst and dirs, at 2 upgrades of 2 nodes.
			if remade != 3*2*2 {
				t.Errorf("the successors made %d maps anew, want 12 (3 at each map_size change)", remade)
			}
			if markers.Load() == 0 || s.frames.Load() == 0 {
				t.Errorf("nothing measured: %d marker transfers, %d frames seen", markers.Load(), s.frames.Load())
			}
		})
	}
}
