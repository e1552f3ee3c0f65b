package tunnel

import (
	"crypto/tls"
	"io"
	"net"
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
