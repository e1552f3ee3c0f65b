package datapath

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/cgroups"
	"github.com/smesh-dev/smesh/pkg/proxy"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// identityHelpers are the helper processes of the identity and policy tests.
var identityHelpers = map[string]testenv.HelperFunc{
	"srcid-proxy": srcIDProxy,
	"line-client": lineClient,
	"echo-server": echoServer,
}

// srcIDProxy stands in for smeshd's outbound listeners (in the helper's
// cgroup, as smeshd's are in smeshd's): it listens on 127.0.0.1 and ::1,
// prints both addresses, and answers every connection with one line, "src
// N dst D" (SMESH_SO_SRC_ID and SO_ORIGINAL_DST, or the error), then echoes
// what it reads, line by line.
func srcIDProxy([]string) int {
	ln4, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println(err)
		return 1
	}
	ln6, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		fmt.Println(err)
		return 1
	}
	fmt.Println(ln4.Addr(), ln6.Addr())
	serve := func(ln net.Listener) {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				tc := c.(*net.TCPConn)
				dst, derr := proxy.OriginalDst(tc)
				src, serr := proxy.OriginalSource(tc)
				fmt.Fprintf(c, "src %d %v dst %v %v\n", src, serr, dst, derr)
				echoLines(c)
			}()
		}
	}
	go serve(ln6)
	serve(ln4)
	return 0
}

func echoLines(c net.Conn) {
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		if _, err := c.Write([]byte(line)); err != nil {
			return
		}
	}
}

// echoServer listens on args[0], prints its address, and echoes every
// connection line by line.
func echoServer(args []string) int {
	ln, err := net.Listen("tcp", args[0])
	if err != nil {
		fmt.Println(err)
		return 1
	}
	fmt.Println(ln.Addr())
	for {
		c, err := ln.Accept()
		if err != nil {
			return 0
		}
		go func() {
			defer c.Close()
			echoLines(c)
		}()
	}
}

// lineClient takes commands on stdin and prints one line for each:
//   - "dial ADDR": connects, sends a line, reads it back (after the one
//     line srcIDProxy sends first when "greeting" follows), closes; prints
//     "ok [GREETING]", "refused", "eperm" or "error ...".
//   - "open ADDR": connects and keeps the connection; prints "ok".
//   - "ping": a line through the kept connection and back; prints "ok".
func lineClient([]string) int {
	var held net.Conn
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		switch {
		case len(f) >= 2 && (f[0] == "dial" || f[0] == "open"):
			c, err := net.DialTimeout("tcp", f[1], 3*time.Second)
			switch {
			case errors.Is(err, syscall.ECONNREFUSED):
				fmt.Println("refused")
				continue
			case errors.Is(err, syscall.EPERM):
				fmt.Println("eperm")
				continue
			case err != nil:
				fmt.Println("error", err)
				continue
			}
			r := bufio.NewReader(c)
			greeting := ""
			if len(f) == 3 && f[2] == "greeting" {
				c.SetReadDeadline(time.Now().Add(3 * time.Second))
				greeting, err = r.ReadString('\n')
				if err != nil {
					fmt.Println("error reading the greeting:", err)
					c.Close()
					continue
				}
			}
			if err := echoOnce(c, r); err != nil {
				fmt.Println("error", err)
				c.Close()
				continue
			}
			if f[0] == "open" {
				if held != nil {
					held.Close()
				}
				held = c
			} else {
				c.Close()
			}
			fmt.Println(strings.TrimSpace("ok " + greeting))
		case len(f) == 1 && f[0] == "ping":
			if held == nil {
				fmt.Println("error: no connection")
				continue
			}
			if err := echoOnce(held, bufio.NewReader(held)); err != nil {
				fmt.Println("error", err)
				continue
			}
			fmt.Println("ok")
		default:
			fmt.Println("error: unknown command", in.Text())
		}
	}
	return 0
}

// echoOnce sends a line through c and checks that r reads it back.
func echoOnce(c net.Conn, r *bufio.Reader) error {
	want := fmt.Sprintf("marker %d\n", time.Now().UnixNano())
	c.SetDeadline(time.Now().Add(3 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte(want)); err != nil {
		return err
	}
	got, err := r.ReadString('\n')
	if err != nil {
		return err
	}
	if got != want {
		return fmt.Errorf("echoed %q, want %q", got, want)
	}
	return nil
}

// subCgroup makes a cgroup below parent (a test's: removed with it).
func subCgroup(t *testing.T, parent, name string) (string, uint64) {
	t.Helper()
	path := filepath.Join(parent, name)
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
	id, err := cgroups.ID(path)
	if err != nil {
		t.Fatal(err)
	}
	return path, id
}

func cgroupID(t *testing.T, path string) uint64 {
	t.Helper()
	id, err := cgroups.ID(path)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// command sends a line to h and returns its answer.
func command(t *testing.T, h *testenv.Helper, line string) string {
	t.Helper()
	if err := h.Send(line); err != nil {
		t.Fatal(err)
	}
	out, err := h.ReadLine(10 * time.Second)
	if err != nil {
		t.Fatalf("%s: %v (stderr: %s)", line, err, h.Stderr())
	}
	return out
}

// TestSourceIdentity: connections captured from two workload cgroups (and
// from a cgroup below the enrolled one that no workload names, and from a
// deeper one below a workload) reach smeshd's listeners with the source
// number of the nearest cgroup smesh_identity names, over IPv4 and IPv6,
// bytes through the captured path.
func TestSourceIdentity(t *testing.T) {
	testenv.RequirePrivileged(t)
	proxyCg, enrolled := testenv.NewCgroup(t), testenv.NewCgroup(t)
	a, aID := subCgroup(t, enrolled, "a.service")
	b, bID := subCgroup(t, enrolled, "b.service")
	other, _ := subCgroup(t, enrolled, "other")
	deep, _ := subCgroup(t, b, "inner")
	deeper, _ := subCgroup(t, deep, "leaf")

	p4, p6 := startSrcIDProxy(t, proxyCg)
	opts := handoverOpts(ModeSplice, p4, proxyCg)
	opts.ProxyAddr6 = p6
	opts.IncludeCIDRs = []netip.Prefix{netip.MustParsePrefix("198.18.0.0/15"), netip.MustParsePrefix("fd00:5e::/32")}
	d, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	if err := d.SetNamespace(ownNetnsCookie(t), nil, true, true); err != nil {
		t.Fatal(err)
	}
	if err := d.SetCapture([]string{enrolled}, opts.IncludeCIDRs, nil, nil); err != nil {
		t.Fatal(err)
	}
	d.Commit()
	const enrolledNum, aNum, bNum = 3, 0x10005, 0xabcdef07
	if err := d.SetIdentities(map[uint64]uint32{cgroupID(t, enrolled): enrolledNum, aID: aNum, bID: bNum}); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		cgroup string
		want   uint32
	}{{a, aNum}, {b, bNum}, {other, enrolledNum}, {deeper, bNum}} {
		c := testenv.StartHelper(t, tc.cgroup, "", "line-client")
		for _, dst := range []string{"198.18.0.1:80", "[fd00:5e::1]:8080"} {
			got := command(t, c, "dial "+dst+" greeting")
			want := fmt.Sprintf("ok src %d <nil> dst %s <nil>", tc.want, dst)
			if got != want {
				t.Errorf("from %s to %s: %q, want %q", filepath.Base(tc.cgroup), dst, got, want)
			}
		}
	}
}

// TestSamePolicy: same-node policy in connect4/6. A denied source gets
// ECONNREFUSED from connect(), an allowed one passes bytes, a source no
// entry names is denied (policy 0), and a policy change flips both for new
// connections while an open connection keeps working. A destination
// without policy is not decided.
func TestSameNodePolicy(t *testing.T) {
	testenv.RequirePrivileged(t)
	if err := HaveSetRetval(); err != nil {
		testenv.SkipOrFail(t, "this kernel refuses with EPERM, not ECONNREFUSED: %v", err)
	}
	proxyCg, enrolled := testenv.NewCgroup(t), testenv.NewCgroup(t)
	a, aID := subCgroup(t, enrolled, "a.service")
	b, bID := subCgroup(t, enrolled, "b.service")
	other, _ := subCgroup(t, enrolled, "other")
	srv, srvID := subCgroup(t, enrolled, "srv.service")
	free, _ := subCgroup(t, enrolled, "free.service")

	proxyLn := listenCounting(t)
	opts := handoverOpts(ModeSplice, proxyLn.addr, proxyCg)
	d, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	if err := d.SetNamespace(ownNetnsCookie(t), nil, true, true); err != nil {
		t.Fatal(err)
	}
	if err := d.SetCapture([]string{enrolled}, opts.IncludeCIDRs, nil, nil); err != nil {
		t.Fatal(err)
	}
	d.Commit()
	const aNum, bNum, srvNum, freeNum, enrolledNum = 5, 7, 20, 21, 3
	if err := d.SetIdentities(map[uint64]uint32{aID: aNum, bID: bNum, srvID: srvNum, cgroupID(t, enrolled): enrolledNum}); err != nil {
		t.Fatal(err)
	}
	// Workload addresses: loopback ones stand in for pod addresses here
	// (same node either way: connect4 leaves them uncaptured, sock_ops
	// splices them).
	srvAddr, freeAddr := netip.MustParseAddr("127.0.0.9"), netip.MustParseAddr("127.0.0.10")
	srvAddr6 := netip.MustParseAddr("::1")
	if err := d.SetAddrIDs(map[netip.Addr]uint32{srvAddr: srvNum, srvAddr6: srvNum, freeAddr: freeNum}); err != nil {
		t.Fatal(err)
	}
	start := func(cg, addr string) string {
		h := testenv.StartHelper(t, cg, "", "echo-server", addr)
		l, err := h.ReadLine(10 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	dst := start(srv, "127.0.0.9:0")
	dst6 := start(srv, "[::1]:0")
	freeDst := start(free, "127.0.0.10:0")
	port, port6 := netip.MustParseAddrPort(dst).Port(), netip.MustParseAddrPort(dst6).Port()

	if err := d.SetPolicy([]PolicyEntry{
		{Dst: srvNum, Src: aNum, Port: port, Allow: true, Policy: 1},
		{Dst: srvNum, Src: aNum, Port: port6, Allow: true, Policy: 1},
		{Dst: srvNum, Src: bNum, Port: 0, Allow: false, Policy: 2},
	}); err != nil {
		t.Fatal(err)
	}
	ca := testenv.StartHelper(t, a, "", "line-client")
	cb := testenv.StartHelper(t, b, "", "line-client")
	co := testenv.StartHelper(t, other, "", "line-client")
	check := func(c *testenv.Helper, cmd, want string) {
		t.Helper()
		if got := command(t, c, cmd); got != want {
			t.Errorf("%s: %q, want %q", cmd, got, want)
		}
	}
	check(ca, "open "+dst, "ok")
	check(ca, "dial "+dst6, "ok")
	check(cb, "dial "+dst, "refused")
	check(cb, "dial "+dst6, "refused")
	check(co, "dial "+dst, "refused")
	check(cb, "dial "+freeDst, "ok")
	check(co, "dial "+freeDst, "ok")

	// Flipped: b allowed on that port, a denied everywhere, the rest on
	// to "any source": allowed.
	if err := d.SetPolicy([]PolicyEntry{
		{Dst: srvNum, Src: bNum, Port: port, Allow: true, Policy: 1},
		{Dst: srvNum, Src: aNum, Port: 0, Allow: false, Policy: 3},
		{Dst: srvNum, Src: UnknownIdentity, Port: 0, Allow: true, Policy: 4},
	}); err != nil {
		t.Fatal(err)
	}
	check(ca, "ping", "ok") // opened before the change
	check(ca, "dial "+dst, "refused")
	check(cb, "dial "+dst, "ok")
	check(co, "dial "+dst, "ok")
	check(ca, "ping", "ok")

	denied, err := d.PolicyDenied()
	if err != nil {
		t.Fatal(err)
	}
	if denied[2] != 2 || denied[0] != 1 || denied[3] != 1 {
		t.Errorf("denied by policy: %v, want 2 under 2, 1 under 0, 1 under 3", denied)
	}
	var n int
	var k, v []byte
	it := d.connect.SmeshPolicy.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if n != 3+1 {
		t.Errorf("smesh_policy has %d entries, want the 3 verdicts and 1 policed marker of the last generation", n)
	}
	// Nothing went through smeshd: same-node connects are spliced, not
	// captured.
	if n := proxyLn.n.Load(); n != 0 {
		t.Errorf("%d connects captured", n)
	}
}

// startSrcIDProxy starts srcIDProxy in cgroup and returns its addresses.
func startSrcIDProxy(t *testing.T, cgroup string) (p4, p6 netip.AddrPort) {
	t.Helper()
	p := testenv.StartHelper(t, cgroup, "", "srcid-proxy")
	line, err := p.ReadLine(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	addrs := strings.Fields(line)
	if len(addrs) != 2 {
		t.Fatalf("proxy said %q", line)
	}
	return netip.MustParseAddrPort(addrs[0]), netip.MustParseAddrPort(addrs[1])
}

// TestIdentityFromPredecessorWithout: a predecessor whose build had none of
// the identity maps hands over; the successor makes them anew (empty),
// adopts the others, captures on without a gap, and the connections it
// captures carry their source; its policy maps work.
func TestIdentityFromPredecessorWithout(t *testing.T) {
	testenv.RequirePrivileged(t)
	proxyCg, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
	direct := listenCounting(t)
	p4, p6 := startSrcIDProxy(t, proxyCg)
	// Copy mode: the loop's loopback destination is captured.
	opts := handoverOpts(ModeCopy, p4, proxyCg)
	opts.ProxyAddr6 = p6
	pre := predecessor(t, opts, app)
	if err := pre.SetNamespace(ownNetnsCookie(t), nil, true, true); err != nil {
		t.Fatal(err)
	}
	client := testenv.StartHelper(t, app, "", "line-client")
	dst := direct.addr.String()
	if got, want := command(t, client, "dial "+dst+" greeting"), fmt.Sprintf("ok src 0 <nil> dst %s <nil>", dst); got != want {
		t.Fatalf("through the predecessor: %q, want %q", got, want)
	}
	loop := testenv.StartHelper(t, app, "", "connect-loop", dst)
	time.Sleep(200 * time.Millisecond)
	files, err := pre.Handover()
	if err != nil {
		t.Fatal(err)
	}
	newMaps := []string{"smesh_identity", "smesh_ident_cfg", "smesh_addr_ids", "smesh_port_ids", "smesh_policy", "smesh_policy_denied", "smesh_src_sk", "smesh_src_ids"}
	for _, m := range newMaps {
		name := mapHandoverName(m)
		f, ok := files[name]
		if !ok {
			t.Fatalf("the hand-over has no %s", name)
		}
		f.Close()
		delete(files, name)
	}
	old := mapIDs(t, pre)
	b := successor(t, opts, files)
	err = b.SetCapture([]string{app}, opts.IncludeCIDRs, nil, nil)
	closeFiles(files)
	if err != nil {
		t.Fatal(err)
	}
	b.Commit()
	if err := pre.Release(); err != nil {
		t.Fatal(err)
	}
	now := mapIDs(t, b)
	for _, m := range newMaps {
		if now[m] == old[m] {
			t.Errorf("the successor uses the predecessor's %s, which was not handed over", m)
		}
	}
	if now["smesh_orig_dst"] != old["smesh_orig_dst"] || now["smesh_sk_state"] != old["smesh_sk_state"] {
		t.Error("the successor made smesh_orig_dst or smesh_sk_state anew")
	}
	if err := b.SetIdentities(map[uint64]uint32{cgroupID(t, app): 9}); err != nil {
		t.Fatal(err)
	}
	if got, want := command(t, client, "dial "+dst+" greeting"), fmt.Sprintf("ok src 9 <nil> dst %s <nil>", dst); got != want {
		t.Errorf("through the successor: %q, want %q", got, want)
	}
	if err := b.SetPolicy([]PolicyEntry{{Dst: 20, Src: 9, Allow: true, Policy: 1}}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if err := loop.Send("stop"); err != nil {
		t.Fatal(err)
	}
	line, err := loop.ReadLine(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	// Failed connects are not counted against the hand-over here: the
	// loop makes thousands a second against srcIDProxy, a helper whose
	// accept loop can fall more than a second behind on a loaded machine
	// (a dial timed out once in ~40 runs, load 8 on 2 CPUs); capture
	// continuity with none failed is TestHandoverKeepsCapture's. What
	// counts here is that none went out uncaptured.
	var ok, failed int
	if _, err := fmt.Sscanf(line, "ok %d failed %d", &ok, &failed); err != nil || ok == 0 {
		t.Errorf("connect loop across the hand-over: %q (%.800s)", line, loop.Stderr())
	} else if failed != 0 {
		t.Logf("connect loop across the hand-over: %q (%.800s)", line, loop.Stderr())
	}
	if n := direct.n.Load(); n != 0 {
		t.Errorf("%d connects uncaptured across the hand-over", n)
	}
}

// TestSameNodePolicyByPort: a workload in a namespace it shares with others
// (a systemd unit in the node's namespace) is a policy destination by the
// ports it serves (smesh_port_ids). A connect() to such a port, on loopback
// or on an address of the node's namespace, from the node's namespace or
// from a pod, over IPv4 and IPv6, is decided by the port owner's policy: a
// denied source gets ECONNREFUSED, an allowed one passes bytes. Another port
// of that namespace is not decided.
func TestSameNodePolicyByPort(t *testing.T) {
	testenv.RequirePrivileged(t)
	if err := HaveSetRetval(); err != nil {
		testenv.SkipOrFail(t, "this kernel refuses with EPERM, not ECONNREFUSED: %v", err)
	}
	node := testenv.NewClusterNode(t)
	pod := node.AddPod(t, "")
	proxyCg, enrolled := testenv.NewCgroup(t), testenv.NewCgroup(t)
	a, aID := subCgroup(t, enrolled, "a.service")
	b, bID := subCgroup(t, enrolled, "b.service")
	srv, srvID := subCgroup(t, enrolled, "payments.service")
	free, _ := subCgroup(t, enrolled, "free.service")

	opts := handoverOpts(ModeSplice, netip.MustParseAddrPort("127.0.0.1:18000"), proxyCg)
	d, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	var nodeNs, podNs uint64
	if err := node.Do(func() (err error) { nodeNs, err = currentNetnsCookie(); return err }); err != nil {
		t.Fatal(err)
	}
	if err := pod.Do(func() (err error) { podNs, err = currentNetnsCookie(); return err }); err != nil {
		t.Fatal(err)
	}
	if err := d.SetNamespace(nodeNs, []netip.Addr{node.Gateway4, node.Gateway6}, false, false); err != nil {
		t.Fatal(err)
	}
	if err := d.SetNamespace(podNs, []netip.Addr{pod.Addr4, pod.Addr6}, false, false); err != nil {
		t.Fatal(err)
	}
	// Not captured (no listeners, fail open): decided and left alone.
	if err := d.SetCapture([]string{enrolled, pod.Cgroup}, opts.IncludeCIDRs, nil, nil); err != nil {
		t.Fatal(err)
	}
	d.Commit()
	const aNum, bNum, srvNum, podNum = 5, 7, 20, 8
	podID := cgroupID(t, pod.Cgroup)
	if err := d.SetIdentities(map[uint64]uint32{aID: aNum, bID: bNum, srvID: srvNum, podID: podNum}); err != nil {
		t.Fatal(err)
	}
	start := func(cg, addr string) uint16 {
		h := testenv.StartHelper(t, cg, node.Name, "echo-server", addr)
		l, err := h.ReadLine(10 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return netip.MustParseAddrPort(l).Port()
	}
	port := start(srv, "[::]:0") // every address of the node's namespace
	freePort := start(free, "[::]:0")
	if err := d.SetPortIDs(map[PortKey]uint32{{Netns: nodeNs, Port: port}: srvNum}); err != nil {
		t.Fatal(err)
	}
	if got, err := d.PortIDs(); err != nil || len(got) != 1 || got[PortKey{nodeNs, port}] != srvNum {
		t.Fatalf("PortIDs: %v %v", got, err)
	}
	if err := d.SetPolicy([]PolicyEntry{
		{Dst: srvNum, Src: aNum, Port: port, Allow: true, Policy: 1},
		{Dst: srvNum, Src: podNum, Port: port, Allow: true, Policy: 1},
	}); err != nil {
		t.Fatal(err)
	}
	ca := testenv.StartHelper(t, a, node.Name, "line-client")
	cb := testenv.StartHelper(t, b, node.Name, "line-client")
	cp := testenv.StartHelper(t, pod.Cgroup, pod.Name, "line-client")
	at := func(ip netip.Addr, p uint16) string { return netip.AddrPortFrom(ip, p).String() }
	nodeDsts := []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1"), node.Gateway4, node.Gateway6}
	check := func(c *testenv.Helper, cmd, want string) {
		t.Helper()
		if got := command(t, c, cmd); got != want {
			t.Errorf("%s: %q, want %q", cmd, got, want)
		}
	}
	for _, ip := range nodeDsts {
		check(ca, "dial "+at(ip, port), "ok")
		check(cb, "dial "+at(ip, port), "refused")
		check(cb, "dial "+at(ip, freePort), "ok")
	}
	check(cp, "dial "+at(node.Gateway4, port), "ok")
	check(cp, "dial "+at(node.Gateway6, port), "ok")
	check(cp, "dial "+at(node.Gateway4, freePort), "ok")

	// The pod's allow gone: it is refused, a still passes.
	if err := d.SetPolicy([]PolicyEntry{{Dst: srvNum, Src: aNum, Port: port, Allow: true, Policy: 1}}); err != nil {
		t.Fatal(err)
	}
	check(cp, "dial "+at(node.Gateway4, port), "refused")
	check(cp, "dial "+at(node.Gateway6, port), "refused")
	check(ca, "dial "+at(node.Gateway4, port), "ok")

	denied, err := d.PolicyDenied()
	if err != nil {
		t.Fatal(err)
	}
	if denied[0] != uint64(len(nodeDsts))+2 {
		t.Errorf("denied by policy: %v, want %d under 0", denied, len(nodeDsts)+2)
	}
	// The ports gone: nothing is decided.
	if err := d.SetPortIDs(nil); err != nil {
		t.Fatal(err)
	}
	check(cp, "dial "+at(node.Gateway4, port), "ok")
	check(cb, "dial "+at(netip.MustParseAddr("127.0.0.1"), port), "ok")
}
