package handover

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// helperEnv makes the test binary run acceptHelper instead of the tests:
// the "new smeshd" of the experiments, a process of its own.
const helperEnv = "SMESH_HANDOVER_HELPER"

func TestMain(m *testing.M) {
	testenv.RunHelpers(map[string]testenv.HelperFunc{"connector": connector})
	if v, ok := os.LookupEnv(helperEnv); ok {
		run := acceptHelper
		if v == "hold" {
			run = holdHelper
		}
		if err := run(v); err != nil {
			fmt.Fprintln(os.Stderr, "helper:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// acceptHelper waits (so that the listener is in flight, held by no
// process, for a while), receives the "outbound" listener on fd 3, and
// answers each of n connections' first line with "ok " and the line.
func acceptHelper(arg string) error {
	var n int
	var wait time.Duration
	if _, err := fmt.Sscanf(arg, "%d,%d", &n, &wait); err != nil {
		return err
	}
	time.Sleep(wait * time.Millisecond)
	c, err := net.FileConn(os.NewFile(3, "handover"))
	if err != nil {
		return err
	}
	files, err := Receive(c.(*net.UnixConn))
	if err != nil {
		return err
	}
	ln, err := net.FileListener(files["outbound"])
	if err != nil {
		return err
	}
	files["outbound"].Close()
	for i := 0; i < n; i++ {
		conn, err := ln.Accept()
		if err != nil {
			return err
		}
		line, err := bufio.NewReader(conn).ReadString('\n')
		if err != nil {
			return fmt.Errorf("reading connection %d: %w", i, err)
		}
		fmt.Fprintf(conn, "ok %s", line)
		conn.Close()
	}
	return nil
}

// holdHelper receives descriptors on fd 3, says "held" and their names, and
// holds them until its stdin ends: a holder like systemd's store.
func holdHelper(string) error {
	c, err := net.FileConn(os.NewFile(3, "handover"))
	if err != nil {
		return err
	}
	files, err := Receive(c.(*net.UnixConn))
	if err != nil {
		return err
	}
	fmt.Printf("held %d\n", len(files))
	io.Copy(io.Discard, os.Stdin)
	return nil
}

func socketpair(t *testing.T) (*net.UnixConn, *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "parent")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.UnixConn), os.NewFile(uintptr(fds[1]), "child")
}

// startHelper starts the "new smeshd" with the other end of the pair.
func startHelper(t *testing.T, child *os.File, n int, wait time.Duration) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d,%d", helperEnv, n, wait.Milliseconds()))
	cmd.ExtraFiles = []*os.File{child}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	child.Close()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill() // by the PID we started
			cmd.Wait()
		}
	})
	return cmd
}

// dialAndSend connects and sends one line; the answer is read later.
func dialAndSend(t *testing.T, addr string, i int) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp4", addr, 3*time.Second)
	if err != nil {
		t.Fatalf("connection %d: %v", i, err)
	}
	if _, err := fmt.Fprintf(c, "msg-%d\n", i); err != nil {
		t.Fatalf("connection %d: writing: %v", i, err)
	}
	return c
}

// TestListenerKeepsAcceptQueueAcrossProcesses is experiment (a) of
// docs/restart.md: connections made while no process accepts (the old one
// stopped accepting; then the listener is only in flight in a unix socket,
// held by no process at all) complete their handshake, and the process the
// listener is handed to accepts them later with their bytes. The old
// process has closed every descriptor of its own before the new one
// receives.
func TestListenerKeepsAcceptQueueAcrossProcesses(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	const before, inFlight = 50, 50
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	// 1. The old process no longer accepts: connections queue.
	for i := 0; i < before; i++ {
		conns = append(conns, dialAndSend(t, addr, i))
	}
	// 2. Handed over: the old process closes all it has; the new one only
	// receives after 500ms. Meanwhile the listener is held by the message
	// in flight alone.
	parent, child := socketpair(t)
	cmd := startHelper(t, child, before+inFlight, 500*time.Millisecond)
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	if err := Send(parent, map[string]*os.File{"outbound": f}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	ln.Close()
	for i := before; i < before+inFlight; i++ {
		conns = append(conns, dialAndSend(t, addr, i))
	}
	// 3. Every connection is answered by the new process, in order of
	// its bytes.
	for i, c := range conns {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		got, err := bufio.NewReader(c).ReadString('\n')
		if want := fmt.Sprintf("ok msg-%d\n", i); err != nil || got != want {
			t.Fatalf("connection %d: got %q, %v; want %q", i, got, err, want)
		}
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("helper: %v", err)
	}
}

// TestClosedListenerRefuses is experiment (b), the state of today: while
// smeshd is away and its listener closed, a connect() that connect4 sends
// to it is refused at once (RST: ECONNREFUSED), the failed connects of
// issue 24.
func TestClosedListenerRefuses(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, err = net.DialTimeout("tcp4", addr, time.Second)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("connect to a closed listener: %v, want ECONNREFUSED", err)
	}
}

// TestFullAcceptQueueDelaysNotRefuses is experiment (b) for a held
// listener whose accept queue overflows (a restart longer than the queue
// lasts at the connection rate): with net.ipv4.tcp_abort_on_overflow = 0
// (the default) the kernel drops the handshake's last ACK or the SYN, the
// client retransmits (1s, 2s, ...), and the connection is accepted once
// someone accepts again: late, not refused.
func TestFullAcceptQueueDelaysNotRefuses(t *testing.T) {
	if b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_abort_on_overflow"); err != nil || string(b) != "0\n" {
		t.Skipf("tcp_abort_on_overflow is %q (%v): overflowing connections would be reset", b, err)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	const backlog = 2 // queue holds backlog+1
	if err := unix.Listen(fd, backlog); err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "listener")
	ln, err := net.FileListener(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr := ln.Addr().String()
	const n = 10
	type result struct {
		i   int
		err error
		dt  time.Duration
	}
	results := make(chan result, n)
	start := time.Now()
	for i := 0; i < n; i++ {
		go func() {
			c, err := net.DialTimeout("tcp4", addr, 8*time.Second)
			if err == nil {
				_, err = fmt.Fprintf(c, "msg-%d\n", i)
				if err == nil {
					c.SetReadDeadline(time.Now().Add(8 * time.Second))
					var line string
					line, err = bufio.NewReader(c).ReadString('\n')
					if err == nil && line != fmt.Sprintf("ok msg-%d\n", i) {
						err = fmt.Errorf("answer %q", line)
					}
				}
				c.Close()
			}
			results <- result{i, err, time.Since(start)}
		}()
	}
	time.Sleep(1500 * time.Millisecond) // nobody accepts: the "restart"
	go serveLines(ln, "ok")
	var slowest time.Duration
	for i := 0; i < n; i++ {
		r := <-results
		if r.err != nil {
			t.Errorf("connection %d after %v: %v", r.i, r.dt, r.err)
		}
		slowest = max(slowest, r.dt)
	}
	t.Logf("%d connections to a queue of %d while nobody accepted for 1.5s: all answered, the last after %v", n, backlog+1, slowest.Round(time.Millisecond))
}

func fileConn(f *os.File) (*net.UnixConn, error) {
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, err
	}
	return c.(*net.UnixConn), nil
}
