package proxy

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/rawio"
)

// bufSize is the relay's read size: large enough that bulk transfers cost few
// syscalls (and fill four maximum-size TLS records per write), small enough
// that many idle connections stay cheap.
const bufSize = 64 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, bufSize); return &b }}

// buffersHeld, when a test sets it, counts the relay buffers taken and not
// given back: what relayed connections hold. nil otherwise: no shared
// counter on every read.
var buffersHeld atomic.Pointer[atomic.Int64]

func getBuffer() *[]byte {
	if n := buffersHeld.Load(); n != nil {
		n.Add(1)
	}
	return bufPool.Get().(*[]byte)
}

func putBuffer(bp *[]byte) {
	if n := buffersHeld.Load(); n != nil {
		n.Add(-1)
	}
	bufPool.Put(bp)
}

// Conn is one end of a relayed connection: a TCP connection (TCP) or a
// tunnel connection.
type Conn interface {
	io.Reader
	io.Writer
	// CloseWrite ends this direction cleanly: the far end reads EOF.
	CloseWrite() error
	// Abort tears the connection down so that the far end sees a reset.
	Abort()
	io.Closer
}

// TCP makes a TCP connection a relay end.
func TCP(c *net.TCPConn) Conn {
	t := &tcpConn{c: c}
	t.rc, t.rcErr = c.SyscallConn()
	t.readFn = t.readReady
	if t.rcErr == nil {
		t.w = rawio.NewWriter(t.rc)
	}
	return t
}

// tcpConn exposes only what Relay uses. Read and Write are plain read(2) and
// write(2): the relay never reaches ReadFrom/WriteTo, hence never splice(2).
// ReadPooled and Write are raw system calls (package rawio: no sysmon
// wake-up per message).
type tcpConn struct {
	c *net.TCPConn
	w *rawio.Writer // nil: the socket has no RawConn (rcErr)

	// ReadPooled's: made once per connection, not per read (one
	// goroutine reads a relay end).
	rc     syscall.RawConn
	rcErr  error
	readFn func(fd uintptr) bool
	bp     *[]byte
	n      int
	err    error
}

func (t *tcpConn) Read(p []byte) (int, error) { return t.c.Read(p) }
func (t *tcpConn) Close() error               { return t.c.Close() }

func (t *tcpConn) CloseWrite() error {
	if t.rcErr != nil {
		return t.c.CloseWrite()
	}
	if err := rawio.CloseWrite(t.rc); err != nil {
		return &net.OpError{Op: "close", Net: "tcp", Source: t.c.LocalAddr(), Addr: t.c.RemoteAddr(), Err: err}
	}
	return nil
}

func (t *tcpConn) Write(p []byte) (int, error) {
	if t.w == nil {
		return t.c.Write(p)
	}
	n, err := t.w.Write(p)
	if err != nil {
		err = &net.OpError{Op: "write", Net: "tcp", Source: t.c.LocalAddr(), Addr: t.c.RemoteAddr(), Err: err}
	}
	return n, err
}

// SetReadDeadline lets the idle timeout wake a waiting read.
func (t *tcpConn) SetReadDeadline(d time.Time) error { return t.c.SetReadDeadline(d) }

// ReadPooled reads what the socket has into a relay buffer that it takes
// from the pool only once the socket is readable, so that waiting for
// bytes holds none; the caller gives it back (putBuffer). The end of the
// stream is io.EOF. The read deadline applies.
func (t *tcpConn) ReadPooled() (*[]byte, int, error) {
	if t.rcErr != nil {
		return nil, 0, t.rcErr
	}
	t.bp, t.n, t.err = nil, 0, nil
	err := t.rc.Read(t.readFn)
	bp, n := t.bp, t.n
	t.bp = nil
	switch {
	case err != nil: // the deadline, or closed while waiting
		return nil, 0, err
	case t.err != nil:
		putBuffer(bp)
		return nil, 0, &net.OpError{Op: "read", Net: "tcp", Source: t.c.LocalAddr(), Addr: t.c.RemoteAddr(), Err: os.NewSyscallError("read", t.err)}
	case n == 0:
		putBuffer(bp)
		return nil, 0, io.EOF
	}
	return bp, n, nil
}

// readReady is ReadPooled's read(2), run by RawConn.Read: false (wait
// until readable, then again) while the socket has nothing.
func (t *tcpConn) readReady(fd uintptr) bool {
	t.bp = getBuffer()
	t.n, t.err = rawio.Read(fd, *t.bp)
	if t.err == unix.EAGAIN {
		putBuffer(t.bp)
		t.bp = nil
		return false
	}
	return true
}

// pooledReader is a relay end that reads into pooled buffers it takes only
// once there is something to read: an idle relayed connection then holds
// no relay buffer (64 KiB a direction otherwise).
type pooledReader interface {
	ReadPooled() (*[]byte, int, error)
}

// ErrWouldBlock is what a ReadyReader's ReadNoWait returns when it has no
// bytes at hand.
var ErrWouldBlock = errors.New("read would block")

// ReadyReader is a relay end that can read without waiting and wait
// without reading (a tunnel connection, whose TLS layer may hold bytes the
// socket does not show): the relay then takes a buffer only when there are
// bytes.
type ReadyReader interface {
	// ReadNoWait reads what the end has at hand, or returns ErrWouldBlock.
	ReadNoWait(p []byte) (int, error)
	// WaitReadable waits, under the read deadline, until ReadNoWait may
	// find bytes (or the end of the stream, or an error).
	WaitReadable() error
}

// readPooled is src's ReadPooled; for a ReadyReader, a read into a pooled
// buffer taken only when there are bytes; else a Read into a pooled buffer
// that is held while the Read waits.
func readPooled(src Conn) func() (*[]byte, int, error) {
	if pr, ok := src.(pooledReader); ok {
		return pr.ReadPooled
	}
	if rr, ok := src.(ReadyReader); ok {
		return func() (*[]byte, int, error) {
			for {
				bp := getBuffer()
				n, err := rr.ReadNoWait(*bp)
				if n > 0 {
					return bp, n, err
				}
				putBuffer(bp)
				if !errors.Is(err, ErrWouldBlock) {
					return nil, 0, err
				}
				if err := rr.WaitReadable(); err != nil {
					return nil, 0, err
				}
			}
		}
	}
	return func() (*[]byte, int, error) {
		bp := getBuffer()
		n, err := src.Read(*bp)
		if n == 0 {
			putBuffer(bp)
			return nil, 0, err
		}
		return bp, n, err
	}
}

// Abort closes with SO_LINGER 0, which sends a reset.
func (t *tcpConn) Abort() {
	t.c.SetLinger(0)
	t.c.Close()
}

// Result is what one relayed connection moved.
type Result struct {
	// AtoB and BtoA count the bytes written in each direction.
	AtoB, BtoA int64
	// Err is the first error other than a clean end of stream.
	Err error
}

// Relay moves bytes both ways between a and b until both directions end,
// then closes both. A clean end of stream on one side becomes a half-close
// (CloseWrite) on the other, so protocols that half-close keep working; an
// error on one side aborts both, so a reset reaches the far end as a reset,
// not as a clean close.
//
// It reads and writes through pooled buffers taken per read, so nothing is
// allocated per read. io.Copy between two TCPConns would use splice(2),
// which sees none of the bytes sk_msg redirects into a spliced socket.
// One direction runs in a goroutine of its own, the other in the caller's
// (Parker.Relay, with no Parker).
func Relay(a, b Conn) Result { return relayWait(a, b, RelayOptions{}) }
