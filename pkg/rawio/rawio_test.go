package rawio

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

func pair(t *testing.T) (client, server *net.TCPConn) { return testenv.TCPPair(t) }

func rawConn(t *testing.T, c *net.TCPConn) syscall.RawConn {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	return rc
}

// read runs Read once on c's socket, without waiting.
func read(t *testing.T, c *net.TCPConn, p []byte) (int, error) {
	var n int
	var err error
	if e := rawConn(t, c).Read(func(fd uintptr) bool { n, err = Read(fd, p); return true }); e != nil {
		t.Fatal(e)
	}
	return n, err
}

func peek(t *testing.T, c *net.TCPConn) error {
	var b [1]byte
	var err error
	if e := rawConn(t, c).Read(func(fd uintptr) bool { err = PeekNoWait(fd, &b); return true }); e != nil {
		t.Fatal(e)
	}
	return err
}

// TestWriteWaitsForRoom writes far more than the socket buffers hold to a
// peer that reads slowly: Write must wait in the poller at EAGAIN and go
// on, and the peer must get every byte in order.
func TestWriteWaitsForRoom(t *testing.T) {
	c, s := pair(t)
	c.SetWriteBuffer(16 << 10)
	s.SetReadBuffer(16 << 10)
	want := make([]byte, 8<<20)
	for i := range want {
		want[i] = byte(i * 7 / 5)
	}
	got := make(chan []byte)
	go func() {
		var b bytes.Buffer
		buf := make([]byte, 4096)
		for b.Len() < len(want) {
			n, err := s.Read(buf)
			b.Write(buf[:n])
			if err != nil {
				break
			}
			if b.Len() < 1<<20 {
				time.Sleep(100 * time.Microsecond) // slow at first: the writer meets a full buffer
			}
		}
		got <- b.Bytes()
	}()
	w := NewWriter(rawConn(t, c))
	n, err := w.Write(want)
	if err != nil || n != len(want) {
		t.Fatalf("Write = %d, %v; want %d, nil", n, err, len(want))
	}
	if g := <-got; !bytes.Equal(g, want) {
		t.Fatalf("the peer read %d bytes, not what was written", len(g))
	}
}

func TestReadAndPeek(t *testing.T) {
	c, s := pair(t)
	buf := make([]byte, 64)
	if n, err := read(t, s, buf); n != 0 || err != syscall.EAGAIN {
		t.Fatalf("Read of an empty socket = %d, %v; want 0, EAGAIN", n, err)
	}
	if err := peek(t, s); err != syscall.EAGAIN {
		t.Fatalf("PeekNoWait of an empty socket = %v, want EAGAIN", err)
	}
	if _, err := NewWriter(rawConn(t, c)).Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for peek(t, s) == syscall.EAGAIN {
		if time.Now().After(deadline) {
			t.Fatal("PeekNoWait never saw the bytes written")
		}
		time.Sleep(time.Millisecond)
	}
	if n, err := read(t, s, buf); err != nil || string(buf[:n]) != "hello" {
		t.Fatalf("Read = %q, %v; want \"hello\"", buf[:n], err)
	}
	c.CloseWrite()
	for peek(t, s) == syscall.EAGAIN {
		if time.Now().After(deadline) {
			t.Fatal("PeekNoWait never saw the end of the stream")
		}
		time.Sleep(time.Millisecond)
	}
	if n, err := read(t, s, buf); n != 0 || err != nil {
		t.Fatalf("Read at the end of the stream = %d, %v; want 0, nil", n, err)
	}
}

// TestWriteErrors: the system call's error, the deadline and a closed
// socket come back as net.Conn's Write would give them.
func TestWriteErrors(t *testing.T) {
	t.Run("reset", func(t *testing.T) {
		c, s := pair(t)
		s.SetLinger(0)
		s.Close()
		w := NewWriter(rawConn(t, c))
		var err error
		for i := 0; i < 100 && err == nil; i++ {
			_, err = w.Write(make([]byte, 4096))
			time.Sleep(time.Millisecond)
		}
		var se *os.SyscallError
		if !errors.As(err, &se) || !(errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)) {
			t.Fatalf("Write to a reset connection = %v, want a write SyscallError with ECONNRESET or EPIPE", err)
		}
	})
	t.Run("deadline", func(t *testing.T) {
		c, _ := pair(t) // nobody reads
		w := NewWriter(rawConn(t, c))
		c.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
		n, err := w.Write(make([]byte, 64<<20))
		if !errors.Is(err, os.ErrDeadlineExceeded) || n == 0 || n == 64<<20 {
			t.Fatalf("Write past the deadline = %d, %v; want part written and ErrDeadlineExceeded", n, err)
		}
	})
	t.Run("closed", func(t *testing.T) {
		c, _ := pair(t)
		w := NewWriter(rawConn(t, c))
		c.Close()
		if _, err := w.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Write after Close = %v, want net.ErrClosed", err)
		}
	})
}

func TestWriteAllocatesNothing(t *testing.T) {
	c, s := pair(t)
	go io.Copy(io.Discard, s)
	w := NewWriter(rawConn(t, c))
	msg := make([]byte, 64)
	if a := testing.AllocsPerRun(1000, func() { w.Write(msg) }); a != 0 {
		t.Fatalf("Write allocates %.1f times, want 0", a)
	}
}

func TestCloseWrite(t *testing.T) {
	c, s := pair(t)
	if _, err := NewWriter(rawConn(t, c)).Write([]byte("last")); err != nil {
		t.Fatal(err)
	}
	if err := CloseWrite(rawConn(t, c)); err != nil {
		t.Fatal(err)
	}
	s.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(s); err != nil || string(b) != "last" {
		t.Fatalf("the peer read %q, %v; want \"last\" and the end of the stream", b, err)
	}
	// The other direction stays open.
	if _, err := s.Write([]byte("back")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "back" {
		t.Fatalf("read %q, %v after CloseWrite; want \"back\"", b, err)
	}
	c.Close()
	if err := CloseWrite(rawConn(t, c)); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("CloseWrite after Close = %v, want net.ErrClosed", err)
	}
}
