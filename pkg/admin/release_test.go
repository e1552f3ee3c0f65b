package admin

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/smesh-dev/smesh/pkg/metrics"
)

// readyz asks /readyz on c (kept alive) and returns the body.
func readyz(t *testing.T, c net.Conn, r *bufio.Reader) string {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "GET /readyz HTTP/1.1\r\nHost: smeshd\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		t.Fatalf("reading /readyz: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(body))
}

// TestReleaseHandsOver: the admin listener handed to another Server (a
// duplicate of its descriptor, as pkg/handover sends it) is served there; a
// connection made once the first server stopped accepting, still queued
// when it releases, is answered by the second; a connection the first
// already served is still answered by it after Release.
func TestReleaseHandsOver(t *testing.T) {
	log := zerolog.New(zerolog.NewTestWriter(t))
	pred, err := New(loopback0, metrics.New("test"), nil, log)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- pred.Serve() }()
	// The predecessor drains, the successor is ready: /readyz says who
	// answered.
	pred.SetDraining()
	addr := pred.Addr().String()
	kept, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer kept.Close()
	kr := bufio.NewReader(kept)
	if got := readyz(t, kept, kr); got != "not ready: draining" {
		t.Fatalf("the predecessor answered %q", got)
	}

	f, err := pred.Listener().File()
	if err != nil {
		t.Fatal(err)
	}
	pred.StopAccepting()
	queued, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatalf("connecting while nobody accepts: %v", err)
	}
	defer queued.Close()
	if err := pred.Release(); err != nil {
		t.Fatalf("Release: %v", err)
	}
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("Serve after Release: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after Release")
	}

	ln, err := net.FileListener(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	succ, err := NewFrom(ln.(*net.TCPListener), metrics.New("test"), nil, log)
	if err != nil {
		t.Fatal(err)
	}
	succ.SetReady(true)
	go succ.Serve()
	defer succ.Shutdown(context.Background())

	if got := readyz(t, queued, bufio.NewReader(queued)); got != "ready" {
		t.Errorf("the connection queued at the hand-over got %q, want the successor's \"ready\"", got)
	}
	// The predecessor's keep-alive connection is still its own.
	if got := readyz(t, kept, kr); got != "not ready: draining" {
		t.Errorf("the predecessor's connection after Release got %q", got)
	}
	kept.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := pred.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown after Release: %v", err)
	}
}
