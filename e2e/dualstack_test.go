package e2e

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/smesh-dev/smesh/pkg/enrol"
	"github.com/smesh-dev/smesh/pkg/sandbox"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// mapped writes an IPv4 address the way a dual-stack socket connects to it:
// [::ffff:a.b.c.d]:port.
func mapped(a netip.Addr, port int) string {
	return netip.AddrPortFrom(netip.AddrFrom16(a.As16()), uint16(port)).String()
}

// TestDualStackAcrossNodes: from an enrolled pod, a native IPv6 connection
// and a dual-stack socket's connection to a v4-mapped address are both
// captured (connect6), carried by the tunnel and delivered inside the
// destination pod, bytes intact; getpeername shows the original
// destination. smeshd learnt it with SO_ORIGINAL_DST (IP6T_SO_ORIGINAL_DST on
// its IPv6 listener, SO_ORIGINAL_DST on its IPv4 one): without an answer it
// would have refused the connection.
func TestDualStackAcrossNodes(t *testing.T) {
	nodes := podNodes(t, 2, "splice", "")
	n1, n2 := nodes[0], nodes[1]
	a, b := n1.pod(), n2.pod()
	dst6 := netip.AddrPortFrom(b.Addr6, 9000).String()
	dst4 := netip.AddrPortFrom(b.Addr4, 9001).String()
	for _, addr := range []string{dst6, dst4} {
		podServerAt(t, b, addr)
	}
	n1.waitServed(a.Name)
	n2.waitServed(b.Name)

	for _, c := range []struct {
		name, addr string
		want       netip.Addr // where the server sees the connection come from
	}{
		{"native IPv6", dst6, b.Addr6},
		{"v4-mapped from a dual-stack socket", mapped(b.Addr4, 9001), b.Addr4},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, m := n1.admin("/metrics")
			before := testenv.Metric(t, m, "smesh_connections_total", map[string]string{"path": "tunnel_out"})
			saw, local := n1.podPeer(a, c.addr)
			if saw == local || saw.Addr().Unmap() != c.want {
				t.Errorf("server saw %s (client %s): want smeshd delivering from inside pod b, from %s", saw, local, c.want)
			}
			n1.podClient(a, "oneway", c.addr, fmt.Sprint(16<<20))
			n1.podClient(a, "echo", c.addr, fmt.Sprint(4<<20))
			_, m = n1.admin("/metrics")
			if v := testenv.Metric(t, m, "smesh_connections_total", map[string]string{"path": "tunnel_out"}); v < before+3 {
				t.Errorf("node 1 counted %v tunnelled connections, want at least %v", v, before+3)
			}
		})
	}
}

// TestDualStackSameNode: same-node IPv6 hops are spliced, between two pods
// over the bridge and over a pod's own [::1], not captured.
func TestDualStackSameNode(t *testing.T) {
	n := podNodes(t, 1, "splice", "")[0]
	a, b := n.pod(), n.pod()
	for _, c := range []struct {
		name   string
		server *testenv.Pod
		addr   string
	}{
		{"pod to pod", b, netip.AddrPortFrom(b.Addr6, 9000).String()},
		{"within a pod over [::1]", a, "[::1]:9001"},
	} {
		t.Run(c.name, func(t *testing.T) {
			podServerAt(t, c.server, c.addr)
			n.waitServed(a.Name, b.Name)
			if saw, local := n.podPeer(a, c.addr); saw != local {
				t.Errorf("captured: server saw %s, client is %s", saw, local)
			}
			before := n.stats()
			n.podClient(a, "oneway", c.addr, fmt.Sprint(16<<20))
			n.podClient(a, "rr", c.addr, "1000")
			after := n.stats()
			if moved := after.carried() - before.carried(); moved < 16<<20 {
				t.Errorf("sk_msg carried %d bytes, want at least %d", moved, 16<<20)
			}
			if msgs := after.msgs - before.msgs; msgs < 2000 {
				t.Errorf("spliced %d messages, want the 2000 of the exchanges at least", msgs)
			}
		})
	}
}

// TestDualStackClosedWhileDown: with on_failure = "closed", a killed smeshd
// leaves IPv6 and v4-mapped connections of enrolled workloads refused, as
// IPv4 ones: none leaves uncaptured.
func TestDualStackClosedWhileDown(t *testing.T) {
	testenv.RequirePrivileged(t)
	pinDir := testPinDir(t)
	c := testenv.NewCluster()
	cn1, cn2 := c.AddNode(t), c.AddNode(t)
	testenv.JoinNodes(t, cn1, cn2)
	n1, n2 := &podNode{node: nodeOn(t, cn1.Node), cn: cn1}, &podNode{node: nodeOn(t, cn2.Node), cn: cn2}
	n1.captureExtra = fmt.Sprintf("on_failure = \"closed\"\npin_dir = %q", pinDir)
	n1.start("splice", "")
	n2.start("splice", "")
	a, b := n1.pod(), n2.pod()
	dst6, dst4 := netip.AddrPortFrom(b.Addr6, 9000).String(), netip.AddrPortFrom(b.Addr4, 9000).String()
	for _, addr := range []string{dst6, dst4} {
		podServerAt(t, b, addr)
	}
	n1.waitServed(a.Name)
	n2.waitServed(b.Name)
	n1.podClient(a, "oneway", dst6, "100000")

	n1.smeshd.Stop() // SIGKILL
	for _, addr := range []string{dst6, mapped(b.Addr4, 9000), dst4} {
		n1.podClient(a, "refused", addr)
	}
}

// TestNamespaceWithoutIPv6: in a pod with IPv6 disabled, smeshd cannot
// listen on [::1]: it says so once and captures IPv4 there all the same.
func TestNamespaceWithoutIPv6(t *testing.T) {
	nodes := podNodes(t, 2, "splice", "")
	n1, n2 := nodes[0], nodes[1]
	b := n2.pod()
	_, addr := n2.podServer(b, 9000)
	n2.waitServed(b.Name)

	a := n1.cn.AddPod(t, n1.enrolled)
	if err := sandbox.SetSysctl(netnsOf(t, a), "net/ipv6/conf/all/disable_ipv6", "1"); err != nil {
		t.Fatal(err)
	}
	if err := sandbox.SetSysctl(netnsOf(t, a), "net/ipv6/conf/lo/disable_ipv6", "1"); err != nil {
		t.Fatal(err)
	}
	testenv.StartHelper(t, a.Cgroup, a.Name, "pause")
	n1.waitNamespace(a.Name, func(i enrol.Info) bool { return i.Ready && !i.Ready6 })
	if saw, local := n1.podPeer(a, addr); saw == local {
		t.Errorf("IPv4 not captured in a namespace without IPv6 (server saw %s)", saw)
	}
	n1.podClient(a, "oneway", addr, "1000000")
	// Once: the scans that come after do not repeat it.
	time.Sleep(6 * time.Second)
	if c := strings.Count(n1.smeshd.Stderr(), "no IPv6 outbound listener in this network namespace"); c != 1 {
		t.Errorf("smeshd said %d times that IPv6 is not captured in the namespace, want once", c)
	}
}

// netnsOf opens a pod's network namespace handle for sandbox calls.
func netnsOf(t *testing.T, p *testenv.Pod) netns.NsHandle {
	t.Helper()
	h, err := netns.GetFromName(p.Name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}
