package tunnel

import (
	"bytes"
	"fmt"
	"io"
	"runtime"
	"testing"
	"time"
)

// waitAllParked waits until both nodes' Parkers hold n directions each.
func (p *heldPath) waitAllParked(t testing.TB, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for p.park.Parked() != n || p.h.server.park.Parked() != n {
		if time.Now().After(deadline) {
			t.Fatalf("parked: sending node %d, receiving node %d; want %d each", p.park.Parked(), p.h.server.park.Parked(), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestParkedTunnel: connections held idle through the tunnel park on both
// nodes (their relays hold no goroutine), and bytes then sent either way
// (a round trip, a stream larger than the socket buffers) wake them, arrive
// whole, and let them park again; the ends of stream still end them.
func TestParkedTunnel(t *testing.T) {
	const n = 100
	g0 := runtime.NumGoroutine()
	p := newHeldPath(t, 50*time.Millisecond)
	p.open(t, n)
	p.waitAllParked(t, 2*n)
	// What remains per connection: the test backend's goroutine.
	if g := runtime.NumGoroutine() - g0; g > n+20 {
		t.Errorf("%d goroutines for %d parked connections, want about %d (the backend's)", g, n, n)
	}
	msg := make([]byte, 64)
	got := make([]byte, 64)
	for round := range 2 {
		for i, app := range p.apps {
			copy(msg, fmt.Sprintf("%d/%062d", round, i))
			if _, err := app.Write(msg); err != nil {
				t.Fatal(err)
			}
			app.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(app, got); err != nil || !bytes.Equal(got, msg) {
				t.Fatalf("round %d, connection %d: echoed %q, %v; want %q", round, i, got, err, msg)
			}
		}
		big := make([]byte, 8<<20)
		for i := range big {
			big[i] = byte(i*31 + round)
		}
		app := p.apps[round]
		echoed := make(chan []byte)
		go func() {
			b := make([]byte, len(big))
			app.SetReadDeadline(time.Now().Add(20 * time.Second))
			k, _ := io.ReadFull(app, b)
			echoed <- b[:k]
		}()
		if _, err := app.Write(big); err != nil {
			t.Fatal(err)
		}
		if b := <-echoed; !bytes.Equal(b, big) {
			t.Fatalf("round %d: %d of %d bytes echoed, or not in order", round, len(b), len(big))
		}
		p.waitAllParked(t, 2*n)
	}
	// The app's end of stream wakes a parked relay; the backend ends its
	// side and the relays on both nodes end cleanly.
	for _, app := range p.apps {
		app.(interface{ CloseWrite() error }).CloseWrite()
	}
	for i := range n {
		select {
		case r := <-p.relay:
			if r.Err != nil {
				t.Fatalf("relay %d: %v", i, r.Err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%d of %d parked relays ended after their ends of stream", i, n)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for p.park.Parked() != 0 || p.h.server.park.Parked() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("still parked after every connection ended: %d, %d", p.park.Parked(), p.h.server.park.Parked())
		}
		time.Sleep(10 * time.Millisecond)
	}
	p.close(t)
}
