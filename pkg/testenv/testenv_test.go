package testenv_test

import (
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
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/sandbox"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// testNetns is the network namespace the test binary started in; no thread
// of it may be anywhere else once a harness call has returned.
var testNetns string

func TestMain(m *testing.M) {
	testenv.RunHelpers(map[string]testenv.HelperFunc{
		"cgroup-then-sleep": cgroupThenSleep,
		"interfaces":        interfaces,
		"print-and-exit":    printAndExit,
	})
	testNetns, _ = os.Readlink("/proc/self/ns/net")
	os.Exit(m.Run())
}

// cgroupThenSleep prints, as its first act, the cgroup v2 path it runs in,
// then sleeps until killed (30s at most).
func cgroupThenSleep([]string) int {
	cg, err := ownCgroup("self")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("cgroup", cg)
	time.Sleep(30 * time.Second)
	return 0
}

// interfaces prints "name addr,addr,..." for every interface it can see.
func interfaces([]string) int {
	ifs, err := net.Interfaces()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	for _, ifc := range ifs {
		addrs, err := ifc.Addrs()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		var s []string
		for _, a := range addrs {
			s = append(s, a.String())
		}
		fmt.Println(ifc.Name, strings.Join(s, ","))
	}
	return 0
}

// printAndExit prints its arguments but the first, one per line, and exits
// with the first as exit code.
func printAndExit(args []string) int {
	code, err := strconv.Atoi(args[0])
	if err != nil {
		return 2
	}
	for _, a := range args[1:] {
		fmt.Println(a)
	}
	return code
}

// ownCgroup returns the cgroup v2 path of process pid ("self" or a number),
// relative to the cgroup v2 mount.
func ownCgroup(pid string) (string, error) {
	data, err := os.ReadFile("/proc/" + pid + "/cgroup")
	if err != nil {
		return "", err
	}
	for line := range strings.Lines(string(data)) {
		if cg, ok := strings.CutPrefix(strings.TrimSpace(line), "0::"); ok {
			return cg, nil
		}
	}
	return "", fmt.Errorf("no cgroup v2 entry in /proc/%s/cgroup", pid)
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

func TestHelperOutputAndExitCode(t *testing.T) {
	h := testenv.StartHelper(t, "", "", "print-and-exit", "3", "first", "second")
	for _, want := range []string{"first", "second"} {
		got, err := h.ReadLine(5 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Errorf("ReadLine() = %q, want %q", got, want)
		}
	}
	if _, err := h.ReadLine(5 * time.Second); !errors.Is(err, io.EOF) {
		t.Errorf("ReadLine() after the last line: error %v, want io.EOF", err)
	}
	var exit *exec.ExitError
	if err := h.Wait(); !errors.As(err, &exit) || exit.ExitCode() != 3 {
		t.Errorf("Wait() = %v, want exit status 3", err)
	}
	if got, want := h.Stdout(), "first\nsecond\n"; got != want {
		t.Errorf("Stdout() = %q, want %q", got, want)
	}
}

func TestUnknownHelper(t *testing.T) {
	h := testenv.StartHelper(t, "", "", "no-such-helper")
	var exit *exec.ExitError
	if err := h.Wait(); !errors.As(err, &exit) || exit.ExitCode() != 125 {
		t.Errorf("Wait() = %v, want exit status 125", err)
	}
	if !strings.Contains(h.Stderr(), `"no-such-helper"`) {
		t.Errorf("stderr %q does not name the missing helper", h.Stderr())
	}
}

func TestHelperStartsInCgroup(t *testing.T) {
	testenv.RequirePrivileged(t)
	mount, err := testenv.Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}

	var cg string
	t.Run("inside", func(t *testing.T) {
		cg = testenv.NewCgroup(t)
		if filepath.Dir(cg) != mount || !strings.HasPrefix(filepath.Base(cg), "smesh-test-") {
			t.Errorf("NewCgroup() = %s, want %s/smesh-test-*", cg, mount)
		}
		rel := "/" + filepath.Base(cg)

		h := testenv.StartHelper(t, cg, "", "cgroup-then-sleep")
		// What the helper saw before running any code of its own: it was
		// born in the cgroup, not moved there.
		line, err := h.ReadLine(5 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if want := "cgroup " + rel; line != want {
			t.Errorf("helper reported %q, want %q", line, want)
		}

		procs, err := os.ReadFile(filepath.Join(cg, "cgroup.procs"))
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Fields(string(procs)); !slices.Equal(got, []string{strconv.Itoa(h.PID())}) {
			t.Errorf("%s/cgroup.procs = %v, want just the helper, %d", cg, got, h.PID())
		}
		if got, err := ownCgroup(strconv.Itoa(h.PID())); err != nil || got != rel {
			t.Errorf("/proc/%d/cgroup names %q (%v), want %q", h.PID(), got, err, rel)
		}
	})
	if cg == "" {
		return
	}
	if _, err := os.Stat(cg); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("cgroup %s still exists after cleanup (stat: %v)", cg, err)
	}
}

func TestCgroupCleanupKillsGrandchildren(t *testing.T) {
	testenv.RequirePrivileged(t)
	sh := testenv.RequireCommand(t, "sh")

	var cg string
	var grandchild int
	t.Run("inside", func(t *testing.T) {
		cg = testenv.NewCgroup(t)
		// sh starts sleep in the background and exits: sleep is nobody's
		// helper, only the cgroup knows it.
		h := testenv.StartProcess(t, cg, "", sh, "-c", "sleep 30 </dev/null >/dev/null 2>&1 & echo $!")
		line, err := h.ReadLine(5 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if grandchild, err = strconv.Atoi(line); err != nil {
			t.Fatalf("sh printed %q, want a pid", line)
		}
		if err := h.Wait(); err != nil {
			t.Fatalf("sh: %v", err)
		}
		if got, err := ownCgroup(line); err != nil || got != "/"+filepath.Base(cg) {
			t.Fatalf("sleep runs in cgroup %q (%v), want %s", got, err, cg)
		}
	})
	if cg == "" {
		return
	}
	if _, err := os.Stat(cg); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("cgroup %s still exists after cleanup (stat: %v)", cg, err)
	}
	// sleep's parent is gone, so reaping it is up to init, which may take
	// its time: a zombie is dead enough. (A recycled PID within these
	// milliseconds would be a freak.)
	if grandchild != 0 {
		if state, err := procState(grandchild); err == nil && state != "Z" {
			t.Errorf("pid %d (sleep) is in state %s after cleanup, want gone or zombie", grandchild, state)
		}
	}
}

// procState returns the state letter of process pid (R, S, Z, ...).
func procState(pid int) (string, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", err
	}
	// pid (comm) state ...; comm may contain spaces and parentheses.
	i := strings.LastIndex(string(data), ") ")
	if i < 0 || i+2 >= len(data) {
		return "", fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	return string(data[i+2 : i+3]), nil
}

func TestLinkedNodesExchangeBytes(t *testing.T) {
	testenv.RequirePrivileged(t)
	a, b := testenv.NewNode(t), testenv.NewNode(t)
	addrA, addrB := testenv.Link(t, a, b)
	if !netip.MustParsePrefix("198.18.0.0/15").Contains(addrA) || addrA.Next() != addrB {
		t.Fatalf("Link() = %v, %v; want neighbours in 198.18.0.0/15", addrA, addrB)
	}

	var ln *net.TCPListener
	err := b.Do(func() error {
		l, err := net.ListenTCP("tcp4", net.TCPAddrFromAddrPort(netip.AddrPortFrom(addrB, 0)))
		ln = l
		return err
	})
	if err != nil {
		t.Fatalf("listening in node b: %v", err)
	}
	defer ln.Close()
	deadline := time.Now().Add(5 * time.Second)
	ln.SetDeadline(deadline)

	// The server echoes what it reads, so the client checks both
	// directions, and reports where the connection came from.
	type accepted struct {
		peer netip.Addr
		err  error
	}
	srv := make(chan accepted, 1)
	go func() {
		c, err := ln.AcceptTCP()
		if err != nil {
			srv <- accepted{err: err}
			return
		}
		defer c.Close()
		c.SetDeadline(deadline)
		_, err = io.Copy(c, c)
		srv <- accepted{peer: c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr(), err: err}
	}()

	var conn *net.TCPConn
	err = a.Do(func() error {
		d := net.Dialer{Deadline: deadline}
		c, err := d.Dial("tcp4", ln.Addr().String())
		if err == nil {
			conn = c.(*net.TCPConn)
		}
		return err
	})
	if err != nil {
		t.Fatalf("dialling %s from node a: %v", ln.Addr(), err)
	}
	defer conn.Close()
	conn.SetDeadline(deadline)

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
	got, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("reading the echo: %v", err)
	}
	if err := <-werr; err != nil {
		t.Fatalf("writing: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("echo differs: got %d bytes, sent %d", len(got), len(want))
	}
	s := <-srv
	if s.err != nil {
		t.Errorf("server: %v", s.err)
	}
	if s.peer != addrA {
		t.Errorf("server saw the connection come from %v, want %v", s.peer, addrA)
	}
	checkThreadsHome(t)
}

func TestProcessesSeeOnlyTheirNode(t *testing.T) {
	testenv.RequirePrivileged(t)
	ip := testenv.RequireCommand(t, "ip")
	cg := testenv.NewCgroup(t)
	a, b := testenv.NewNode(t), testenv.NewNode(t)
	addrA, _ := testenv.Link(t, a, b)

	h := testenv.StartHelper(t, cg, a.Name, "interfaces")
	if err := h.Wait(); err != nil {
		t.Fatalf("helper: %v; stderr: %s", err, h.Stderr())
	}
	seen := map[string][]string{}
	for line := range strings.Lines(h.Stdout()) {
		name, addrs, _ := strings.Cut(strings.TrimSpace(line), " ")
		seen[name] = strings.Split(addrs, ",")
	}
	if got := slices.Sorted(maps.Keys(seen)); !slices.Equal(got, []string{"eth0", "lo"}) {
		t.Errorf("helper in node a sees interfaces %v, want [eth0 lo]", got)
	}
	if want := netip.PrefixFrom(addrA, 24).String(); !slices.Contains(seen["eth0"], want) {
		t.Errorf("eth0 in node a has addresses %v, want %s among them", seen["eth0"], want)
	}

	// An external program, placed in a cgroup and the other node.
	p := testenv.StartProcess(t, cg, b.Name, "sh", "-c", `cat /proc/self/cgroup; "$0" -o link show`, ip)
	if err := p.Wait(); err != nil {
		t.Fatalf("sh: %v; stderr: %s", err, p.Stderr())
	}
	var links []string
	var cgroupLine string
	for line := range strings.Lines(p.Stdout()) {
		line = strings.TrimSpace(line)
		if cgl, ok := strings.CutPrefix(line, "0::"); ok {
			cgroupLine = cgl
			continue
		}
		// "2: eth0@if3: <BROADCAST,..."
		if f := strings.Fields(line); len(f) > 1 && strings.HasSuffix(f[0], ":") {
			name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
			links = append(links, name)
		}
	}
	if want := "/" + filepath.Base(cg); cgroupLine != want {
		t.Errorf("process ran in cgroup %q, want %q", cgroupLine, want)
	}
	slices.Sort(links)
	if !slices.Equal(links, []string{"eth0", "lo"}) {
		t.Errorf("ip link in node b lists %v, want [eth0 lo]", links)
	}
	checkThreadsHome(t)
}

func TestNetnsNameResolvesForIproute2(t *testing.T) {
	testenv.RequirePrivileged(t)
	ip := testenv.RequireCommand(t, "ip")
	n := testenv.NewNode(t)
	h := testenv.StartHelper(t, "", n.Name, "cgroup-then-sleep")
	if _, err := h.ReadLine(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(ip, "netns", "identify", strconv.Itoa(h.PID())).CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns identify: %v: %s", err, out)
	}
	if got := strings.TrimSpace(string(out)); got != n.Name {
		t.Errorf("ip netns identify %d = %q, want %q", h.PID(), got, n.Name)
	}

	var inside string
	if err := n.Do(func() (err error) {
		inside, err = os.Readlink("/proc/thread-self/ns/net")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if inside == testNetns {
		t.Errorf("Do ran fn in the test's own network namespace %s", testNetns)
	}
	checkThreadsHome(t)
}
