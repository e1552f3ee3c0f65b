package proxy

import (
	"bytes"
	"errors"
	"io"
	"net"
	"runtime"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// parkedPair relays app <-> [p.Relay] <-> server and returns the outer
// ends and the relay's result.
func parkedPair(t *testing.T, p *Parker, idle time.Duration) (app, server *net.TCPConn, done chan Result) {
	t.Helper()
	app, a := pair(t)
	b, server := pair(t)
	done = make(chan Result, 1)
	var ta, tb atomic.Int64
	go p.Relay(TCP(a), TCP(b), RelayOptions{Idle: idle, CountA: &ta, CountB: &tb, Done: func(r Result) { done <- r }})
	return app, server, done
}

func newParker(t *testing.T, after time.Duration) *Parker {
	t.Helper()
	p, err := NewParker(after)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// waitParked waits until n directions of p are parked.
func waitParked(t *testing.T, p *Parker, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for p.Parked() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d directions parked, want %d", p.Parked(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// echo sends msg from one end and reads it at the other.
func echo(t *testing.T, from, to net.Conn, msg []byte) {
	t.Helper()
	if _, err := from.Write(msg); err != nil {
		t.Fatal(err)
	}
	to.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(to, got); err != nil {
		t.Fatalf("reading what was sent: %v", err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("read %q, want %q", got, msg)
	}
}

// TestParkedRelayCarriesBytes: an idle relay parks both ways and gives up
// its goroutines; bytes that come then, either way, start a direction
// again and arrive whole and in order; it parks again once idle.
func TestParkedRelayCarriesBytes(t *testing.T) {
	p := newParker(t, 50*time.Millisecond)
	const conns = 50
	type ends struct {
		app, server *net.TCPConn
		done        chan Result
	}
	var cs []ends
	g0 := runtime.NumGoroutine()
	for range conns {
		app, server, done := parkedPair(t, p, 0)
		echo(t, app, server, []byte("hello"))
		cs = append(cs, ends{app, server, done})
	}
	waitParked(t, p, 2*conns)
	if g := runtime.NumGoroutine() - g0; g > 2 {
		t.Errorf("%d goroutines more with %d relays parked both ways, want none", g, conns)
	}
	big := make([]byte, 4<<20)
	for i := range big {
		big[i] = byte(i % 251)
	}
	for round := 0; round < 3; round++ {
		for i, c := range cs {
			echo(t, c.app, c.server, []byte{'a', byte(i), byte(round)})
			echo(t, c.server, c.app, []byte{'b', byte(i), byte(round)})
		}
		// A stream larger than the socket buffers, while the other
		// direction stays parked.
		got := make(chan []byte)
		go func() {
			b := make([]byte, len(big))
			cs[0].server.SetReadDeadline(time.Now().Add(10 * time.Second))
			n, _ := io.ReadFull(cs[0].server, b)
			got <- b[:n]
		}()
		if _, err := cs[0].app.Write(big); err != nil {
			t.Fatal(err)
		}
		if b := <-got; !bytes.Equal(b, big) {
			t.Fatalf("round %d: %d bytes of %d arrived, or not in order", round, len(b), len(big))
		}
		waitParked(t, p, 2*conns)
	}
	// An end of stream reaches a parked relay: it half-closes the other
	// side, which still answers, then ends.
	c := cs[1]
	c.app.CloseWrite()
	c.server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(c.server); err != nil || len(b) != 0 {
		t.Fatalf("server read %q, %v; want the end of stream", b, err)
	}
	echo(t, c.server, c.app, []byte("last"))
	c.server.Close()
	select {
	case r := <-c.done:
		if r.Err != nil || r.AtoB != 3*3+5 || r.BtoA != 3*3+4 {
			t.Fatalf("result %+v, want no error, 14 bytes a to b and 13 b to a", r)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a relay whose both ends ended was not done")
	}
}

// TestParkedRelayIdleTimeout: a relay parked both ways is still reset when
// its idle timeout passes, and a reset end of a parked relay resets the
// other.
func TestParkedRelayIdleTimeout(t *testing.T) {
	p := newParker(t, 20*time.Millisecond)
	app, server, done := parkedPair(t, p, 300*time.Millisecond)
	echo(t, app, server, []byte("x"))
	waitParked(t, p, 2)
	select {
	case r := <-done:
		if !errors.Is(r.Err, ErrIdle) {
			t.Fatalf("Err = %v, want ErrIdle", r.Err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the idle timeout did not end a parked relay")
	}
	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := server.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("server read %v after the idle timeout, want a reset", err)
	}

	// Half-closed (the app sent its end of stream), then idle.
	app, server, done = parkedPair(t, p, 300*time.Millisecond)
	echo(t, app, server, []byte("x"))
	app.CloseWrite()
	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(server); err != nil || len(b) != 0 {
		t.Fatalf("server read %q, %v; want the end of stream", b, err)
	}
	waitParked(t, p, 1)
	select {
	case r := <-done:
		if !errors.Is(r.Err, ErrIdle) {
			t.Fatalf("half-closed: Err = %v, want ErrIdle", r.Err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the idle timeout did not end a half-closed parked relay")
	}

	app, server, done = parkedPair(t, p, 0)
	echo(t, app, server, []byte("x"))
	waitParked(t, p, 2)
	app.SetLinger(0)
	app.Close()
	select {
	case r := <-done:
		if r.Err == nil {
			t.Fatal("a reset end ended the relay without an error")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a reset did not end a parked relay")
	}
	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := server.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("server read %v after the app's reset, want a reset", err)
	}
}

// TestParkerCloseWakes: closing the Parker gives parked relays their
// goroutines back; they go on relaying, and closing their ends ends them.
func TestParkerCloseWakes(t *testing.T) {
	p, err := NewParker(20 * time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	app, server, done := parkedPair(t, p, 0)
	echo(t, app, server, []byte("x"))
	waitParked(t, p, 2)
	p.Close()
	if n := p.Parked(); n != 0 {
		t.Fatalf("%d directions parked after Close", n)
	}
	time.Sleep(50 * time.Millisecond) // no sweeper parks them again
	echo(t, app, server, []byte("after close"))
	echo(t, server, app, []byte("back"))
	app.SetLinger(0)
	app.Close()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("closing an end did not end a relay its Parker woke")
	}
}
