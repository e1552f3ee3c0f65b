package tunnel

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/proxy"
)

// heldPath is the whole path of a held cross-node connection in one
// process: an app's TCP connection relayed by the sending node's outbound
// side (proxy.Relay, as pkg/proxy's Outbound does) into a tunnel
// connection, delivered by the receiving node's Server to a backend that
// echoes.
type heldPath struct {
	h     *harness
	c     *Client
	ln    *net.TCPListener // the "outbound listener"
	apps  []net.Conn
	relay chan proxy.Result
	// park, when set, relays the outbound side through it (as smeshd's
	// Outbound does).
	park *proxy.Parker
}

// newHeldPath makes the path; parkAfter is both nodes' ParkAfter (0: the
// server's default, and the outbound side relays with proxy.RelayIdle).
func newHeldPath(t testing.TB, parkAfter time.Duration) *heldPath {
	t.Helper()
	h := newHarness(t, func(o *ServerOptions) {
		o.MaxConnections = 100000
		o.IdleTimeout = time.Hour
		o.ParkAfter = parkAfter
	})
	p := &heldPath{h: h, c: h.client(t, "a"), relay: make(chan proxy.Result, 100000)}
	if parkAfter > 0 {
		pk, err := proxy.NewParker(parkAfter)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pk.Close() })
		p.park = pk
	}
	t.Cleanup(p.c.Close)
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	p.ln = ln
	go func() {
		for {
			app, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			go func() {
				up, err := p.c.OpenEarly(context.Background(), "tcp", h.dst(), nil)
				if err != nil {
					app.Close()
					p.relay <- proxy.Result{Err: err}
					return
				}
				if p.park != nil {
					p.park.Relay(proxy.TCP(app), up.(*Conn), proxy.RelayOptions{Idle: time.Hour,
						Done: func(r proxy.Result) { p.relay <- r }})
					return
				}
				p.relay <- proxy.RelayIdle(proxy.TCP(app), up.(*Conn), time.Hour)
			}()
		}
	}()
	return p
}

// open makes n echo connections and a round trip of 64 bytes on each.
func (p *heldPath) open(t testing.TB, n int) {
	t.Helper()
	msg := make([]byte, 64)
	got := make([]byte, 64)
	for i := range n {
		app, err := net.DialTCP("tcp4", nil, p.ln.Addr().(*net.TCPAddr))
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		p.apps = append(p.apps, app)
		copy(msg, fmt.Sprintf("E%063d", i))
		if _, err := app.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(app, got[:63]); err != nil || string(got[:63]) != string(msg[1:]) {
			t.Fatalf("connection %d echoed %q, %v", i, got[:63], err)
		}
	}
}

func (p *heldPath) close(t testing.TB) {
	for _, a := range p.apps {
		a.Close()
	}
	p.apps = nil
}

// TestHeldProfile holds SMESH_HELD_CONNS connections (default 2000) through
// the tunnel path and writes heap and goroutine profiles to
// SMESH_HELD_PROFILE, a directory: what an idle held connection keeps.
// It runs only when asked (it measures; it asserts nothing).
func TestHeldProfile(t *testing.T) {
	dir := os.Getenv("SMESH_HELD_PROFILE")
	if dir == "" {
		t.Skip("set SMESH_HELD_PROFILE=DIR to write profiles of held connections")
	}
	n := 2000
	if s := os.Getenv("SMESH_HELD_CONNS"); s != "" {
		n, _ = strconv.Atoi(s)
	}
	// Parked as smeshd's would be once idle for ParkAfter (sooner here);
	// SMESH_HELD_PARK=0 holds them unparked.
	parkAfter := 100 * time.Millisecond
	if os.Getenv("SMESH_HELD_PARK") == "0" {
		parkAfter = -1
	}
	p := newHeldPath(t, parkAfter)
	runtime.GC()
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	g0 := runtime.NumGoroutine()
	p.open(t, n)
	if p.park != nil {
		p.waitAllParked(t, 2*n)
	}
	time.Sleep(200 * time.Millisecond)
	var mb runtime.MemStats
	runtime.ReadMemStats(&mb)
	t.Logf("before collecting: heap in use %.1f KiB/conn, stacks %.1f KiB/conn",
		float64(int64(mb.HeapInuse)-int64(m0.HeapInuse))/1024/float64(n),
		float64(int64(mb.StackInuse)-int64(m0.StackInuse))/1024/float64(n))
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m1)
	g1 := runtime.NumGoroutine()
	t.Logf("%d held: goroutines %.2f/conn (backend's 1 included); heap in use %.1f KiB/conn; stacks %.1f KiB/conn",
		n, float64(g1-g0)/float64(n),
		float64(int64(m1.HeapInuse)-int64(m0.HeapInuse))/1024/float64(n),
		float64(int64(m1.StackInuse)-int64(m0.StackInuse))/1024/float64(n))
	for _, name := range []string{"heap", "goroutine"} {
		f, err := os.Create(filepath.Join(dir, name+".pprof"))
		if err != nil {
			t.Fatal(err)
		}
		pprof.Lookup(name).WriteTo(f, 0)
		f.Close()
	}
	p.close(t)
}
