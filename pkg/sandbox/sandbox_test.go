package sandbox_test

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
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
	name := unique("smesh-test")
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
	ns := newNetns(t, unique("smesh-test"))
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
	name := unique("smesh-test")
	ns := newNetns(t, name)
	cg := filepath.Join(mount, unique("smesh-test"))
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
	if err := sandbox.Start(cmd, "", unique("smesh-test-missing")); err == nil {
		cmd.Wait()
		t.Error("Start in a namespace that does not exist: no error")
	}
	checkThreadsHome(t)
}

func TestVeth(t *testing.T) {
	requireRoot(t)
	a, b := newNetns(t, unique("smesh-test")), newNetns(t, unique("smesh-test"))
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
func unique(prefix string) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return prefix + "-" + hex.EncodeToString(b[:])
}

func TestSetSysctl(t *testing.T) {
	requireRoot(t)
	name := unique("smesh-test")
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
