package e2e

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/enrol"
	"github.com/smesh-dev/smesh/pkg/sandbox"
	"github.com/smesh-dev/smesh/pkg/testenv"
	"github.com/smesh-dev/smesh/pkg/tunnel"
)

// podNode is a test node that looks like a Kubernetes node: a namespace with
// a bridge its pods are plugged into (testenv.ClusterNode), a smeshd, and
// pods enrolled by creating them below the enrolled cgroup.
type podNode struct {
	*node
	cn *testenv.ClusterNode
}

// podNodes makes count nodes of one cluster, each joined to the first (so
// pods of any two reach each other through it), and starts smeshd on each
// in mode.
func podNodes(t *testing.T, count int, mode, extra string) []*podNode {
	t.Helper()
	testenv.RequirePrivileged(t)
	c := testenv.NewCluster()
	var nodes []*podNode
	for i := range count {
		cn := c.AddNode(t)
		if i > 0 {
			testenv.JoinNodes(t, nodes[0].cn, cn)
		}
		nodes = append(nodes, &podNode{node: nodeOn(t, cn.Node), cn: cn})
	}
	for _, n := range nodes {
		n.start(mode, extra)
	}
	return nodes
}

// pod adds an enrolled pod with a process that only waits in it, as a
// Kubernetes pod has its pause container: smeshd serves the namespaces its
// enrolled processes live in.
func (n *podNode) pod() *testenv.Pod {
	n.t.Helper()
	p := n.cn.AddPod(n.t, n.enrolled)
	testenv.StartHelper(n.t, p.Cgroup, p.Name, "pause")
	return p
}

// podServer starts the test server in pod p on p's IPv4 address and port.
func (n *podNode) podServer(p *testenv.Pod, port int) (*testenv.Helper, string) {
	n.t.Helper()
	addr := netip.AddrPortFrom(p.Addr4, uint16(port)).String()
	return podServerAt(n.t, p, addr), addr
}

// podServerAt starts the test server in pod p on addr.
func podServerAt(t *testing.T, p *testenv.Pod, addr string) *testenv.Helper {
	t.Helper()
	h := testenv.StartHelper(t, p.Cgroup, p.Name, "server", addr)
	line, err := h.ReadLine(5 * time.Second)
	if err != nil || !strings.HasPrefix(line, "ready ") {
		t.Fatalf("server did not start in pod on %s (%q, %v): %s", addr, line, err, h.Stderr())
	}
	return h
}

// podClient runs one client scenario in pod p, as node.client does.
func (n *podNode) podClient(p *testenv.Pod, args ...string) string {
	n.t.Helper()
	h := testenv.StartHelper(n.t, p.Cgroup, p.Name, "client", args...)
	if err := h.Wait(); err != nil {
		n.t.Fatalf("client %v in pod: %v\n%s", args, err, h.Stderr())
	}
	out := h.Stdout()
	if !strings.Contains(out, "ok "+args[0]) {
		n.t.Fatalf("client %v in pod did not report ok: %q", args, out)
	}
	return out
}

// podPeer runs the "peer" scenario from pod p to addr and returns what the
// server saw and the client's own address, checking that getpeername on the
// client shows addr, the destination it connected to (Go prints a v4-mapped
// peer as the IPv4 address it carries).
func (n *podNode) podPeer(p *testenv.Pod, addr string) (serverSaw, local netip.AddrPort) {
	n.t.Helper()
	saw, local, remote := parsePeer(n.t, n.podClient(p, "peer", addr))
	if want := netip.MustParseAddrPort(addr); remote.Addr().Unmap() != want.Addr().Unmap() || remote.Port() != want.Port() {
		n.t.Errorf("getpeername on the client says %s, want %s (the address it connected to)", remote, addr)
	}
	return saw, local
}

// TestPodToPodSameNode: two pods on one node's bridge, both in the mesh:
// their connection is not captured (no proxy hop) and is spliced in the
// kernel across the two namespaces, every byte intact.
func TestPodToPodSameNode(t *testing.T) {
	n := podNodes(t, 1, "splice", "")[0]
	a, b := n.pod(), n.pod()
	_, addr := n.podServer(b, 9000)
	n.waitServed(a.Name, b.Name)

	saw, local := n.podPeer(a, addr)
	if saw != local || local.Addr() != a.Addr4 {
		t.Errorf("server saw %s, client is %s: want the pod's own connection from %s, not captured", saw, local, a.Addr4)
	}
	before := n.stats()
	n.podClient(a, "oneway", addr, fmt.Sprint(64<<20))
	n.podClient(a, "echo", addr, fmt.Sprint(16<<20))
	n.podClient(a, "rr", addr, "2000")
	after := n.stats()
	if moved := after.carried() - before.carried(); moved < 96<<20 {
		t.Errorf("sk_msg carried %d bytes between the pods, want at least %d", moved, 96<<20)
	}
	if msgs := after.msgs - before.msgs; msgs < 4000 {
		t.Errorf("spliced %d messages, want the 4000 of the exchanges at least", msgs)
	}
}

// TestPodToPodSameNodeCopy: in copy mode a pod's connection to a pod on its
// own node is captured and relayed by smeshd, which dials the destination
// from inside the client's pod (the server sees the client pod's address,
// not the node's), every byte intact.
func TestPodToPodSameNodeCopy(t *testing.T) {
	n := podNodes(t, 1, "copy", "")[0]
	a, b := n.pod(), n.pod()
	_, addr := n.podServer(b, 9000)
	n.waitServed(a.Name, b.Name)

	saw, local := n.podPeer(a, addr)
	if saw == local || saw.Addr() != a.Addr4 {
		t.Errorf("server saw %s, client is %s: want smeshd's connection from inside pod a (%s)", saw, local, a.Addr4)
	}
	n.podClient(a, "oneway", addr, fmt.Sprint(16<<20))
	n.podClient(a, "echo", addr, fmt.Sprint(4<<20))
	_, m := n.admin("/metrics")
	if v := testenv.Metric(t, m, "smesh_connections_total", map[string]string{"path": "copy"}); v < 3 {
		t.Errorf("smeshd relayed %v connections, want at least 3", v)
	}
}

// TestPodToPodAcrossNodes: a pod's connection to a pod on another node is
// captured, carried by the mTLS tunnel to the other node's smeshd listening
// inside the destination pod, and delivered there: curl gets nginx's file
// intact, the server sees the connection come from its own pod's address,
// and that tunnel listener delivers to its own pod only (no relay to the
// pod next to it).
func TestPodToPodAcrossNodes(t *testing.T) {
	nginx := testenv.RequireCommand(t, "nginx")
	curl := testenv.RequireCommand(t, "curl")
	nodes := podNodes(t, 2, "splice", "")
	n1, n2 := nodes[0], nodes[1]
	a, b, c := n1.pod(), n2.pod(), n2.pod()

	dir := t.TempDir()
	blob := make([]byte, 32<<20)
	rand.Read(blob)
	if err := os.WriteFile(filepath.Join(dir, "blob"), blob, 0o644); err != nil {
		t.Fatal(err)
	}
	listen := netip.AddrPortFrom(b.Addr4, 8080)
	conf, err := sandbox.WriteNginxConfig(dir, listen.String())
	if err != nil {
		t.Fatal(err)
	}
	testenv.StartProcess(t, b.Cgroup, b.Name, nginx, "-p", dir, "-c", conf)
	_, addr := n2.podServer(b, 9000)
	n1.waitServed(a.Name)
	n2.waitServed(b.Name, c.Name)

	t.Run("curl to nginx", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "got")
		var h *testenv.Helper
		for range 50 { // nginx may still be starting
			h = testenv.StartProcess(t, a.Cgroup, a.Name, curl, "-sS", "--fail", "-o", out, "http://"+listen.String()+"/blob")
			if h.Wait() == nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err := h.Wait(); err != nil {
			t.Fatalf("curl: %v %s", err, h.Stderr())
		}
		if got, err := os.ReadFile(out); err != nil || !bytes.Equal(got, blob) {
			t.Fatalf("curl got %d bytes that differ from nginx's %d (%v)", len(got), len(blob), err)
		}
	})
	t.Run("through the tunnel, delivered inside the pod", func(t *testing.T) {
		saw, local := n1.podPeer(a, addr)
		if saw.Addr() != b.Addr4 || saw == local {
			t.Errorf("server saw %s (client %s): want smeshd delivering from inside the pod, from %s", saw, local, b.Addr4)
		}
		n1.podClient(a, "oneway", addr, fmt.Sprint(32<<20))
		n1.podClient(a, "echo", addr, fmt.Sprint(8<<20))
		n1.podClient(a, "serverfirst", addr, "1000000")
		_, m1 := n1.admin("/metrics")
		_, m2 := n2.admin("/metrics")
		if v := testenv.Metric(t, m1, "smesh_connections_total", map[string]string{"path": "tunnel_out"}); v < 5 {
			t.Errorf("node 1 counted %v outgoing tunnel connections, want at least 5", v)
		}
		if v := testenv.Metric(t, m2, "smesh_connections_total", map[string]string{"path": "tunnel_in"}); v < 5 {
			t.Errorf("node 2 counted %v incoming tunnel connections, want at least 5", v)
		}
	})
	t.Run("a pod's tunnel listener is no relay", func(t *testing.T) {
		// From node 1, with node 1's valid certificate, ask pod b's
		// tunnel listener for pod c.
		bad := badClient{t: t, from: n1.node, to: netip.AddrPortFrom(b.Addr4, 18001)}
		conn, err := bad.dial(clientTLS(t, n1.pki, n1.name))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Write(header(t, netip.AddrPortFrom(c.Addr4, 9000))); err != nil {
			t.Fatal(err)
		}
		var st [tunnel.StatusSize]byte
		if _, err := io.ReadFull(conn, st[:]); err != nil {
			t.Fatalf("reading the status: %v", err)
		}
		if s, err := tunnel.ParseStatus(st[:]); err != nil || s.OK || s.Reason != tunnel.ReasonNotLocal {
			t.Errorf("status %+v, %v; want refused not_local", s, err)
		}
	})
}

// TestPodCreatedAfterStart: a pod created while smeshd runs gets its
// listener by itself. Its very first connection may come before that: then
// capture.on_failure decides, visibly (smesh_capture_unready_total), and
// with "closed" it is refused, never let out uncaptured. Once served, the
// pod's connections are captured.
func TestPodCreatedAfterStart(t *testing.T) {
	for _, onFailure := range []string{"open", "closed"} {
		t.Run(onFailure, func(t *testing.T) {
			testenv.RequirePrivileged(t)
			c := testenv.NewCluster()
			cn1, cn2 := c.AddNode(t), c.AddNode(t)
			testenv.JoinNodes(t, cn1, cn2)
			n1, n2 := &podNode{node: nodeOn(t, cn1.Node), cn: cn1}, &podNode{node: nodeOn(t, cn2.Node), cn: cn2}
			n1.captureExtra = fmt.Sprintf("on_failure = %q\npin_dir = %q", onFailure, testPinDir(t))
			n1.start("splice", "")
			n2.start("splice", "")
			b := n2.pod()
			_, addr := n2.podServer(b, 9000)
			n2.waitServed(b.Name)

			a := n1.cn.AddPod(t, n1.enrolled)
			// At once: the pod's first process, its first connection.
			h := testenv.StartHelper(t, a.Cgroup, a.Name, "client", "peer", addr)
			err := h.Wait()
			_, m := n1.admin("/metrics")
			unready := testenv.Metric(t, m, "smesh_capture_unready_total", map[string]string{"action": onFailure})
			switch {
			case err != nil && onFailure == "closed" && unready >= 1:
				t.Logf("first connection refused before the pod's listener was up (on_failure = closed): %s", strings.TrimSpace(h.Stderr()))
			case err != nil:
				t.Fatalf("first connection failed (%v, %s), unready counter %v", err, h.Stderr(), unready)
			default:
				saw, local, _ := parsePeer(t, h.Stdout())
				switch {
				case saw != local:
					t.Logf("first connection captured: the pod's listener was up in time")
				case onFailure == "open" && unready >= 1:
					t.Logf("first connection went out uncaptured before the pod's listener was up (on_failure = open, counted)")
				default:
					t.Fatalf("first connection uncaptured (server saw %s) with on_failure = %s, unready counter %v", saw, onFailure, unready)
				}
			}
			testenv.StartHelper(t, a.Cgroup, a.Name, "pause")
			n1.waitServed(a.Name)
			if saw, local := n1.podPeer(a, addr); saw == local {
				t.Errorf("a served pod's connection was not captured (server saw the client's own %s)", local)
			}
			n1.podClient(a, "oneway", addr, "1000000")

			t.Run("a pod smeshd cannot listen in", func(t *testing.T) {
				// A process in the pod's namespace, but not in the
				// mesh (so smeshd does not know the namespace yet),
				// holds [outbound] listen's port first: no listener for
				// smeshd, so on_failure decides, every time.
				p := n1.cn.AddPod(t, n1.enrolled)
				squatter := testenv.StartHelper(t, testenv.NewCgroup(t), p.Name, "server", "127.0.0.1:18000")
				if line, err := squatter.ReadLine(5 * time.Second); err != nil || !strings.HasPrefix(line, "ready ") {
					t.Fatalf("squatter: %q %v %s", line, err, squatter.Stderr())
				}
				testenv.StartHelper(t, p.Cgroup, p.Name, "pause")
				n1.waitNamespace(p.Name, func(i enrol.Info) bool { return !i.Ready && i.Error != "" })
				_, m := n1.admin("/metrics")
				before := testenv.Metric(t, m, "smesh_capture_unready_total", map[string]string{"action": onFailure})
				h := testenv.StartHelper(t, p.Cgroup, p.Name, "client", "peer", addr)
				err := h.Wait()
				if onFailure == "closed" {
					if err == nil || !strings.Contains(h.Stderr(), "operation not permitted") {
						t.Errorf("on_failure = closed let the connection through (%v): %s %s", err, h.Stdout(), h.Stderr())
					}
				} else if err != nil {
					t.Errorf("on_failure = open refused the connection: %v %s", err, h.Stderr())
				} else if saw, local, _ := parsePeer(t, h.Stdout()); saw != local {
					t.Errorf("connection captured without a listener? server saw %s, client %s", saw, local)
				}
				_, m = n1.admin("/metrics")
				if after := testenv.Metric(t, m, "smesh_capture_unready_total", map[string]string{"action": onFailure}); after < before+1 {
					t.Errorf("smesh_capture_unready_total{action=%q} went from %v to %v, want it counted", onFailure, before, after)
				}
				// Fixed: the next connection's event makes smeshd try
				// again, and capture starts.
				squatter.Stop()
				deadline := time.Now().Add(15 * time.Second)
				for {
					h := testenv.StartHelper(t, p.Cgroup, p.Name, "client", "peer", addr)
					if h.Wait() == nil {
						if saw, local, _ := parsePeer(t, h.Stdout()); saw != local {
							break
						}
					}
					if time.Now().After(deadline) {
						t.Fatalf("the pod's connections are not captured 15s after its loopback came up")
					}
					time.Sleep(200 * time.Millisecond)
				}
			})
		})
	}
}

// TestPodChurn: 100 pods come and go while two others talk. Afterwards
// smeshd holds as many descriptors, goroutines and map entries as before:
// nothing of a deleted pod is left behind.
func TestPodChurn(t *testing.T) {
	n := podNodes(t, 1, "splice", "")[0]
	a, b := n.pod(), n.pod()
	_, addr := n.podServer(b, 9000)
	n.waitServed(a.Name, b.Name)

	pid := n.smeshd.PID()
	type snapshot struct {
		files, goroutines int
		maps              map[string]int
	}
	snap := func() snapshot {
		s := snapshot{files: openFiles(t, pid), maps: make(map[string]int)}
		_, m := n.admin("/metrics")
		s.goroutines = int(testenv.Metric(t, m, "go_goroutines", nil))
		for _, name := range []string{"smesh_netns", "smesh_addrs", "smesh_ns_addrs", "smesh_sockhash", "smesh_orig_dst"} {
			c, err := entries(pid, name)
			if err != nil {
				t.Fatal(err)
			}
			s.maps[name] = c
		}
		return s
	}
	base := snap()
	counted := n.meshCounts()

	// Traffic between the two steady pods all along: the command byte,
	// then exchanges of one byte each way.
	const exchanges = 1500
	traffic := testenv.StartHelper(t, a.Cgroup, a.Name, "client", "paced", addr, strconv.Itoa(exchanges))
	if line, err := traffic.ReadLine(5 * time.Second); err != nil || line != "connected" {
		t.Fatalf("steady traffic did not start (%q, %v): %s", line, err, traffic.Stderr())
	}
	want := meshCounts{conns: 1, txSpliced: 1 + exchanges, rxSpliced: exchanges}
	// Fewer under emulation (make kernel-test), where each pod takes seconds.
	churn := int(max(scaled(100), 10))
	var pods []*testenv.Pod
	var names []string
	for range churn {
		p := n.pod()
		pods, names = append(pods, p), append(names, p.Name)
	}
	// A process in each, connecting to the steady server, once smeshd
	// serves the pod's namespace (a connection made before that is not
	// spliced: the server's end cannot tell in which namespace its peer
	// is), so its connection is spliced: the command byte and its bytes
	// one way, a count and a SHA-256 back (oneway).
	n.waitServed(names...)
	var clients []*testenv.Helper
	for i, p := range pods {
		size := 1000 + i
		clients = append(clients, testenv.StartHelper(t, p.Cgroup, p.Name, "client", "oneway", addr, strconv.Itoa(size)))
		want.conns++
		want.txSpliced += float64(1 + size)
		want.rxSpliced += 8 + 32
	}
	for i, h := range clients {
		if err := h.Wait(); err != nil || !strings.Contains(h.Stdout(), "ok oneway") {
			t.Fatalf("churning pod %d's client: %v %s%s", i, err, h.Stdout(), h.Stderr())
		}
	}
	served := 0
	for _, i := range n.namespaces() {
		if i.Ready {
			served++
		}
	}
	t.Logf("smeshd served %d namespaces with all pods up", served)
	for _, p := range pods {
		p.Delete(t)
	}
	if err := traffic.Wait(); err != nil || !strings.Contains(traffic.Stdout(), "ok paced") {
		t.Fatalf("steady traffic during the churn: %v %s%s", err, traffic.Stdout(), traffic.Stderr())
	}
	// Every connection spliced, every byte of them, none by TCP.
	if got := n.meshCounts().sub(counted); got != want {
		t.Errorf("counted %v\nwant    %v", got, want)
	}

	// smeshd notices deleted pods by itself (cgroup events); give it
	// until everything is back where it was.
	var got snapshot
	deadline := time.Now().Add(20 * time.Second)
	for {
		got = snap()
		same := got.files == base.files && got.goroutines <= base.goroutines+2
		for name, c := range base.maps {
			same = same && got.maps[name] == c
		}
		if same || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if got.files != base.files {
		t.Errorf("smeshd holds %d descriptors, %d before the churn", got.files, base.files)
	}
	if got.goroutines > base.goroutines+2 {
		t.Errorf("smeshd runs %d goroutines, %d before the churn", got.goroutines, base.goroutines)
	}
	for name, c := range base.maps {
		if got.maps[name] != c {
			t.Errorf("%s holds %d entries, %d before the churn", name, got.maps[name], c)
		}
	}
	if served < churn {
		t.Errorf("smeshd served %d namespaces at the peak, want the %d pods' at least", served, churn)
	}
}
