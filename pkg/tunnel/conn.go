package tunnel

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/proxy"
	"github.com/smesh-dev/smesh/pkg/rawio"
)

// link is one connection between two smeshd: a TLS connection (or plain
// TCP with [tunnel.tls] mode = "disabled"). In protocol v1 it carries one
// tunnelled connection, past header and status, and is a proxy.Conn for
// the relay itself; in v2 it carries one tunnelled connection after
// another in frames (frame.go), and a client keeps it in its pool between
// them. Half-close travels as TLS close_notify (v1) or an 'F' frame (v2); a
// reset as a TCP reset of the connection underneath.
type link struct {
	net.Conn          // the *tls.Conn, or the raw connection without TLS
	raw      *rawConn // the TCP connection underneath
	tls      *tls.Conn
	// resumed: the TLS handshake resumed an earlier session.
	resumed bool
	// version is the wire protocol, from ALPN: Version, Version2 or
	// Version3 (framed: Version2 and later).
	version byte
	// node is the peer's SPIFFE ID (server side, with TLS).
	node spiffeid.ID

	// Client side: what the link was checked against, so that a pooled
	// link is reused only while that still holds (pool.go).
	peer      netip.AddrPort
	set       *credSet
	policy    *IdentityPolicy
	leaf      *x509.Certificate
	idleSince time.Time

	// v2 frames being read (by one goroutine at a time): data bytes left
	// in the current 'D' frame, and the frame header.
	rem int
	fh  [frameHeaderSize]byte
	fhn int // bytes of fh read
	// wh is the header of a frame sent on its own (an end, or the header
	// of a large frame); a small frame is copied behind its header into a
	// pooled buffer (smallPool), taken only while it is sent: an idle
	// link holds none.
	wh [frameHeaderSize]byte
}

func newLink(raw *rawConn, tc *tls.Conn) *link {
	l := &link{raw: raw, tls: tc, Conn: raw, version: Version}
	if tc != nil {
		l.Conn = tc
		cs := tc.ConnectionState()
		l.resumed = cs.DidResume
		switch cs.NegotiatedProtocol {
		case ALPN2:
			l.version = Version2
		case ALPN3:
			l.version = Version3
		}
		if len(cs.PeerCertificates) > 0 {
			l.leaf = cs.PeerCertificates[0]
		}
	}
	return l
}

// Read reads from the tunnel. A TCP end of stream without TLS close_notify
// is an error, not io.EOF: crypto/tls takes one at a record boundary for a
// clean end, but for a tunnel it means the stream was cut short (a peer that
// died, or a forged FIN), and the relay must pass that on as a reset.
//
// With TLS, one Read returns as many whole records as fit in p and are
// already read from the socket (rawConn reads up to readSize at once), so
// that the relay writes one large chunk rather than one per 16 KiB record.
func (c *link) Read(p []byte) (int, error) {
	if c.tls == nil {
		return c.raw.Read(p)
	}
	n, err := c.tls.Read(p)
	if err == nil {
		mode := c.raw.mode
		c.raw.mode = readBuffered
		for len(p)-n >= maxRecordPlaintext {
			m, err := c.tls.Read(p[n:])
			n += m
			// Without a whole record at hand, crypto/tls reports
			// rawConn's would-block as a timeout, which it does not
			// keep; a real error it keeps, for the next Read.
			if err != nil || m == 0 {
				break
			}
		}
		c.raw.mode = mode
	}
	if err == io.EOF && c.raw.eof.Load() {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// ReadNoWait is Read of what the connection holds already (read from the
// socket, not yet taken), or proxy.ErrWouldBlock. With WaitReadable it
// lets the relay wait for bytes without holding a buffer
// (proxy.ReadyReader).
func (c *link) ReadNoWait(p []byte) (int, error) {
	return c.noWait(func() (int, error) { return c.Read(p) })
}

// noWait runs read (a Read of this link, or of a stream on it) on what the
// link holds already, without reading the socket.
func (c *link) noWait(read func() (int, error)) (int, error) {
	c.raw.mode = readBuffered
	n, err := read()
	c.raw.mode = readWait
	if errors.Is(err, errWouldBlock) {
		if n > 0 {
			return n, nil
		}
		return 0, proxy.ErrWouldBlock
	}
	return n, err
}

// WaitReadable waits, under the read deadline, until the socket has bytes,
// its end or an error, and reads them for ReadNoWait; the read buffer is
// taken only once there are bytes (proxy.ReadyReader).
func (c *link) WaitReadable() error {
	r := c.raw
	if r.rbuf != nil || r.final != nil {
		return nil
	}
	if err := r.fill(); err != nil && r.final == nil {
		return err // the deadline, or closed
	}
	return nil // bytes, or the socket's end or error: ReadNoWait reports it as Read would
}

// SyscallConn is the socket's, for a proxy.Parker to watch: readable when
// the link has bytes the TLS layer does not hold yet.
func (c *link) SyscallConn() (syscall.RawConn, error) {
	if c.raw.sc == nil {
		return nil, errors.New("tunnel link without a raw socket")
	}
	return c.raw.sc, nil
}

// maxRecordPlaintext is the most a TLS record carries.
const maxRecordPlaintext = 16 << 10

// Write encrypts p into TLS records and sends them with one write(2): p
// of up to 64 KiB is four full records, and one large send costs the
// kernel far less than four small ones, on both nodes.
func (c *link) Write(p []byte) (int, error) {
	if c.tls == nil {
		return c.raw.Write(p)
	}
	c.raw.startBatch()
	n, err := c.tls.Write(p)
	if ferr := c.raw.flushBatch(); err == nil {
		err = ferr
	}
	return n, err
}

// CloseWrite ends this direction cleanly: close_notify with TLS (the other
// direction stays open: TLS 1.3 allows half-close), a FIN without.
func (c *link) CloseWrite() error {
	if c.tls != nil {
		return c.tls.CloseWrite()
	}
	return c.raw.CloseWrite()
}

// Abort resets the TCP connection underneath without a close_notify, so
// the far end sees an error, not an end of stream.
func (c *link) Abort() {
	c.raw.SetLinger(0)
	c.raw.TCPConn.Close()
}

// Close closes the connection; with TLS, after a close_notify unless one
// was sent already.
func (c *link) Close() error { return c.Conn.Close() }

// rawConn is the TCP connection under a tunnel's TLS session. It notes when
// the peer's FIN was read (see Conn.Read), and once the session is
// established it ignores write deadlines: crypto/tls sets a 5-second one
// around close_notify, which would turn a half-close towards a slow reader
// into a reset. Relayed connections have no deadlines; they end by EOF,
// error or Abort.
type rawConn struct {
	*net.TCPConn
	eof         atomic.Bool
	established atomic.Bool

	// Server side: the credentials its handshake used and the identity
	// policy its peer was checked against, so that a v2 connection carries
	// no more tunnelled connections once either changed; idle while it
	// waits for the next header (Shutdown wakes those).
	set    *credSet
	policy *IdentityPolicy
	idle   atomic.Bool

	// While a batch is open, writes (the records of one Conn.Write, and
	// any alert crypto/tls sends meanwhile from the reading side, in the
	// order crypto/tls produced them) are collected and sent together.
	wmu   sync.Mutex
	batch *[]byte
	w     *rawio.Writer // nil: write with TCPConn.Write (no RawConn)

	// Read side, used by the reading goroutine only: bytes read from the
	// socket that crypto/tls has not taken yet, in a pooled buffer held
	// only while it holds bytes (an idle connection holds none).
	sc   syscall.RawConn
	peek *peeker // looks without reading (link.alive)
	rbuf *[]byte
	roff int
	mode readMode // how Read gets bytes when none are buffered
	// final is the socket's end (io.EOF) or error, once read.
	final error
	// readFn and its results: made once per connection, not per read.
	readFn func(fd uintptr) bool
	rn     int
	rerr   error
}

// readMode is how rawConn.Read gets bytes when it has none buffered.
// readBuffered returns a timeout where it would read the socket, which
// crypto/tls passes on without keeping it: it reads the rest of a record at
// the next call.
type readMode uint8

const (
	readWait     readMode = iota // read the socket, waiting (under the read deadline) until it has bytes
	readBuffered                 // do not read the socket
)

// errWouldBlock is what rawConn.Read returns in readBuffered mode when it
// has nothing: a timeout, which crypto/tls does not keep.
var errWouldBlock = os.ErrDeadlineExceeded

// readSize is how much one read(2) of a tunnel connection takes: four
// full records and then some.
const readSize = 80 << 10

var readPool = sync.Pool{New: func() any { b := make([]byte, readSize); return &b }}

// batchSize fits the records of a 64 KiB write: four records of 16 KiB,
// each with a 5-byte header and a 17-byte tag and type.
const batchSize = 64<<10 + 4*(5+17) + 512

var batchPool = sync.Pool{New: func() any { b := make([]byte, 0, batchSize); return &b }}

// newRawConn wraps a tunnel connection's socket.
func newRawConn(c *net.TCPConn) *rawConn {
	r := &rawConn{TCPConn: c}
	if sc, err := c.SyscallConn(); err == nil {
		r.sc = sc
		r.w = rawio.NewWriter(sc)
	}
	return r
}

// write writes p to the socket; the caller holds wmu.
func (r *rawConn) write(p []byte) (int, error) {
	if r.w == nil {
		return r.TCPConn.Write(p)
	}
	n, err := r.w.Write(p)
	if err != nil {
		err = &net.OpError{Op: "write", Net: "tcp", Source: r.LocalAddr(), Addr: r.RemoteAddr(), Err: err}
	}
	return n, err
}

// startBatch opens a batch, unless one is open: then what comes joins it.
func (r *rawConn) startBatch() {
	r.wmu.Lock()
	if r.batch == nil {
		r.batch = batchPool.Get().(*[]byte)
	}
	r.wmu.Unlock()
}

// flushBatch sends the open batch, if any.
func (r *rawConn) flushBatch() error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	b := r.batch
	if b == nil {
		return nil
	}
	r.batch = nil
	_, err := r.write(*b)
	*b = (*b)[:0]
	batchPool.Put(b)
	return err
}

// batchLen is how much the open batch holds.
func (r *rawConn) batchLen() int {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	if r.batch == nil {
		return 0
	}
	return len(*r.batch)
}

func (r *rawConn) Write(p []byte) (int, error) {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	if r.batch != nil {
		*r.batch = append(*r.batch, p...)
		return len(p), nil
	}
	return r.write(p)
}

// Read serves crypto/tls from the read buffer, filling it with one read(2)
// when it is empty.
func (r *rawConn) Read(p []byte) (int, error) {
	if r.rbuf == nil {
		if r.final != nil {
			return 0, r.final
		}
		if r.mode == readBuffered {
			return 0, errWouldBlock
		}
		if err := r.fill(); err != nil {
			return 0, err
		}
	}
	n := copy(p, (*r.rbuf)[r.roff:])
	r.roff += n
	if r.roff == len(*r.rbuf) {
		*r.rbuf = (*r.rbuf)[:cap(*r.rbuf)]
		readPool.Put(r.rbuf)
		r.rbuf = nil
	}
	return n, nil
}

// fill reads what the socket has, up to readSize, waiting (under the read
// deadline) until it has something. The buffer is taken from the pool only
// once the socket is readable. The socket's end or error is final: every
// later Read returns it.
func (r *rawConn) fill() error {
	if r.readFn == nil {
		if _, err := r.syscallConn(); err != nil {
			return err
		}
		r.readFn = func(fd uintptr) bool {
			if r.rbuf == nil {
				r.rbuf = readPool.Get().(*[]byte)
			}
			r.rn, r.rerr = rawio.Read(fd, *r.rbuf)
			if r.rerr == unix.EAGAIN {
				readPool.Put(r.rbuf)
				r.rbuf = nil
				return false // wait until readable
			}
			return true
		}
	}
	r.rn, r.rerr = 0, nil
	err := r.sc.Read(r.readFn)
	if err == nil && r.rerr != nil {
		err = &net.OpError{Op: "read", Net: "tcp", Source: r.LocalAddr(), Addr: r.RemoteAddr(), Err: os.NewSyscallError("read", r.rerr)}
		r.final = err
	}
	if err == nil && r.rn == 0 {
		r.eof.Store(true)
		err = io.EOF
		r.final = err
	}
	if err != nil {
		if r.rbuf != nil {
			readPool.Put(r.rbuf)
			r.rbuf = nil
		}
		return err
	}
	*r.rbuf = (*r.rbuf)[:r.rn]
	r.roff = 0
	return nil
}

// syscallConn is the socket's RawConn, made once.
func (r *rawConn) syscallConn() (syscall.RawConn, error) {
	if r.sc == nil {
		sc, err := r.TCPConn.SyscallConn()
		if err != nil {
			return nil, err
		}
		r.sc = sc
	}
	return r.sc, nil
}

// peeker is the socket's, made once.
func (r *rawConn) peeker() (*peeker, error) {
	if r.peek == nil {
		sc, err := r.syscallConn()
		if err != nil {
			return nil, err
		}
		r.peek = newPeeker(sc)
	}
	return r.peek, nil
}

func (r *rawConn) SetWriteDeadline(t time.Time) error {
	if r.established.Load() {
		return nil
	}
	return r.TCPConn.SetWriteDeadline(t)
}

func (r *rawConn) SetDeadline(t time.Time) error {
	if r.established.Load() {
		return r.TCPConn.SetReadDeadline(t)
	}
	return r.TCPConn.SetDeadline(t)
}
