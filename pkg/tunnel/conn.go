package tunnel

import (
	"crypto/tls"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Conn is an established tunnel connection, past header and status: a
// proxy.Conn for the relay. Half-close travels as TLS close_notify; a reset
// as a TCP reset of the connection underneath.
type Conn struct {
	net.Conn          // the *tls.Conn, or the raw connection without TLS
	raw      *rawConn // the TCP connection underneath
	tls      *tls.Conn
	// Resumed: the TLS handshake resumed an earlier session.
	Resumed bool
}

func newConn(raw *rawConn, tc *tls.Conn) *Conn {
	c := &Conn{raw: raw, tls: tc, Conn: raw}
	if tc != nil {
		c.Conn = tc
		c.Resumed = tc.ConnectionState().DidResume
	}
	return c
}

// Read reads from the tunnel. A TCP end of stream without TLS close_notify
// is an error, not io.EOF: crypto/tls takes one at a record boundary for a
// clean end, but for a tunnel it means the stream was cut short (a peer that
// died, or a forged FIN), and the relay must pass that on as a reset.
func (c *Conn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err == io.EOF && c.tls != nil && c.raw.eof.Load() {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// Write encrypts p into TLS records and sends them with one write(2): p
// of up to 64 KiB is four full records, and one large send costs the
// kernel far less than four small ones, on both nodes.
func (c *Conn) Write(p []byte) (int, error) {
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
func (c *Conn) CloseWrite() error {
	if c.tls != nil {
		return c.tls.CloseWrite()
	}
	return c.raw.CloseWrite()
}

// Abort resets the TCP connection underneath without a close_notify, so
// the far end sees an error, not an end of stream.
func (c *Conn) Abort() {
	c.raw.SetLinger(0)
	c.raw.TCPConn.Close()
}

// Close closes the connection; with TLS, after a close_notify unless one
// was sent already.
func (c *Conn) Close() error { return c.Conn.Close() }

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

	// While a batch is open, writes (the records of one Conn.Write, and
	// any alert crypto/tls sends meanwhile from the reading side, in the
	// order crypto/tls produced them) are collected and sent together.
	wmu   sync.Mutex
	batch *[]byte
}

// batchSize fits the records of a 64 KiB write: four records of 16 KiB,
// each with a 5-byte header and a 17-byte tag and type.
const batchSize = 64<<10 + 4*(5+17) + 512

var batchPool = sync.Pool{New: func() any { b := make([]byte, 0, batchSize); return &b }}

func (r *rawConn) startBatch() {
	r.wmu.Lock()
	r.batch = batchPool.Get().(*[]byte)
	r.wmu.Unlock()
}

func (r *rawConn) flushBatch() error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	b := r.batch
	r.batch = nil
	_, err := r.TCPConn.Write(*b)
	*b = (*b)[:0]
	batchPool.Put(b)
	return err
}

func (r *rawConn) Write(p []byte) (int, error) {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	if r.batch != nil {
		*r.batch = append(*r.batch, p...)
		return len(p), nil
	}
	return r.TCPConn.Write(p)
}

func (r *rawConn) Read(p []byte) (int, error) {
	n, err := r.TCPConn.Read(p)
	if err == io.EOF {
		r.eof.Store(true)
	}
	return n, err
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
