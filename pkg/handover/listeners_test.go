package handover

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// netnsCookie is the cookie of the network namespace conn lives in.
// (Through SyscallConn, not File().Fd(), which would make the listener
// blocking: see Send.)
func netnsCookie(t *testing.T, c syscall.Conn) uint64 {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v uint64
	var gerr error
	if err := raw.Control(func(fd uintptr) {
		v, gerr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	}); err != nil || gerr != nil {
		t.Fatalf("SO_NETNS_COOKIE: %v %v", err, gerr)
	}
	return v
}

func fileOf(t *testing.T, ln *net.TCPListener) *os.File {
	t.Helper()
	f, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func listen(t *testing.T, network, addr string) *net.TCPListener {
	t.Helper()
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln.(*net.TCPListener)
}

// TestTakeKeepsTheQueue: a listener sent over a unix socket and taken by
// name comes out as a *net.TCPListener on the same socket: a connection
// made before, with its bytes, is accepted from it.
func TestTakeKeepsTheQueue(t *testing.T) {
	ln := listen(t, "tcp4", "127.0.0.1:0")
	addr := netip.MustParseAddrPort(ln.Addr().String())
	own := netnsCookie(t, ln)
	c, err := net.Dial("tcp4", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "queued\n")

	a, b := socketpair(t)
	bc, err := net.FileConn(b)
	b.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer bc.Close()
	name := ListenerName("out4", own)
	f := fileOf(t, ln)
	if err := Send(a, map[string]*os.File{name: f}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	ln.Close()
	files, err := Receive(bc.(*net.UnixConn))
	if err != nil {
		t.Fatal(err)
	}
	got := NewListeners(files)
	taken, err := got.Take(name, own, addr)
	if err != nil || taken == nil {
		t.Fatalf("Take: %v, %v", taken, err)
	}
	defer taken.Close()
	taken.SetDeadline(time.Now().Add(5 * time.Second))
	conn, err := taken.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if line, err := bufio.NewReader(conn).ReadString('\n'); err != nil || line != "queued\n" {
		t.Fatalf("read %q, %v", line, err)
	}
	if again, err := got.Take(name, own, addr); again != nil || err != nil {
		t.Errorf("taken twice: %v, %v", again, err)
	}
}

// TestTakeChecksWhatItGets: a descriptor whose name promises a listener it
// is not (another address, another namespace, not listening, not TCP) is
// closed and reported, so that the caller listens anew.
func TestTakeChecksWhatItGets(t *testing.T) {
	testenv.RequirePrivileged(t)
	ln := listen(t, "tcp4", "127.0.0.1:0")
	addr := netip.MustParseAddrPort(ln.Addr().String())
	own := netnsCookie(t, ln)

	// The same address in another namespace.
	node := testenv.NewNode(t)
	var there *net.TCPListener
	if err := node.Do(func() error {
		l, err := net.Listen("tcp4", addr.String())
		if err == nil {
			there = l.(*net.TCPListener)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer there.Close()
	nodeCookie := netnsCookie(t, there)

	conn, err := net.Dial("tcp4", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	connFile, err := conn.(*net.TCPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	udp, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	udpFile, err := udp.(*net.UDPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()

	l := NewListeners(map[string]*os.File{
		"right":          fileOf(t, ln),
		"other-address":  fileOf(t, ln),
		"other-netns":    fileOf(t, there),
		"other-netns-ok": fileOf(t, there),
		"connected":      connFile,
		"udp":            udpFile,
		"pipe":           r,
	})
	for _, c := range []struct {
		name  string
		netns uint64
		addrs []netip.AddrPort
		ok    bool
	}{
		{"right", own, []netip.AddrPort{netip.MustParseAddrPort("[::]:1"), addr}, true},
		{"other-address", own, []netip.AddrPort{netip.AddrPortFrom(addr.Addr(), addr.Port()+1)}, false},
		{"other-netns", own, []netip.AddrPort{addr}, false},
		{"other-netns-ok", nodeCookie, []netip.AddrPort{addr}, true},
		{"connected", own, []netip.AddrPort{addr}, false},
		{"udp", own, []netip.AddrPort{addr}, false},
		{"pipe", own, []netip.AddrPort{addr}, false},
	} {
		got, err := l.Take(c.name, c.netns, c.addrs...)
		if c.ok {
			if err != nil || got == nil {
				t.Errorf("%s: %v, %v; want the listener", c.name, got, err)
			} else {
				got.Close()
			}
			continue
		}
		if got != nil || !errors.Is(err, ErrMismatch) {
			t.Errorf("%s: %v, %v; want ErrMismatch", c.name, got, err)
		} else {
			t.Logf("%s: %v", c.name, err)
		}
	}
	if rest := l.CloseRest(); len(rest) != 0 {
		t.Errorf("left: %v", rest)
	}
}

// TestSendManyDescriptors: more descriptors than one message carries
// arrive all, under their names.
func TestSendManyDescriptors(t *testing.T) {
	const pipes = 250 // 500 descriptors: three messages
	files := make(map[string]*os.File)
	for i := range pipes {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		files["r"+strconv.Itoa(i)] = r
		files["w"+strconv.Itoa(i)] = w
	}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	a, b := socketpair(t)
	bc, err := net.FileConn(b)
	b.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer bc.Close()
	done := make(chan error, 1)
	go func() { done <- Send(a, files) }()
	got, err := Receive(bc.(*net.UnixConn))
	if err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, f := range got {
			f.Close()
		}
	}()
	if len(got) != len(files) {
		t.Fatalf("got %d descriptors, want %d", len(got), len(files))
	}
	// Each received write end feeds the pipe its name says.
	for i := range pipes {
		msg := []byte(strconv.Itoa(i))
		if _, err := got["w"+strconv.Itoa(i)].Write(msg); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 8)
		n, err := files["r"+strconv.Itoa(i)].Read(buf)
		if err != nil || string(buf[:n]) != string(msg) {
			t.Fatalf("pipe %d: read %q, %v", i, buf[:n], err)
		}
	}
}

// TestReceiveFromADeadPeer: a sender that dies before the end leaves the
// receiver with an error and nothing open.
func TestReceiveFromADeadPeer(t *testing.T) {
	a, b := socketpair(t)
	bc, err := net.FileConn(b)
	b.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer bc.Close()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	// One batch, without the empty one that ends the hand-over.
	if err := sendBatch(a, []string{"r"}, map[string]*os.File{"r": r}); err != nil {
		t.Fatal(err)
	}
	a.Close()
	if got, err := Receive(bc.(*net.UnixConn)); err == nil {
		t.Fatalf("Receive from a peer gone mid-way: %v, no error", got)
	}
}

// TestFromEnv reads what systemd passes (sd_listen_fds_with_names).
func TestFromEnv(t *testing.T) {
	// Two consecutive descriptors, well above anything open.
	const first = 900
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	for i, f := range []*os.File{r, w} {
		if err := unix.Dup3(int(f.Fd()), first+i, unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
	}
	env := map[string]string{"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "out4/7:tun/7"}
	if got, err := fromEnv(func(k string) string { return env[k] }, 43, first); got != nil || err != nil {
		t.Errorf("for another process: %v, %v", got, err)
	}
	got, err := fromEnv(func(k string) string { return env[k] }, 42, first)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, f := range got {
			f.Close()
		}
	}()
	if len(got) != 2 || got["out4/7"] == nil || got["tun/7"] == nil {
		t.Fatalf("got %v", got)
	}
	if got["out4/7"].Fd() != first || got["tun/7"].Fd() != first+1 {
		t.Errorf("descriptors %d, %d; want %d, %d", got["out4/7"].Fd(), got["tun/7"].Fd(), first, first+1)
	}
}
