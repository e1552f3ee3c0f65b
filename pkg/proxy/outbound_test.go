package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// recorder is an Observer and a Dialer that notes what it was asked.
type recorder struct {
	mu      sync.Mutex
	dialled []string
	refused []string
}

func (r *recorder) ConnOpened(string)               {}
func (r *recorder) ConnClosed(string, int64, int64) {}
func (r *recorder) Refused(reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.refused = append(r.refused, reason)
}

func (r *recorder) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	r.mu.Lock()
	r.dialled = append(r.dialled, address)
	r.mu.Unlock()
	return nil, errors.New("recorder dials nothing")
}

func (r *recorder) lists() (dialled, refused []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.dialled...), append([]string(nil), r.refused...)
}

// TestOwnListenerRefused: a captured connection whose original destination
// is one of smeshd's own listeners (its ports on loopback, on an unspecified
// address or on an address of the node) is reset, never dialled; others
// are dialled. Without it, a wrong original destination (conntrack's answer
// for a connection made straight to the outbound port) made smeshd dial
// itself again and again.
func TestOwnListenerRefused(t *testing.T) {
	const outPort, tunnelPort, adminPort = 18000, 18001, 15000
	node := netip.MustParseAddr("198.18.0.9")
	cases := []struct {
		dst string
		own bool
	}{
		{"127.0.0.1:18000", true},
		{"127.0.0.7:18001", true},
		{"[::1]:15000", true},
		{"[::ffff:127.0.0.1]:18000", true},
		{"0.0.0.0:18001", true},
		{"198.18.0.9:18001", true},
		{"198.18.0.9:15000", true},
		{"127.0.0.1:9000", false},     // a local server (copy mode dials those)
		{"198.18.0.9:80", false},      // a local server on the node's address
		{"198.51.100.1:18001", false}, // another node's tunnel port: its smeshd decides
	}
	for _, tc := range cases {
		t.Run(tc.dst, func(t *testing.T) {
			rec := &recorder{}
			out, err := Listen(Options{
				Listen:      netip.MustParseAddrPort("127.0.0.1:0"),
				Dialer:      rec,
				OwnPorts:    []uint16{outPort, tunnelPort, adminPort},
				Local:       func(a netip.Addr) bool { return a == node },
				OriginalDst: func(*net.TCPConn) (netip.AddrPort, error) { return netip.MustParseAddrPort(tc.dst), nil },
				Observer:    rec,
				Logger:      zerolog.Nop(),
			})
			if err != nil {
				t.Fatal(err)
			}
			go out.Serve(context.Background())
			t.Cleanup(func() { out.Close() })

			// Reset either way: refused, or its dial failed. The reset
			// may come before connect(2) returns.
			c, err := net.Dial("tcp4", out.Addr().String())
			if err == nil {
				defer c.Close()
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				var b [1]byte
				_, err = c.Read(b[:])
			}
			if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, io.EOF) {
				t.Fatalf("%v, want the connection reset", err)
			}
			dialled, refused := rec.lists()
			if tc.own {
				if len(dialled) != 0 || len(refused) != 1 || refused[0] != "own_listener" {
					t.Errorf("dialled %q, refused %q; want no dial and one own_listener refusal", dialled, refused)
				}
				return
			}
			if len(dialled) != 1 || dialled[0] != netip.MustParseAddrPort(tc.dst).String() || len(refused) != 0 {
				t.Errorf("dialled %q, refused %q; want %s dialled", dialled, refused, tc.dst)
			}
		})
	}
}

// earlyDialer dials an echo server and notes the first bytes it was given.
type earlyDialer struct {
	to    string
	first chan []byte
	tx    chan int64
}

func (e *earlyDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return e.DialEarly(ctx, network, address, nil)
}

func (e *earlyDialer) DialEarly(ctx context.Context, network, address string, first []byte) (net.Conn, error) {
	e.first <- append([]byte(nil), first...)
	c, err := net.Dial("tcp4", e.to)
	if err == nil && len(first) > 0 {
		_, err = c.Write(first)
	}
	return c, err
}

func (e *earlyDialer) ConnOpened(string)                {}
func (e *earlyDialer) Refused(string)                   {}
func (e *earlyDialer) ConnClosed(_ string, tx, _ int64) { e.tx <- tx }

// TestEarlyDialer: what the app sent before the proxy got to its connection
// goes to an EarlyDialer with the dial, and is relayed and counted once,
// like the rest.
func TestEarlyDialer(t *testing.T) {
	echo, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() {
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	ed := &earlyDialer{to: echo.Addr().String(), first: make(chan []byte, 1), tx: make(chan int64, 1)}
	out, err := Listen(Options{
		Listen:      netip.MustParseAddrPort("127.0.0.1:0"),
		Dialer:      ed,
		OriginalDst: func(*net.TCPConn) (netip.AddrPort, error) { return netip.MustParseAddrPort("198.51.100.1:80"), nil },
		Observer:    ed,
		Logger:      zerolog.Nop(),
	})
	if err != nil {
		t.Fatal(err)
	}
	go out.Serve(context.Background())
	t.Cleanup(func() { out.Close() })
	c, err := net.Dial("tcp4", out.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("sent at once"))
	first := <-ed.first // what the proxy found: all, part or none of it
	c.Write([]byte(", then more"))
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "sent at once, then more" {
		t.Errorf("echo %q, %v (first bytes %q)", got, err, first)
	}
	if tx := <-ed.tx; tx != int64(len("sent at once, then more")) {
		t.Errorf("counted %d bytes sent, want %d", tx, len("sent at once, then more"))
	}
}

// waitingDialer is an EarlyDialer whose dials wait for gate: a busy peer.
type waitingDialer struct {
	earlyDialer
	arrived chan []byte
	gate    chan struct{}
}

func (w *waitingDialer) DialEarly(ctx context.Context, network, address string, first []byte) (net.Conn, error) {
	w.arrived <- append([]byte(nil), first...)
	<-w.gate
	return w.earlyDialer.DialEarly(ctx, network, address, first)
}

// TestDialHoldsNoBuffer: connections whose dial waits (a burst towards a
// busy peer) hold no relay buffer meanwhile, and the first bytes the proxy
// read before the dial still reach the destination.
func TestDialHoldsNoBuffer(t *testing.T) {
	held := new(atomic.Int64)
	buffersHeld.Store(held)
	t.Cleanup(func() { buffersHeld.Store(nil) })
	echo, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() {
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	const n = 10
	wd := &waitingDialer{
		earlyDialer: earlyDialer{to: echo.Addr().String(), first: make(chan []byte, n), tx: make(chan int64, n)},
		arrived:     make(chan []byte, n),
		gate:        make(chan struct{}),
	}
	out, err := Listen(Options{
		Listen:      netip.MustParseAddrPort("127.0.0.1:0"),
		Dialer:      wd,
		OriginalDst: func(*net.TCPConn) (netip.AddrPort, error) { return netip.MustParseAddrPort("198.51.100.1:80"), nil },
		Logger:      zerolog.Nop(),
	})
	if err != nil {
		t.Fatal(err)
	}
	go out.Serve(context.Background())
	t.Cleanup(func() { out.Close() })
	var apps []net.Conn
	for i := range n {
		c, err := net.Dial("tcp4", out.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "hello %d", i)
		apps = append(apps, c)
	}
	for range n {
		<-wd.arrived
	}
	if got := held.Load(); got != 0 {
		t.Errorf("%d relay buffers held by %d connections whose dial waits, want 0", got, n)
	}
	close(wd.gate)
	for i, c := range apps {
		c.(*net.TCPConn).CloseWrite()
		got, err := io.ReadAll(c)
		if want := fmt.Sprintf("hello %d", i); err != nil || string(got) != want {
			t.Errorf("connection %d: echo %q, %v; want %q", i, got, err, want)
		}
	}
}
