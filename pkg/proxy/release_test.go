package proxy

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// taggedEcho serves lines on loopback and answers each with tag and the
// line: which outbound relayed a connection shows in what comes back.
func taggedEcho(t *testing.T, tag string) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					fmt.Fprintf(c, "%s %s", tag, line)
				}
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// exchange sends line on c and returns the answer.
func exchange(t *testing.T, c net.Conn, r *bufio.Reader, line string) string {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintln(c, line); err != nil {
		t.Fatalf("sending %q: %v", line, err)
	}
	got, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("waiting for the answer to %q: %v", line, err)
	}
	return got
}

// TestReleaseHandsOver: an outbound listener handed to another Outbound
// (a duplicate of its descriptor, as pkg/handover sends it) is served
// there; a connection made once the first one stopped accepting, still
// queued when it releases, is accepted by the second (the first does not
// take the queue, as Shutdown does), and a connection the first relays
// goes on after Release until it ends.
func TestReleaseHandsOver(t *testing.T) {
	// Each outbound relays to an echo server of its own, which tags its
	// answers: the tag says who relayed.
	old, next := taggedEcho(t, "old"), taggedEcho(t, "new")
	to := func(dst netip.AddrPort) func(*net.TCPConn) (netip.AddrPort, error) {
		return func(*net.TCPConn) (netip.AddrPort, error) { return dst, nil }
	}
	ctx := context.Background()
	pred, err := Listen(Options{Listen: netip.MustParseAddrPort("127.0.0.1:0"), OriginalDst: to(old), Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	defer pred.Close()
	go pred.Serve(ctx)
	addr := pred.Addr().String()

	relayed, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer relayed.Close()
	rr := bufio.NewReader(relayed)
	if got := exchange(t, relayed, rr, "one"); got != "old one\n" {
		t.Fatalf("before the hand-over: %q, want the predecessor's answer", got)
	}

	// The hand-over: a duplicate for the successor, then the predecessor
	// stops accepting; a connection made now waits in the queue.
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
	queued.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintln(queued, "two"); err != nil {
		t.Fatal(err)
	}
	if err := pred.Release(); err != nil {
		t.Fatalf("Release: %v", err)
	}
	if n := len(pred.Connections()); n != 1 {
		t.Errorf("the predecessor relays %d connections after Release, want the one it had", n)
	}

	ln, err := net.FileListener(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	succ, err := Listen(Options{Listener: ln.(*net.TCPListener), OriginalDst: to(next), Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	defer succ.Close()
	if succ.Addr().String() != addr {
		t.Errorf("the successor serves %s, want the handed-over %s", succ.Addr(), addr)
	}
	go succ.Serve(ctx)

	qr := bufio.NewReader(queued)
	got, err := qr.ReadString('\n')
	if err != nil || got != "new two\n" {
		t.Fatalf("the connection queued at the hand-over got %q (%v), want the successor's answer \"new two\"", got, err)
	}
	fresh, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatalf("connecting after the hand-over: %v", err)
	}
	defer fresh.Close()
	if got := exchange(t, fresh, bufio.NewReader(fresh), "three"); got != "new three\n" {
		t.Errorf("after the hand-over: %q, want the successor's answer", got)
	}
	// The predecessor's relayed connection outlives its release.
	if got := exchange(t, relayed, rr, "four"); got != "old four\n" {
		t.Errorf("the relayed connection after Release: %q, want the predecessor's answer", got)
	}
	relayed.Close()
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := pred.Shutdown(sctx); err != nil {
		t.Errorf("Shutdown after Release: %v", err)
	}
	if sctx.Err() != nil {
		t.Error("Shutdown after Release waited for the drain timeout: the relayed connection's end was not seen")
	}
}
