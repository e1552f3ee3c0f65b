package proxy

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// pair returns the two ends of a loopback TCP connection.
func pair(t *testing.T) (*net.TCPConn, *net.TCPConn) { return testenv.TCPPair(t) }

// relayed sets up app <-> [a Relay b] <-> server and returns the outer ends.
func relayPair(t *testing.T, idle time.Duration) (app, server *net.TCPConn, done chan Result) {
	app, a := pair(t)
	b, server := pair(t)
	done = make(chan Result, 1)
	var act *activity
	if idle > 0 {
		act = &activity{timeout: idle}
		act.touch()
	}
	var ta, tb atomic.Int64
	go func() { done <- Relay(watch(TCP(a), &ta, act), watch(TCP(b), &tb, act)) }()
	return app, server, done
}

func TestRelayBothWaysAndHalfClose(t *testing.T) {
	app, server, done := relayPair(t, 0)
	up := make([]byte, 3<<20)
	rand.Read(up)
	go func() {
		app.Write(up)
		app.CloseWrite()
	}()
	got, err := io.ReadAll(server) // EOF arrives: the half-close crossed
	if err != nil || !bytes.Equal(got, up) {
		t.Fatalf("server got %d bytes (%v), want the %d sent", len(got), err, len(up))
	}
	// The other direction still works after the half-close.
	if _, err := server.Write([]byte("answer")); err != nil {
		t.Fatal(err)
	}
	server.CloseWrite()
	back, err := io.ReadAll(app)
	if err != nil || string(back) != "answer" {
		t.Fatalf("app got %q, %v", back, err)
	}
	res := <-done
	if res.Err != nil || res.AtoB != int64(len(up)) || res.BtoA != 6 {
		t.Errorf("relay result %+v", res)
	}
}

func TestRelayPassesResets(t *testing.T) {
	app, server, done := relayPair(t, 0)
	server.SetLinger(0)
	server.Close()
	app.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := app.Read(make([]byte, 1))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("app read after the server's reset: %v, want ECONNRESET", err)
	}
	if res := <-done; res.Err == nil {
		t.Error("relay reported no error for a reset")
	}
}

func TestRelayIdleTimeout(t *testing.T) {
	app, server, done := relayPair(t, 300*time.Millisecond)
	// A one-way stream keeps the connection alive although the other
	// direction is silent.
	for range 6 {
		if _, err := app.Write([]byte("tick")); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := io.ReadFull(server, make([]byte, 24)); err != nil {
		t.Fatalf("one-way traffic was cut: %v", err)
	}
	// Then silence: the relay gives up and resets both ends.
	select {
	case res := <-done:
		if !errors.Is(res.Err, ErrIdle) {
			t.Errorf("relay ended with %v, want the idle timeout", res.Err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("idle connection not reset")
	}
	app.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := app.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("app after the idle timeout: %v, want ECONNRESET", err)
	}
}

// TestIdleRelayHoldsNoBuffer: relayed TCP connections that wait for bytes
// hold no relay buffer (64 KiB a direction), so idle connections cost the
// node little; bytes still cross both ways afterwards.
func TestIdleRelayHoldsNoBuffer(t *testing.T) {
	held := new(atomic.Int64)
	buffersHeld.Store(held)
	t.Cleanup(func() { buffersHeld.Store(nil) })
	const n = 20
	type conns struct{ app, server *net.TCPConn }
	var all []conns
	for range n {
		app, server, _ := relayPair(t, time.Minute)
		all = append(all, conns{app, server})
	}
	exchange := func(c conns, i int) {
		t.Helper()
		msg := []byte(fmt.Sprintf("hello %d", i))
		got := make([]byte, len(msg))
		for _, dir := range [][2]*net.TCPConn{{c.app, c.server}, {c.server, c.app}} {
			if _, err := dir[0].Write(msg); err != nil {
				t.Fatal(err)
			}
			dir[1].SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(dir[1], got); err != nil || !bytes.Equal(got, msg) {
				t.Fatalf("connection %d: got %q (%v), want %q", i, got, err, msg)
			}
		}
	}
	for i, c := range all {
		exchange(c, i)
	}
	// Each pipe gives its buffer back once its read drained the socket;
	// it may still be writing when the other end already read.
	deadline := time.Now().Add(5 * time.Second)
	for held.Load() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if held := held.Load(); held != 0 {
		t.Errorf("%d idle relayed connections hold %d relay buffers, want none", n, held)
	}
	for i, c := range all {
		exchange(c, i)
	}
}

// readyEnd is a relay end that reads only what its socket has now
// (ReadyReader), as a tunnel connection does.
type readyEnd struct {
	*tcpConn
	n   int
	err error
}

func (r *readyEnd) ReadNoWait(p []byte) (int, error) {
	err := r.rc.Read(func(fd uintptr) bool {
		r.n, r.err = unix.Read(int(fd), p)
		return true
	})
	switch {
	case err != nil:
		return 0, err
	case r.err == unix.EAGAIN:
		return 0, ErrWouldBlock
	case r.err != nil:
		return 0, r.err
	case r.n == 0:
		return 0, io.EOF
	}
	return r.n, nil
}

func (r *readyEnd) WaitReadable() error {
	var b [1]byte
	return r.rc.Read(func(fd uintptr) bool {
		_, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		return err != unix.EAGAIN
	})
}

// TestReadyReaderHoldsNoBufferWhileWaiting: an end that can read without
// waiting (a tunnel connection) is waited on holding no relay buffer, and
// its bytes still cross both ways, its end of stream too.
func TestReadyReaderHoldsNoBufferWhileWaiting(t *testing.T) {
	held := new(atomic.Int64)
	buffersHeld.Store(held)
	t.Cleanup(func() { buffersHeld.Store(nil) })
	type relayed struct {
		app, server *net.TCPConn
		done        chan Result
	}
	var all []relayed
	for range 10 {
		app, in := pair(t)
		out, server := pair(t)
		ready := &readyEnd{tcpConn: TCP(in).(*tcpConn)}
		// Only ReadNoWait and WaitReadable, no ReadPooled: the relay must
		// take the ReadyReader path.
		end := struct {
			Conn
			ReadyReader
		}{ready, ready}
		done := make(chan Result, 1)
		go func() { done <- Relay(end, TCP(out)) }()
		all = append(all, relayed{app, server, done})
	}
	for i, r := range all {
		msg := []byte(fmt.Sprintf("hello %d", i))
		for _, dir := range [][2]*net.TCPConn{{r.app, r.server}, {r.server, r.app}} {
			if _, err := dir[0].Write(msg); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(msg))
			dir[1].SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(dir[1], got); err != nil || !bytes.Equal(got, msg) {
				t.Fatalf("connection %d: got %q (%v), want %q", i, got, err, msg)
			}
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for held.Load() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := held.Load(); n != 0 {
		t.Errorf("%d idle relayed connections hold %d relay buffers, want none", len(all), n)
	}
	for i, r := range all {
		r.app.CloseWrite()
		r.server.SetReadDeadline(time.Now().Add(5 * time.Second))
		if rest, err := io.ReadAll(r.server); err != nil || len(rest) != 0 {
			t.Errorf("connection %d: the end of stream did not cross: %q, %v", i, rest, err)
		}
		r.server.Close()
		if res := <-r.done; res.Err != nil {
			t.Errorf("connection %d: relay ended with %v", i, res.Err)
		}
	}
}
