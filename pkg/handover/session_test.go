package handover

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// serveLines answers each connection's first line with "PREFIX LINE".
func serveLines(ln net.Listener, prefix string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			line, err := bufio.NewReader(c).ReadString('\n')
			if err == nil {
				fmt.Fprintf(c, "%s %s", prefix, line)
			}
		}()
	}
}

func ask(t *testing.T, addr, line string) string {
	t.Helper()
	c, err := net.DialTimeout("tcp4", addr, 3*time.Second)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "%s\n", line)
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("%s: %v", line, err)
	}
	return got
}

// TestSessionHandsOver: the whole exchange, both ends in one process (the
// cross-process behaviour of the sockets is TestListenerKeepsAccept...).
// Connections made before, during and after are each answered, by the old
// end until the successor is ready, by the new one after.
func TestSessionHandsOver(t *testing.T) {
	path := filepath.Join(t.TempDir(), "handover")
	srv, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ln := listen(t, "tcp4", "127.0.0.1:0")
	addr := ln.Addr().String()
	own := netnsCookie(t, ln)
	go serveLines(ln, "old")
	if got := ask(t, addr, "before"); got != "old before\n" {
		t.Fatalf("before: %q", got)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	oldDone := make(chan error, 1)
	go func() {
		req, err := srv.Accept(ctx)
		if err != nil {
			oldDone <- err
			return
		}
		f := fileOf(t, ln)
		defer f.Close()
		if err := req.Offer(map[string]*os.File{ListenerName("out4", own): f}); err != nil {
			oldDone <- err
			return
		}
		if err := req.WaitReady(ctx); err != nil {
			oldDone <- err
			return
		}
		ln.Close() // stops accepting; what is queued stays for the successor
		oldDone <- req.Released()
	}()

	s, err := Dial(ctx, path, Hello{Layout: "test"})
	if err != nil {
		t.Fatal(err)
	}
	if s.PID != os.Getpid() {
		t.Errorf("predecessor pid %d", s.PID)
	}
	taken, err := NewListeners(s.Files).Take(ListenerName("out4", own), own, netip.MustParseAddrPort(addr))
	if err != nil || taken == nil {
		t.Fatalf("Take: %v %v", taken, err)
	}
	defer taken.Close()
	go serveLines(taken, "new")
	if err := s.Ready(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-oldDone; err != nil {
		t.Fatalf("predecessor: %v", err)
	}
	for i := range 20 {
		if got, want := ask(t, addr, fmt.Sprint("after", i)), fmt.Sprintf("new after%d\n", i); got != want {
			t.Fatalf("after the hand-over: %q, want %q", got, want)
		}
	}
}

// TestSuccessorGivesUp: a successor that goes away before it is ready
// leaves the predecessor serving.
func TestSuccessorGivesUp(t *testing.T) {
	path := filepath.Join(t.TempDir(), "handover")
	srv, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ln := listen(t, "tcp4", "127.0.0.1:0")
	go serveLines(ln, "old")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	waited := make(chan error, 1)
	go func() {
		req, err := srv.Accept(ctx)
		if err == nil {
			f := fileOf(t, ln)
			defer f.Close()
			if err = req.Offer(map[string]*os.File{"l": f}); err == nil {
				err = req.WaitReady(ctx)
			}
		}
		waited <- err
	}()
	s, err := Dial(ctx, path, Hello{})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range s.Files {
		f.Close()
	}
	s.Abort()
	if err := <-waited; err == nil {
		t.Fatal("WaitReady: nil after the successor gave up")
	} else {
		t.Logf("predecessor: %v", err)
	}
	if got := ask(t, ln.Addr().String(), "still"); got != "old still\n" {
		t.Fatalf("after a failed hand-over: %q", got)
	}
}

// TestNoPredecessor: no socket, or one left by a process that is gone:
// ErrNoPredecessor, and Listen replaces the stale file; a live one is not
// replaced.
func TestNoPredecessor(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "handover")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := Dial(ctx, path, Hello{}); !errors.Is(err, ErrNoPredecessor) {
		t.Fatalf("no socket: %v", err)
	}
	stale, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	if _, err := Dial(ctx, path, Hello{}); !errors.Is(err, ErrNoPredecessor) {
		t.Fatalf("stale socket: %v", err)
	}
	srv, err := Listen(path)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	defer srv.Close()
	if _, err := Listen(path); !errors.Is(err, ErrInUse) {
		t.Fatalf("second Listen: %v, want ErrInUse", err)
	}
	// The live one still answers (the probe of the second Listen is no
	// successor that speaks).
	go func() {
		if req, err := srv.Accept(ctx); err == nil {
			req.Refuse("map layout abc, mine is def")
		}
	}()
	var refused *RefusedError
	if _, err := Dial(ctx, path, Hello{Layout: "abc"}); !errors.As(err, &refused) {
		t.Fatalf("refused hand-over: %v", err)
	} else {
		t.Logf("%v", err)
	}
}

// TestSendLeavesListenerNonBlocking: sending a listener's File() must not
// clear O_NONBLOCK, which the dup shares with the listener (os.File.Fd
// would): the listener's Accept would block in accept4, past Close, and
// take a connection after the hand-over.
func TestSendLeavesListenerNonBlocking(t *testing.T) {
	ln := listen(t, "tcp4", "127.0.0.1:0")
	a, b := socketpair(t)
	defer b.Close()
	f := fileOf(t, ln)
	defer f.Close()
	done := make(chan error, 1)
	go func() {
		bc, err := net.FileConn(b)
		if err == nil {
			var files map[string]*os.File
			files, err = Receive(bc.(*net.UnixConn))
			for _, f := range files {
				f.Close()
			}
			bc.Close()
		}
		done <- err
	}()
	if err := Send(a, map[string]*os.File{"l": f}); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	raw, err := ln.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var flags int
	raw.Control(func(fd uintptr) { flags, err = unix.FcntlInt(fd, unix.F_GETFL, 0) })
	if err != nil {
		t.Fatal(err)
	}
	if flags&unix.O_NONBLOCK == 0 {
		t.Fatal("the listener is blocking after Send")
	}
}
