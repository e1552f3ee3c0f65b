package sandbox_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/smesh-dev/smesh/pkg/cgroups"
	"github.com/smesh-dev/smesh/pkg/sandbox"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// testNetns is the network namespace the test binary started in; no thread
// of it may be anywhere else once a sandbox call has returned.
var testNetns string

func TestMain(m *testing.M) {
	testNetns, _ = os.Readlink("/proc/self/ns/net")
	os.Exit(m.Run())
}

func TestNamedNetns(t *testing.T) {
	requireRoot(t)
	name := testenv.Unique("smesh-test")
	ns := newNetns(t, name)
	path := filepath.Join("/run/netns", name)

	// What the handle refers to is what the name resolves to, and it is
	// not where the test runs.
	inside := netnsOf(t, ns)
	if inside == testNetns {
		t.Fatalf("InNetns ran fn in the test's own network namespace %s", testNetns)
	}
	byName, err := netns.GetFromName(name)
	if err != nil {
		t.Fatalf("opening %s: %v", path, err)
	}
	if got := netnsOf(t, byName); got != inside {
		t.Errorf("%s is %s, the handle %s", path, got, inside)
	}
	byName.Close()

	// lo is up: 127.0.0.1 answers.
	err = sandbox.InNetns(ns, func() error {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			return err
		}
		defer ln.Close()
		c, err := net.DialTimeout("tcp4", ln.Addr().String(), 5*time.Second)
		if err != nil {
			return err
		}
		return c.Close()
	})
	if err != nil {
		t.Errorf("connecting to 127.0.0.1 inside: %v", err)
	}

	// A taken name is an error that leaves the namespace alone.
	if again, err := sandbox.NewNamedNetns(name); !errors.Is(err, fs.ErrExist) {
		if err == nil {
			again.Close()
		}
		t.Errorf("NewNamedNetns(%q) a second time: error %v, want one wrapping fs.ErrExist", name, err)
	}
	if got := netnsOfPath(t, path); got != inside {
		t.Errorf("after the second NewNamedNetns, %s is %s, want still %s", path, got, inside)
	}

	if err := sandbox.DeleteNamedNetns(name); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s still exists after DeleteNamedNetns (lstat: %v)", path, err)
	}
	if err := sandbox.DeleteNamedNetns(name); err != nil {
		t.Errorf("DeleteNamedNetns of a deleted name: %v", err)
	}
	checkThreadsHome(t)
}

func TestInNetnsPanic(t *testing.T) {
	requireRoot(t)
	ns := newNetns(t, testenv.Unique("smesh-test"))
	err := sandbox.InNetns(ns, func() error { panic("boom") })
	if err == nil || !strings.Contains(err.Error(), "panic: boom") {
		t.Errorf("InNetns(panicking fn) = %v, want an error with the panic", err)
	}
	want := errors.New("from fn")
	if err := sandbox.InNetns(ns, func() error { return want }); err != want {
		t.Errorf("InNetns() = %v, want fn's error %v", err, want)
	}
	checkThreadsHome(t)
}

func TestStart(t *testing.T) {
	mount := requireRoot(t)
	name := testenv.Unique("smesh-test")
	ns := newNetns(t, name)
	cg := filepath.Join(mount, testenv.Unique("smesh-test"))
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cgroups.Remove(cg, 5*time.Second); err != nil {
			t.Error(err)
		}
	})

	// sh's own view, read with builtins: /proc/self is sh, not a child.
	const script = `while read -r l; do echo "$l"; done </proc/self/cgroup; readlink /proc/$$/ns/net`
	run := func(cgroup, netnsName string) (cgroupLine, netnsLink string) {
		t.Helper()
		var out bytes.Buffer
		cmd := exec.Command("sh", "-c", script)
		cmd.Stdout, cmd.Stderr = &out, &out
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := sandbox.Start(cmd, cgroup, netnsName); err != nil {
			t.Fatalf("Start(%q, %q): %v", cgroup, netnsName, err)
		}
		if err := cmd.Wait(); err != nil {
			t.Fatalf("sh: %v: %s", err, out.String())
		}
		if a := cmd.SysProcAttr; !a.Setpgid || a.Pdeathsig != syscall.SIGKILL {
			t.Errorf("SysProcAttr after Start = %+v, want Setpgid kept and Pdeathsig SIGKILL", a)
		}
		for line := range strings.Lines(out.String()) {
			line = strings.TrimSpace(line)
			if cgl, ok := strings.CutPrefix(line, "0::"); ok {
				cgroupLine = cgl
			} else if strings.HasPrefix(line, "net:") {
				netnsLink = line
			}
		}
		return cgroupLine, netnsLink
	}

	gotCg, gotNs := run(cg, name)
	if want := "/" + filepath.Base(cg); gotCg != want {
		t.Errorf("process ran in cgroup %q, want %q", gotCg, want)
	}
	if want := netnsOf(t, ns); gotNs != want {
		t.Errorf("process ran in network namespace %q, want %q", gotNs, want)
	}

	own, err := cgroups.Of(mount, 0)
	if err != nil {
		t.Fatal(err)
	}
	gotCg, gotNs = run("", "")
	if want := "/" + strings.TrimPrefix(strings.TrimPrefix(own, mount), "/"); gotCg != want {
		t.Errorf("with no cgroup given, process ran in cgroup %q, want the test's, %q", gotCg, want)
	}
	if gotNs != testNetns {
		t.Errorf("with no namespace given, process ran in network namespace %q, want the test's, %q", gotNs, testNetns)
	}

	cmd := exec.Command("true")
	if err := sandbox.Start(cmd, "", testenv.Unique("smesh-test-missing")); err == nil {
		cmd.Wait()
		t.Error("Start in a namespace that does not exist: no error")
	}
	checkThreadsHome(t)
}

func TestVeth(t *testing.T) {
	requireRoot(t)
	a, b := newNetns(t, testenv.Unique("smesh-test")), newNetns(t, testenv.Unique("smesh-test"))
	addrA, addrB := netip.MustParsePrefix("198.18.0.1/24"), netip.MustParsePrefix("198.18.0.2/24")
	if err := sandbox.Veth(a, b, "eth0", "eth1", addrA, addrB); err != nil {
		t.Fatal(err)
	}
	// Without addresses.
	if err := sandbox.Veth(a, b, "eth7", "eth8", netip.Prefix{}, netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	for _, end := range []struct {
		ns    netns.NsHandle
		names []string
		addr  netip.Prefix
	}{{a, []string{"eth0", "eth7"}, addrA}, {b, []string{"eth1", "eth8"}, addrB}} {
		err := sandbox.InNetns(end.ns, func() error {
			ifs, err := net.Interfaces()
			if err != nil {
				return err
			}
			var names []string
			for _, ifc := range ifs {
				names = append(names, ifc.Name)
				if ifc.Name == "lo" {
					continue
				}
				if ifc.Flags&net.FlagRunning == 0 {
					t.Errorf("%s is not running: %v", ifc.Name, ifc.Flags)
				}
				addrs, err := ifc.Addrs()
				if err != nil {
					return err
				}
				var v4 []string
				for _, a := range addrs {
					if ipn := a.(*net.IPNet); ipn.IP.To4() != nil {
						v4 = append(v4, ipn.String())
					}
				}
				want := []string{end.addr.String()}
				if ifc.Name == end.names[1] {
					want = nil
				}
				if !slices.Equal(v4, want) {
					t.Errorf("%s has IPv4 addresses %v, want %v", ifc.Name, v4, want)
				}
			}
			slices.Sort(names)
			if want := append([]string{}, end.names...); !slices.Equal(names, append(want, "lo")) {
				t.Errorf("interfaces %v, want %v and lo", names, end.names)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}

	// Bytes cross, right away: carrier is on.
	var ln net.Listener
	if err := sandbox.InNetns(b, func() (err error) {
		ln, err = net.Listen("tcp4", netip.AddrPortFrom(addrB.Addr(), 0).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.Copy(c, c)
	}()
	var c net.Conn
	if err := sandbox.InNetns(a, func() (err error) {
		c, err = net.DialTimeout("tcp4", ln.Addr().String(), 5*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping\n")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping\n" {
		t.Errorf("echo = %q, %v; want %q", buf, err, "ping\n")
	}
	if got := c.LocalAddr().(*net.TCPAddr).AddrPort().Addr(); got != addrA.Addr() {
		t.Errorf("connection from %v, want %v", got, addrA.Addr())
	}
	checkThreadsHome(t)
}

// newNetns creates the named network namespace name, deleted in cleanup.
func newNetns(t *testing.T, name string) netns.NsHandle {
	t.Helper()
	ns, err := sandbox.NewNamedNetns(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ns.Close()
		if err := sandbox.DeleteNamedNetns(name); err != nil {
			t.Error(err)
		}
	})
	return ns
}

// netnsOf returns the network namespace ns, as /proc/*/ns/net links name it.
func netnsOf(t *testing.T, ns netns.NsHandle) string {
	t.Helper()
	var link string
	if err := sandbox.InNetns(ns, func() (err error) {
		link, err = os.Readlink("/proc/thread-self/ns/net")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return link
}

// netnsOfPath is netnsOf for the namespace bind-mounted at path.
func netnsOfPath(t *testing.T, path string) string {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("net:[%d]", st.Ino)
}

// checkThreadsHome fails t if any thread of the test binary was left in
// another network namespace than the one it started in.
func checkThreadsHome(t *testing.T) {
	t.Helper()
	stray, err := sandbox.StrayThreads(testNetns)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range stray {
		t.Errorf("%s, the test started in %s", s, testNetns)
	}
}

// requireRoot returns the cgroup v2 mount, or skips t (fails it with
// SMESH_REQUIRE_PRIVILEGED=1) when it cannot make namespaces and cgroups.
func requireRoot(t *testing.T) string {
	t.Helper()
	testenv.RequirePrivileged(t)
	mount, err := cgroups.Mount()
	if err != nil {
		t.Fatal(err)
	}
	return mount
}

// unique returns prefix-<8 random hex digits>, a name no concurrent test
// binary picks too.

func TestSetSysctl(t *testing.T) {
	requireRoot(t)
	name := testenv.Unique("smesh-test")
	ns := newNetns(t, name)
	const key = "net/ipv6/conf/all/forwarding"
	own, err := os.ReadFile("/proc/sys/" + key)
	if err != nil {
		t.Fatal(err)
	}
	want := "1"
	if strings.TrimSpace(string(own)) == "1" {
		want = "0"
	}
	if err := sandbox.SetSysctl(ns, key, want); err != nil {
		t.Fatal(err)
	}
	// Read by a process of its own in the namespace, every thread of
	// which is in it: no question which namespace it sees.
	if got := sysctlIn(t, name, key); got != want {
		t.Errorf("%s in the namespace = %q after SetSysctl(%q), want %q", key, got, want, want)
	}
	if again, err := os.ReadFile("/proc/sys/" + key); err != nil || !bytes.Equal(again, own) {
		t.Errorf("%s of the test's own namespace changed from %q to %q (%v)", key, own, again, err)
	}

	for _, bad := range []string{"net/ipv4/no_such_sysctl", "../sys/net/ipv4/ip_forward", "/proc/sys/net/ipv4/ip_forward"} {
		if err := sandbox.SetSysctl(ns, bad, "1"); err == nil {
			t.Errorf("SetSysctl(%q): no error", bad)
		}
	}
	checkThreadsHome(t)
}

func TestClusterNode(t *testing.T) {
	mount := requireRoot(t)
	ip := testenv.RequireCommand(t, "ip")
	parent := filepath.Join(mount, testenv.Unique("smesh-test"))
	if err := os.Mkdir(parent, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cgroups.Remove(parent, 5*time.Second); err != nil {
			t.Error(err)
		}
	})
	pod4, pod6 := netip.MustParsePrefix("198.18.0.0/24"), netip.MustParsePrefix("fd00:5e::/64")
	n := newClusterNode(t, pod4, pod6)

	if got, want := n.Gateway4(), netip.MustParseAddr("198.18.0.1"); got != want {
		t.Errorf("Gateway4() = %v, want %v", got, want)
	}
	if got, want := n.Gateway6(), netip.MustParseAddr("fd00:5e::1"); got != want {
		t.Errorf("Gateway6() = %v, want %v", got, want)
	}
	for _, key := range []string{"net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding", "net/ipv6/conf/" + sandbox.BridgeName + "/forwarding"} {
		if got := sysctlIn(t, n.Name, key); got != "1" {
			t.Errorf("%s in the node = %q, want 1", key, got)
		}
	}
	mac, addrs := bridgeOf(t, n)
	if mac[0] != 0xfe {
		t.Errorf("bridge MAC %v, want one starting with fe", mac)
	}
	if want := []string{"198.18.0.1/24", "fd00:5e::1/64"}; !slices.Equal(addrs, want) {
		t.Errorf("bridge has addresses %v, want %v", addrs, want)
	}

	type podWant struct{ addr4, addr6 string }
	addPod := func(want podWant) *sandbox.Pod {
		t.Helper()
		name := testenv.Unique("smesh-test")
		p, err := n.AddPod(name, filepath.Join(parent, name))
		if err != nil {
			t.Fatal(err)
		}
		if p.Name != name || p.Cgroup != filepath.Join(parent, name) ||
			p.Addr4.String() != want.addr4 || p.Addr6.String() != want.addr6 {
			t.Errorf("AddPod(%q) = %+v, want addresses %s and %s", name, p, want.addr4, want.addr6)
		}
		if _, err := os.Stat(p.Cgroup); err != nil {
			t.Errorf("pod cgroup: %v", err)
		}
		return p
	}
	p1 := addPod(podWant{"198.18.0.2", "fd00:5e::2"})
	p2 := addPod(podWant{"198.18.0.3", "fd00:5e::3"})

	// No address is tentative, link-local ones included: the node can
	// resolve neighbours for what it forwards at once.
	for _, ns := range []string{n.Name, p1.Name} {
		out, err := exec.Command(ip, "-n", ns, "-6", "addr", "show", "tentative").CombinedOutput()
		if err != nil || len(bytes.TrimSpace(out)) > 0 {
			t.Errorf("tentative IPv6 addresses in %s (%v):\n%s", ns, err, out)
		}
	}

	// Forwarding as soon as AddPod returns: no frame is dropped at a port
	// still learning.
	out, err := exec.Command(ip, "-n", n.Name, "-d", "-j", "link", "show", "master", sandbox.BridgeName).Output()
	if err != nil {
		t.Fatalf("ip link show: %v", err)
	}
	var ports []struct {
		Ifname   string `json:"ifname"`
		Linkinfo struct {
			Slave struct {
				State string `json:"state"`
			} `json:"info_slave_data"`
		} `json:"linkinfo"`
	}
	if err := json.Unmarshal(out, &ports); err != nil {
		t.Fatalf("parsing %s: %v", out, err)
	}
	var states []string
	for _, p := range ports {
		states = append(states, p.Ifname+" "+p.Linkinfo.Slave.State)
	}
	if want := []string{"veth0 forwarding", "veth1 forwarding"}; !slices.Equal(states, want) {
		t.Errorf("bridge ports %v, want %v", states, want)
	}

	// A deleted pod's address is not handed out again at once.
	if err := p1.Delete(); err != nil {
		t.Fatal(err)
	}
	checkPodGone(t, p1)
	if err := p1.Delete(); err != nil {
		t.Errorf("deleting a deleted pod: %v", err)
	}
	p3 := addPod(podWant{"198.18.0.4", "fd00:5e::4"})
	if again, _ := bridgeOf(t, n); !bytes.Equal(again, mac) {
		t.Errorf("bridge MAC changed from %v to %v as pods came and went", mac, again)
	}

	// Nodes with overlapping pod subnets cannot be joined, nor a node
	// to itself.
	twin := newClusterNode(t, pod4, pod6)
	w4, w6 := netip.MustParsePrefix("198.18.1.0/24"), netip.MustParsePrefix("fd00:5e:0:1::/64")
	if _, _, err := sandbox.JoinNodes(n, twin, w4, w6); err == nil {
		t.Error("JoinNodes of nodes with the same pod subnets: no error")
	}
	if _, _, err := sandbox.JoinNodes(n, n, w4, w6); err == nil {
		t.Error("JoinNodes of a node with itself: no error")
	}
	other := newClusterNode(t, netip.MustParsePrefix("198.18.2.0/24"), netip.MustParsePrefix("fd00:5e:0:2::/64"))
	endA, endB, err := sandbox.JoinNodes(n, other, w4, w6)
	if err != nil {
		t.Fatal(err)
	}
	if want := (sandbox.WireEnd{netip.MustParseAddr("198.18.1.1"), netip.MustParseAddr("fd00:5e:0:1::1")}); endA != want {
		t.Errorf("JoinNodes: a's end %v, want %v", endA, want)
	}
	if want := (sandbox.WireEnd{netip.MustParseAddr("198.18.1.2"), netip.MustParseAddr("fd00:5e:0:1::2")}); endB != want {
		t.Errorf("JoinNodes: b's end %v, want %v", endB, want)
	}

	// Close deletes the pods left.
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	checkPodGone(t, p2)
	checkPodGone(t, p3)
	if _, err := os.Lstat(filepath.Join("/run/netns", n.Name)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("node namespace still there after Close (lstat: %v)", err)
	}
	if err := n.Close(); err != nil {
		t.Errorf("closing a closed node: %v", err)
	}
	if _, err := n.AddPod(testenv.Unique("smesh-test"), ""); err == nil {
		t.Error("AddPod on a closed node: no error")
	}

	// Bad subnets are refused before anything is made.
	name := testenv.Unique("smesh-test")
	for _, nets := range [][2]string{
		{"198.18.0.1/24", "fd00:5e::/64"},
		{"198.18.0.0/31", "fd00:5e::/64"},
		{"fd00:5e::/64", "198.18.0.0/24"},
		{"198.18.0.0/24", "::ffff:198.18.0.0/120"},
	} {
		if bad, err := sandbox.NewClusterNode(name, netip.MustParsePrefix(nets[0]), netip.MustParsePrefix(nets[1])); err == nil {
			bad.Close()
			t.Errorf("NewClusterNode with subnets %v: no error", nets)
		}
	}
	if _, err := os.Lstat(filepath.Join("/run/netns", name)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("NewClusterNode with bad subnets left namespace %s (lstat: %v)", name, err)
	}
	checkThreadsHome(t)
}

// newClusterNode creates a cluster node with the given pod subnets, closed in
// cleanup.
func newClusterNode(t *testing.T, pod4, pod6 netip.Prefix) *sandbox.ClusterNode {
	t.Helper()
	n, err := sandbox.NewClusterNode(testenv.Unique("smesh-test"), pod4, pod6)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Error(err)
		}
	})
	return n
}

// bridgeOf returns the MAC address and the global addresses of n's bridge.
func bridgeOf(t *testing.T, n *sandbox.ClusterNode) (net.HardwareAddr, []string) {
	t.Helper()
	var mac net.HardwareAddr
	var addrs []string
	err := sandbox.InNetns(n.Netns(), func() error {
		br, err := net.InterfaceByName(sandbox.BridgeName)
		if err != nil {
			return err
		}
		mac = br.HardwareAddr
		as, err := br.Addrs()
		for _, a := range as {
			if ipn := a.(*net.IPNet); !ipn.IP.IsLinkLocalUnicast() {
				addrs = append(addrs, ipn.String())
			}
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return mac, addrs
}

// checkPodGone fails t if p's namespace or cgroup is still there.
func checkPodGone(t *testing.T, p *sandbox.Pod) {
	t.Helper()
	for _, path := range []string{filepath.Join("/run/netns", p.Name), p.Cgroup} {
		if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s still there after deleting pod %s (lstat: %v)", path, p.Name, err)
		}
	}
}

// sysctlIn returns the value of the sysctl key as cat, a process started in
// network namespace netnsName, reads it.
func sysctlIn(t *testing.T, netnsName, key string) string {
	t.Helper()
	var out bytes.Buffer
	cmd := exec.Command("cat", filepath.Join("/proc/sys", key))
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := sandbox.Start(cmd, "", netnsName); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("cat %s: %v: %s", key, err, out.String())
	}
	return strings.TrimSpace(out.String())
}

// ownNetnsHelperEnv makes the test binary run TestInNetnsOwnWithoutSysAdmin's
// check in a child process.
const ownNetnsHelperEnv = "SMESH_TEST_INNETNS_OWN"

// TestInNetnsOwnWithoutSysAdmin: InNetns into the namespace the process is
// in needs no CAP_SYS_ADMIN (setns does), which smeshd's systemd unit does
// not grant: the child runs without it.
func TestInNetnsOwnWithoutSysAdmin(t *testing.T) {
	if os.Getenv(ownNetnsHelperEnv) == "1" {
		own, err := netns.Get()
		if err != nil {
			t.Fatal(err)
		}
		defer own.Close()
		ran := false
		if err := sandbox.InNetns(own, func() error { ran = true; return nil }); err != nil || !ran {
			t.Fatalf("InNetns(own namespace) without CAP_SYS_ADMIN: %v (ran: %v)", err, ran)
		}
		// The child really lacks it: setns fails.
		if err := netns.Set(own); err == nil {
			t.Fatal("setns succeeded: the child has CAP_SYS_ADMIN after all")
		}
		return
	}
	requireRoot(t)
	setpriv := testenv.RequireCommand(t, "setpriv")
	cmd := exec.Command(setpriv, "--bounding-set=-sys_admin", os.Args[0], "-test.run=^TestInNetnsOwnWithoutSysAdmin$", "-test.v")
	cmd.Env = append(os.Environ(), ownNetnsHelperEnv+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS") {
		t.Fatalf("child without CAP_SYS_ADMIN: %v\n%s", err, out)
	}
}
