package e2e

import (
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// upgrade starts a successor smeshd beside the running one, with the same
// configuration and runtime directory, as an upgrade does (docs/restart.md,
// 3.4): the successor takes the listeners and the capture over through the
// hand-over socket and says it is ready. It returns the predecessor, which
// drains what it relays and then exits by itself (waitExited).
func (n *node) upgrade(newCgroup bool) *testenv.Helper {
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
	return old
}

// waitExited expects every predecessor to exit 0 by itself within timeout
// (its drain: the connections it relays end meanwhile).
func waitExited(t *testing.T, olds []*testenv.Helper, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for _, old := range olds {
		exited := make(chan error, 1)
		go func() { exited <- old.Wait() }()
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("a predecessor smeshd exited with %v: %s", err, old.Stderr())
			}
		case <-time.After(time.Until(deadline)):
			t.Errorf("a predecessor smeshd did not exit after its hand-over and drain: %s", old.Stderr())
		}
	}
}

// logWarnings logs what the smeshd processes warned of, in the order they
// ran, to tell why connections failed.
func logWarnings(t *testing.T, procs []*testenv.Helper) {
	t.Helper()
	for i, p := range procs {
		for _, l := range strings.Split(p.Stderr(), "\n") {
			if strings.Contains(l, `"level":"warn"`) || strings.Contains(l, `"level":"error"`) {
				t.Logf("smeshd %d of %d: %s", i+1, len(procs), l)
			}
		}
	}
}

// streams keeps n long-lived connections to addr open from cgroup cg in
// namespace ns until stop is called, one after another in each of n loops:
// each exchanges a byte every 10 ms for about length, checked (the
// "paced" client; not scaled: the exchanges are few), so that every moment
// some are open across an upgrade. stop returns how many ran and the first
// failure; it also runs at the test's cleanup.
func streams(t *testing.T, cg, ns, addr string, n int, length time.Duration) (stop func() (int64, error)) {
	var ran atomic.Int64
	var first atomic.Value
	var wg sync.WaitGroup
	done := make(chan struct{})
	exchanges := fmt.Sprint(int64(length / (10 * time.Millisecond)))
	for range n {
		wg.Go(func() {
			for {
				select {
				case <-done:
					return
				default:
				}
				h := testenv.StartHelper(t, cg, ns, "client", "paced", addr, exchanges)
				if err := h.Wait(); err != nil {
					first.CompareAndSwap(nil, fmt.Errorf("%v: %s", err, h.Stderr()))
				}
				ran.Add(1)
			}
		})
	}
	var once sync.Once
	stop = func() (int64, error) {
		once.Do(func() { close(done) })
		wg.Wait()
		err, _ := first.Load().(error)
		return ran.Load(), err
	}
	t.Cleanup(func() { stop() })
	return stop
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
//
// Each node is upgraded ten times (three under emulation, SMESH_TEST_SCALE),
// and 20 long-lived connections (2 under emulation), ten to each server,
// exchange a byte every 10 ms throughout (each lasting about 4 s, then replaced): the relayed
// ones are finished by the smeshd that relayed them, after it released,
// and every predecessor must then exit 0 by itself.
func TestUpgradeUnderLoad(t *testing.T) {
	upgrades := max(3, 10/int(dataScale()))
	const daemonConf = "[daemon]\ndrain_timeout = \"30s\""
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
			// Ten to each server (one under emulation).
			nStreams := max(1, 10/int(dataScale()))
			remoteStreams := streams(t, a.enrolled, a.ns.Name, remote, nStreams, 4*time.Second)
			localStreams := streams(t, a.enrolled, a.ns.Name, local, nStreams, 4*time.Second)
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
			var olds []*testenv.Helper
			for _, n := range []*node{a, b} {
				for i := range upgrades {
					if i == 1 || i == 2 {
						// Another map layout: 65536 (the default)
						// -> 16384 -> 65536.
						n.writeConfig("splice", fmt.Sprintf("map_size = %d\n%s", []int{16384, 65536}[i-1], daemonConf))
					}
					// a's successors share its cgroup (as smeshd
					// upgrade's), b's each start in a new one.
					olds = append(olds, n.upgrade(n == b))
					remade += strings.Count(n.smeshd.Stderr(), "map made anew")
					time.Sleep(time.Second)
				}
			}
			errRemote, errLocal := steadyRemote.Wait(), steadyLocal.Wait()
			close(stop)
			<-done
			nRemote, errRemoteStreams := remoteStreams()
			nLocal, errLocalStreams := localStreams()
			waitExited(t, olds, 40*time.Second)
			time.Sleep(200 * time.Millisecond)
			s.stop()
			t.Logf("%d upgrades per node; steady to b: %s; steady on a: %s; long-lived: %d to b, %d on a; marker transfers: %d, %d failed; frames on the wire: %d, marker in %d",
				upgrades, strings.TrimSpace(steadyRemote.Stdout()), strings.TrimSpace(steadyLocal.Stdout()), nRemote, nLocal,
				markers.Load(), markerFailed.Load(), s.frames.Load(), s.matches.Load())
			if errRemoteStreams != nil {
				t.Errorf("a long-lived connection to node b failed during the upgrades: %v", errRemoteStreams)
			}
			if errLocalStreams != nil {
				t.Errorf("a long-lived connection on node a failed during the upgrades: %v", errLocalStreams)
			}
			if nRemote < int64(nStreams) || nLocal < int64(nStreams) {
				t.Errorf("long-lived connections: %d to b, %d on a, want at least %d each", nRemote, nLocal, nStreams)
			}
			if errRemote != nil {
				logWarnings(t, append(olds, a.smeshd, b.smeshd))
				t.Errorf("connections to node b failed during the upgrades: %v: %s", errRemote, steadyRemote.Stderr())
			}
			if errLocal != nil {
				logWarnings(t, append(olds, a.smeshd, b.smeshd))
				t.Errorf("connections on node a failed during the upgrades: %v: %s", errLocal, steadyLocal.Stderr())
			}
			if n := markerFailed.Load(); n > 0 {
				t.Errorf("%d of %d marker transfers failed; the first: %v", n, markers.Load(), firstFailure.Load())
			}
			if n := s.matches.Load(); n > 0 {
				t.Errorf("the marker crossed the wire between the nodes in clear in %d frames", n)
			}
			// The maps map_size sizes, at 2 upgrades of 2 nodes.
			if want := len(datapath.SizedMaps) * 2 * 2; remade != want {
				t.Errorf("the successors made %d maps anew, want %d (%v at each map_size change)", remade, want, datapath.SizedMaps)
			}
			if markers.Load() == 0 || s.frames.Load() == 0 {
				t.Errorf("nothing measured: %d marker transfers, %d frames seen", markers.Load(), s.frames.Load())
			}
		})
	}
}
