package tunnel

import (
	"bytes"
	"context"
	"io"
	"net"
	"testing"
	"time"
)

// TestReleaseHandsOver: a tunnel listener handed to another Server (a
// duplicate of its descriptor, as pkg/handover sends it) is served there; a
// peer's connection made once the first server stopped accepting, still
// queued when it releases, is served by the second (Release does not take
// the queue, as Shutdown does); the first server's idle pooled link is
// retired, so the peer's next connection goes to the second; and a
// tunnelled connection the first relays goes on after Release until it
// ends.
func TestReleaseHandsOver(t *testing.T) {
	h := newHarness(t, nil)
	pred := h.server
	c := h.client(t, "a")

	// Two links in the client's pool: one idles, one carries a tunnelled
	// connection being relayed.
	first, second := h.dial(t, c, 'E'), h.dial(t, c, 'E')
	echo(t, first, 1000)
	echo(t, second, 1000)
	relayed := h.dial(t, c, 'E')
	defer relayed.Close()
	exchange := func(data string) {
		t.Helper()
		relayed.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := relayed.Write([]byte(data)); err != nil {
			t.Fatalf("the relayed connection: %v", err)
		}
		got := make([]byte, len(data))
		if _, err := io.ReadFull(relayed, got); err != nil || string(got) != data {
			t.Fatalf("the relayed connection echoed %q (%v), want %q", got, err, data)
		}
	}
	exchange("before")
	before := pred.o.Stats.In.Connections.Load()

	f, err := pred.Listener().File()
	if err != nil {
		t.Fatal(err)
	}
	pred.StopAccepting()
	// A peer without pooled links connects: its TCP handshake completes
	// into the queue, its TLS handshake waits for whoever accepts.
	queued := make(chan error, 1)
	go func() {
		c2 := h.newClient(t, ClientOptions{Credentials: h.pki.creds(t, "a")})
		defer c2.Close()
		nc, err := c2.DialContext(context.Background(), "tcp", h.dst())
		if err == nil {
			err = shortEcho(nc, 1)
		}
		queued <- err
	}()
	waitQueued(t, pred, 1)
	if err := pred.Release(); err != nil {
		t.Fatalf("Release: %v", err)
	}

	ln, err := net.FileListener(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	o := pred.o
	o.Listener, o.OwnPorts, o.Stats = ln.(*net.TCPListener), nil, new(Stats)
	succ, err := Listen(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { succ.Close() })
	if succ.Addr() != pred.Addr() {
		t.Errorf("the successor serves %s, want the handed-over %s", succ.Addr(), pred.Addr())
	}
	go succ.Serve(context.Background())

	select {
	case err := <-queued:
		if err != nil {
			t.Fatalf("the connection queued at the hand-over: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the connection queued at the hand-over was never served")
	}
	// The client's pooled link to the predecessor was retired: its next
	// connection is the successor's.
	echo(t, h.dial(t, c, 'E'), 1000)
	if n := succ.o.Stats.In.Connections.Load(); n != 2 {
		t.Errorf("the successor relayed %d connections, want 2 (the queued one and the one after the release)", n)
	}
	if n := pred.o.Stats.In.Connections.Load(); n != before {
		t.Errorf("the predecessor relayed %d connections after its release", n-before)
	}

	// The predecessor's tunnelled connection goes on, then ends cleanly.
	exchange("after")
	relayed.CloseWrite()
	if rest, err := io.ReadAll(relayed); err != nil || !bytes.Equal(rest, nil) {
		t.Errorf("the end of the relayed connection: %q, %v", rest, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := pred.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown after Release: %v", err)
	}
	if ctx.Err() != nil {
		t.Error("Shutdown after Release waited for the drain timeout")
	}
}
