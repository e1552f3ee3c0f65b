package testenv_test

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

var (
	nodeNet4 = netip.MustParsePrefix("198.18.0.0/15")
	nodeNet6 = netip.MustParsePrefix("fd00:5e::/32")
)

func TestClusterPodsOnOneNode(t *testing.T) {
	testenv.RequirePrivileged(t)
	enrolled := testenv.NewCgroup(t)
	n := testenv.NewClusterNode(t)
	p1, p2 := n.AddPod(t, enrolled), n.AddPod(t, enrolled)

	if !nodeNet4.Contains(n.PodNet4.Addr()) || n.PodNet4.Bits() != 24 ||
		!nodeNet6.Contains(n.PodNet6.Addr()) || n.PodNet6.Bits() != 64 {
		t.Errorf("pod subnets %v and %v, want a /24 of %v and a /64 of %v", n.PodNet4, n.PodNet6, nodeNet4, nodeNet6)
	}
	if n.Gateway4 != n.PodNet4.Addr().Next() || n.Gateway6 != n.PodNet6.Addr().Next() {
		t.Errorf("gateways %v and %v, want the first hosts of %v and %v", n.Gateway4, n.Gateway6, n.PodNet4, n.PodNet6)
	}
	for _, p := range []*testenv.Pod{p1, p2} {
		if !n.PodNet4.Contains(p.Addr4) || !n.PodNet6.Contains(p.Addr6) || p.Addr4 == n.Gateway4 || p.Addr6 == n.Gateway6 {
			t.Errorf("pod %s has addresses %v and %v, want hosts of %v and %v other than the gateways",
				p.Name, p.Addr4, p.Addr6, n.PodNet4, n.PodNet6)
		}
		if want := filepath.Join(enrolled, p.Name); p.Cgroup != want {
			t.Errorf("pod cgroup %s, want %s", p.Cgroup, want)
		}
	}
	if p1.Addr4 == p2.Addr4 || p1.Addr6 == p2.Addr6 {
		t.Errorf("two pods of one node share an address: %v/%v and %v/%v", p1.Addr4, p1.Addr6, p2.Addr4, p2.Addr6)
	}

	// A process of the pod is in its cgroup and sees eth0, with the pod's
	// addresses, and lo.
	h := testenv.StartHelper(t, p1.Cgroup, p1.Name, "interfaces")
	if err := h.Wait(); err != nil {
		t.Fatalf("helper: %v; stderr: %s", err, h.Stderr())
	}
	seen := map[string][]string{}
	for line := range strings.Lines(h.Stdout()) {
		name, addrs, _ := strings.Cut(strings.TrimSpace(line), " ")
		seen[name] = strings.Split(addrs, ",")
	}
	if got := slices.Sorted(maps.Keys(seen)); !slices.Equal(got, []string{"eth0", "lo"}) {
		t.Errorf("pod sees interfaces %v, want [eth0 lo]", got)
	}
	for _, want := range []netip.Prefix{netip.PrefixFrom(p1.Addr4, 24), netip.PrefixFrom(p1.Addr6, 64)} {
		if !slices.Contains(seen["eth0"], want.String()) {
			t.Errorf("eth0 in pod has addresses %v, want %s among them", seen["eth0"], want)
		}
	}

	for _, fam := range []struct {
		name           string
		pod1, pod2, gw netip.Addr
	}{{name: "IPv4", pod1: p1.Addr4, pod2: p2.Addr4, gw: n.Gateway4}, {name: "IPv6", pod1: p1.Addr6, pod2: p2.Addr6, gw: n.Gateway6}} {
		t.Run(fam.name, func(t *testing.T) {
			// Pod to pod, in both directions.
			srv2 := startGreeter(t, p2, netip.AddrPortFrom(fam.pod2, 0), "pod 2")
			checkGreeterFrom(t, p1, srv2, "pod 2", fam.pod1)
			srv1 := startGreeter(t, p1, netip.AddrPortFrom(fam.pod1, 0), "pod 1")
			checkGreeterFrom(t, p2, srv1, "pod 1", fam.pod2)
			// Pod to its node's bridge.
			gw := startGreeter(t, n, netip.AddrPortFrom(fam.gw, 0), "node")
			checkGreeterFrom(t, p1, gw, "node", fam.pod1)
		})
	}
	checkThreadsHome(t)
}

func TestClusterPodsAcrossNodes(t *testing.T) {
	testenv.RequirePrivileged(t)
	enrolled := testenv.NewCgroup(t)
	c := testenv.NewCluster()
	a, b := c.AddNode(t), c.AddNode(t)
	if a.PodNet4.Overlaps(b.PodNet4) || a.PodNet6.Overlaps(b.PodNet6) {
		t.Fatalf("two nodes of a cluster got pod subnets %v, %v and %v, %v", a.PodNet4, a.PodNet6, b.PodNet4, b.PodNet6)
	}
	endA, endB := testenv.JoinNodes(t, a, b)
	for _, addr := range []netip.Addr{endA.Addr4, endA.Addr6, endB.Addr4, endB.Addr6} {
		if !nodeNet4.Contains(addr) && !nodeNet6.Contains(addr) {
			t.Errorf("wire address %v is outside %v and %v", addr, nodeNet4, nodeNet6)
		}
		for _, p := range []netip.Prefix{a.PodNet4, a.PodNet6, b.PodNet4, b.PodNet6} {
			if p.Contains(addr) {
				t.Errorf("wire address %v is in pod subnet %v", addr, p)
			}
		}
	}
	pa, pb := a.AddPod(t, enrolled), b.AddPod(t, enrolled)

	for _, fam := range []struct {
		name         string
		addrA, addrB netip.Addr
		wireB        netip.Addr
	}{{"IPv4", pa.Addr4, pb.Addr4, endB.Addr4}, {"IPv6", pa.Addr6, pb.Addr6, endB.Addr6}} {
		t.Run(fam.name, func(t *testing.T) {
			srvB := startGreeter(t, pb, netip.AddrPortFrom(fam.addrB, 0), "pod b")
			checkGreeterFrom(t, pa, srvB, "pod b", fam.addrA)
			srvA := startGreeter(t, pa, netip.AddrPortFrom(fam.addrA, 0), "pod a")
			checkGreeterFrom(t, pb, srvA, "pod a", fam.addrB)
			// The other node itself, by its wire address.
			node := startGreeter(t, b, netip.AddrPortFrom(fam.wireB, 0), "node b")
			checkGreeterFrom(t, pa, node, "node b", fam.addrA)
		})
	}
	checkThreadsHome(t)
}

func TestClusterTwinPodsKeepTheirTraffic(t *testing.T) {
	testenv.RequirePrivileged(t)
	enrolled := testenv.NewCgroup(t)
	c := testenv.NewCluster()
	a := c.AddNode(t)
	twin := a.Twin(t)
	if twin.PodNet4 != a.PodNet4 || twin.PodNet6 != a.PodNet6 {
		t.Fatalf("twin has pod subnets %v and %v, want %v and %v", twin.PodNet4, twin.PodNet6, a.PodNet4, a.PodNet6)
	}
	// Server and client on each node, with the same addresses as their
	// counterparts on the other.
	srvA, srvTwin := a.AddPod(t, enrolled), twin.AddPod(t, enrolled)
	cliA, cliTwin := a.AddPod(t, enrolled), twin.AddPod(t, enrolled)
	for _, pair := range [][2]*testenv.Pod{{srvA, srvTwin}, {cliA, cliTwin}} {
		if pair[0].Addr4 != pair[1].Addr4 || pair[0].Addr6 != pair[1].Addr6 {
			t.Fatalf("pods %v/%v and %v/%v: want the same addresses on node and twin",
				pair[0].Addr4, pair[0].Addr6, pair[1].Addr4, pair[1].Addr6)
		}
	}

	for _, fam := range []struct {
		name     string
		srv, cli netip.Addr
	}{{"IPv4", srvA.Addr4, cliA.Addr4}, {"IPv6", srvA.Addr6, cliA.Addr6}} {
		t.Run(fam.name, func(t *testing.T) {
			// One address, one port, two servers: a connection that
			// reached the wrong namespace would get the wrong greeting,
			// not a refusal.
			onA := startGreeter(t, srvA, netip.AddrPortFrom(fam.srv, 0), "node a")
			onTwin := startGreeter(t, srvTwin, onA, "twin")
			checkGreeterFrom(t, cliA, onA, "node a", fam.cli)
			checkGreeterFrom(t, cliTwin, onTwin, "twin", fam.cli)
		})
	}
	checkThreadsHome(t)
}

func TestClusterDeletePod(t *testing.T) {
	testenv.RequirePrivileged(t)
	enrolled := testenv.NewCgroup(t)
	n := testenv.NewClusterNode(t)
	p1, gone, p3 := n.AddPod(t, enrolled), n.AddPod(t, enrolled), n.AddPod(t, enrolled)

	type target struct {
		srv      netip.AddrPort
		greeting string
		from     netip.Addr
	}
	var targets []target
	for _, fam := range []struct{ p1, p3, gw netip.Addr }{
		{p1.Addr4, p3.Addr4, n.Gateway4}, {p1.Addr6, p3.Addr6, n.Gateway6},
	} {
		targets = append(targets,
			target{startGreeter(t, p3, netip.AddrPortFrom(fam.p3, 0), "pod 3"), "pod 3", fam.p1},
			target{startGreeter(t, n, netip.AddrPortFrom(fam.gw, 0), "node"), "node", fam.p1})
	}
	// Before and after: neighbour entries made before the delete must
	// stay good after it.
	for _, tg := range targets {
		checkGreeterFrom(t, p1, tg.srv, tg.greeting, tg.from)
	}
	ports := len(bridgePorts(t, n))

	h := testenv.StartHelper(t, gone.Cgroup, gone.Name, "cgroup-then-sleep")
	if _, err := h.ReadLine(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	gone.Delete(t)
	select {
	case <-h.Exited():
	case <-time.After(5 * time.Second):
		t.Errorf("the pod's process is still running 5s after Delete")
	}
	for _, path := range []string{filepath.Join("/run/netns", gone.Name), gone.Cgroup} {
		if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s still there after Delete (lstat: %v)", path, err)
		}
	}
	// The bridge port goes with the namespace, which the kernel tears down
	// in the background.
	for deadline := time.Now().Add(5 * time.Second); len(bridgePorts(t, n)) != ports-1; {
		if time.Now().After(deadline) {
			t.Fatalf("node still has %d interfaces 5s after Delete, want %d", len(bridgePorts(t, n)), ports-1)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("bridge port gone %v after Delete", time.Since(start).Round(time.Millisecond))
	gone.Delete(t) // a second time: nothing to do

	for _, tg := range targets {
		checkGreeterFrom(t, p1, tg.srv, tg.greeting, tg.from)
	}
	// A pod added now works too, with addresses of its own.
	p4 := n.AddPod(t, enrolled)
	if p4.Addr4 == gone.Addr4 || p4.Addr6 == gone.Addr6 {
		t.Errorf("a new pod got the deleted pod's addresses %v and %v at once", p4.Addr4, p4.Addr6)
	}
	checkGreeterFrom(t, p4, targets[0].srv, "pod 3", p4.Addr4)
	checkGreeterFrom(t, p4, targets[2].srv, "pod 3", p4.Addr6)
	checkThreadsHome(t)
}

// bridgePorts lists the interfaces of node n other than lo and the bridge.
func bridgePorts(t *testing.T, n *testenv.ClusterNode) []string {
	t.Helper()
	var ports []string
	err := n.Do(func() error {
		ifs, err := net.Interfaces()
		for _, ifc := range ifs {
			if ifc.Name != "lo" && ifc.Name != "br0" {
				ports = append(ports, ifc.Name)
			}
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return ports
}

// inNetns is a place to run code in: a Node, ClusterNode or Pod.
type inNetns interface {
	Do(fn func() error) error
}

// startGreeter listens on addr inside in (port 0: any) and returns where.
// Every connection it accepts is greeted with a line "<greeting> <the
// client's address>", then echoed. The listener closes in cleanup.
func startGreeter(t *testing.T, in inNetns, addr netip.AddrPort, greeting string) netip.AddrPort {
	t.Helper()
	var ln *net.TCPListener
	if err := in.Do(func() (err error) {
		ln, err = net.ListenTCP("tcp", net.TCPAddrFromAddrPort(addr))
		return err
	}); err != nil {
		t.Fatalf("listening on %v: %v", addr, err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return // closed
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				peer := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
				if _, err := fmt.Fprintf(c, "%s %v\n", greeting, peer); err != nil {
					return
				}
				if _, err := io.Copy(c, c); err == nil {
					c.CloseWrite()
				}
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// checkGreeterFrom connects from inside from to the greeter at srv and
// checks the greeting it gets, that the greeter saw the connection come from
// wantPeer (no address translation on the way), and that 256 KiB of random
// bytes come back as sent.
func checkGreeterFrom(t *testing.T, from inNetns, srv netip.AddrPort, wantGreeting string, wantPeer netip.Addr) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	var conn *net.TCPConn
	if err := from.Do(func() error {
		d := net.Dialer{Deadline: deadline}
		c, err := d.Dial("tcp", srv.String())
		if err == nil {
			conn = c.(*net.TCPConn)
		}
		return err
	}); err != nil {
		t.Fatalf("connecting to %v: %v", srv, err)
	}
	defer conn.Close()
	conn.SetDeadline(deadline)

	r := bufio.NewReader(conn)
	line, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("reading the greeting of %v: %v", srv, err)
	}
	if want := fmt.Sprintf("%s %v\n", wantGreeting, wantPeer); line != want {
		t.Errorf("%v greeted with %q, want %q", srv, line, want)
	}

	want := make([]byte, 256<<10)
	rand.Read(want)
	werr := make(chan error, 1)
	go func() {
		_, err := conn.Write(want)
		if err == nil {
			err = conn.CloseWrite()
		}
		werr <- err
	}()
	got, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("reading the echo of %v: %v", srv, err)
	}
	if err := <-werr; err != nil {
		t.Fatalf("writing to %v: %v", srv, err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("echo of %v differs: got %d bytes, sent %d", srv, len(got), len(want))
	}
}
