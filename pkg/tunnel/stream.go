package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/smesh-dev/smesh/pkg/proxy"
)

// Conn is a tunnelled connection opened by a Client: a proxy.Conn for the
// relay. Half-close reaches the far end as an end of stream, a reset
// (Abort) as a reset.
//
// In protocol v1 it is one TLS connection of its own, past header and
// status. In v2 it rides a pooled link; it may send before the peer's
// status came (the first Read waits for it), so a refusal shows as the
// error of a Read or Write, never as an end of stream.
type Conn struct {
	net.Conn // the first link's, for addresses
	// Resumed: the TLS handshake of the connection it rides resumed an
	// earlier session (a reused v2 link keeps its first handshake's).
	Resumed bool
	// Reused: it rides a link that carried another connection before.
	Reused bool

	raw *rawConn // the first link's TCP connection (tests)
	v1  *link    // protocol v1: the link, past header and status

	// v2 only.
	c   *Client
	dst netip.AddrPort
	h   *Header // sent again, in the new link's version, on a retry

	rmu      sync.Mutex // who reads the status
	mu       sync.Mutex
	l        *link       // under mu while the status is pending
	state    streamState // under mu
	err      error       // why it failed, under mu
	early    []byte      // sent before the status: sent again on a retry
	earlyFin bool
	// release gives back the place among the handshakes under way to the
	// peer (dialSlots) of the link this connection opened, when it leaves
	// the pending state; nil on a warm link.
	release func()
	// st holds the status as it arrives (stn bytes), under rmu: a read
	// that does not wait may find part of it.
	st  [StatusSize]byte
	stn int
	// statusLate: WaitReadable waited the status's timeout for it in
	// vain (under rmu); the next ReadNoWait fails the connection.
	statusLate bool
	retried    bool
	finSent    bool
	finRead    bool // by the reading goroutine only
	closed     bool
}

type streamState int

const (
	streamPending streamState = iota
	streamOK
	streamFailed
)

// earlyMax bounds what a v2 connection sends before the peer's status (one
// relay read): more waits for the status. Kept for a retry, so bounded.
const earlyMax = 64 << 10

// errAborted is the error of a connection this side reset.
var errAborted = errors.New("tunnel connection reset")

func (c *Conn) Read(p []byte) (int, error) {
	if c.v1 != nil {
		return c.v1.Read(p)
	}
	if c.finRead {
		return 0, io.EOF
	}
	c.mu.Lock()
	state, l := c.state, c.l
	c.mu.Unlock()
	if state != streamOK {
		var err error
		if l, err = c.awaitStatus(); err != nil {
			return 0, err
		}
	}
	return readStream(l, p, &c.finRead)
}

// readStream reads the data frames of one tunnelled connection on l into
// p; its end frame is io.EOF, noted in *fin.
func readStream(l *link, p []byte, fin *bool) (int, error) {
	if *fin {
		return 0, io.EOF
	}
	for {
		n, end, err := l.readData(p)
		if end {
			*fin = true
			return 0, io.EOF
		}
		if n > 0 || err != nil || len(p) == 0 {
			return n, err
		}
	}
}

// ReadNoWait is Read without waiting, or proxy.ErrWouldBlock
// (proxy.ReadyReader). Before the peer's status it reads the status if the
// link holds it (WaitReadable waits for it), and is ErrWouldBlock until
// then: the relay holds no buffer while a busy peer takes its time to
// answer.
func (c *Conn) ReadNoWait(p []byte) (int, error) {
	if c.v1 != nil {
		return c.v1.ReadNoWait(p)
	}
	if l := c.established(); l != nil {
		return l.noWait(func() (int, error) { return c.Read(p) })
	}
	if _, err := c.readStatus(true); err != nil {
		return 0, err
	}
	return c.ReadNoWait(p)
}

// WaitReadable waits, holding no buffer, until ReadNoWait may find bytes
// (proxy.ReadyReader). Before the peer's status it waits, under the
// status's timeout, for the link to have bytes (the status, or its end),
// which ReadNoWait then reads: a relay that waits for the status of a
// connection holds no buffer either, however long a busy peer takes to
// answer.
func (c *Conn) WaitReadable() error {
	if c.v1 != nil {
		return c.v1.WaitReadable()
	}
	if l := c.established(); l != nil {
		return l.WaitReadable()
	}
	// rmu: awaitStatus (a Write's) reads the link meanwhile otherwise.
	c.rmu.Lock()
	defer c.rmu.Unlock()
	c.mu.Lock()
	l, pending := c.l, c.state == streamPending
	c.mu.Unlock()
	if pending {
		// Whatever ends the wait, ReadNoWait reads the status or says
		// why there is none.
		l.raw.SetReadDeadline(time.Now().Add(c.c.timeout))
		err := l.WaitReadable()
		l.raw.SetReadDeadline(time.Time{})
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			c.statusLate = true
		}
	}
	return nil
}

// established is the link a v2 connection rides once the peer's status
// accepted it, else nil.
func (c *Conn) established() *link {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state != streamOK {
		return nil
	}
	return c.l
}

func (c *Conn) Write(p []byte) (int, error) {
	if c.v1 != nil {
		return c.v1.Write(p)
	}
	for {
		c.mu.Lock()
		switch c.state {
		case streamFailed:
			err := c.err
			c.mu.Unlock()
			return 0, err
		case streamOK:
			l := c.l
			c.mu.Unlock()
			return l.writeData(p)
		}
		if len(c.early)+len(p) > earlyMax {
			// No more before the peer's answer: read it here if no
			// Read does (a writer that reads only at the end).
			c.mu.Unlock()
			if _, err := c.awaitStatus(); err != nil {
				return 0, err
			}
			continue
		}
		c.early = append(c.early, p...)
		// An error here shows in the status (and a retry sends again).
		c.l.writeData(p)
		c.mu.Unlock()
		return len(p), nil
	}
}

// CloseWrite ends this direction: the far end reads an end of stream.
func (c *Conn) CloseWrite() error {
	if c.v1 != nil {
		return c.v1.CloseWrite()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.state == streamFailed:
		return c.err
	case c.finSent:
		return nil
	}
	c.finSent = true
	if c.state == streamPending {
		c.earlyFin = true
		c.l.writeFin()
		return nil
	}
	return c.l.writeFin()
}

// Abort resets the connection: the far end sees an error, not an end of
// stream. The link it rode is reset with it.
func (c *Conn) Abort() {
	if c.v1 != nil {
		c.v1.Abort()
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.resolve(streamFailed, errAborted)
	c.closed = true
	c.l.Abort()
}

// Close ends the connection. A v2 connection that ended cleanly, both
// directions, gives its link back to the pool; any other is closed like a
// v1 connection (an end of stream for the far end, if not sent yet).
func (c *Conn) Close() error {
	if c.v1 != nil {
		return c.v1.Close()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	if c.state == streamOK && c.finSent && c.finRead && c.l.rem == 0 {
		c.c.pool.put(c.l)
		return nil
	}
	if c.state != streamFailed && !c.finSent {
		c.l.writeFin()
	}
	c.resolve(streamFailed, net.ErrClosed)
	return c.l.Close()
}

// SetReadDeadline lets the relay's idle timeout wake a waiting Read.
func (c *Conn) SetReadDeadline(t time.Time) error {
	if c.v1 != nil {
		return c.v1.SetReadDeadline(t)
	}
	c.mu.Lock()
	l := c.l
	c.mu.Unlock()
	return l.raw.SetReadDeadline(t)
}

// SyscallConn is the tunnel socket's, for a proxy.Parker to watch.
func (c *Conn) SyscallConn() (syscall.RawConn, error) {
	if c.v1 != nil {
		return c.v1.SyscallConn()
	}
	c.mu.Lock()
	l := c.l
	c.mu.Unlock()
	return l.SyscallConn()
}

// ParkReady: a v2 connection parks only once the peer's status came (before,
// its waits keep a deadline of their own).
func (c *Conn) ParkReady() bool { return c.v1 != nil || c.established() != nil }

// resolve leaves the pending state (under mu); later calls change nothing.
func (c *Conn) resolve(s streamState, err error) {
	if c.state != streamPending {
		return
	}
	c.state, c.err = s, err
	c.early = nil
	if c.release != nil {
		c.release()
		c.release = nil
	}
}

// awaitStatus reads the peer's status (by Read, or by a Write that may send
// no more before it; rmu lets one at a time read it). A peer
// that says the connection was not delivered (it retired the link: a
// close_notify where the status belongs, or the refusal "retired") gets
// it again once, on a new link.
func (c *Conn) awaitStatus() (*link, error) { return c.readStatus(false) }

// readStatus is awaitStatus; with noWait it reads only what the link holds
// already (read from the socket by WaitReadable), and returns
// proxy.ErrWouldBlock when the status is not all there.
func (c *Conn) readStatus(noWait bool) (*link, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	for {
		c.mu.Lock()
		l, state, err := c.l, c.state, c.err
		c.mu.Unlock()
		switch state {
		case streamOK:
			return l, nil
		case streamFailed:
			return nil, err
		}
		err = nil
		if noWait {
			l.raw.mode = readBuffered
		} else {
			l.raw.SetReadDeadline(time.Now().Add(c.c.timeout))
		}
		for c.stn < StatusSize && err == nil {
			var m int
			m, err = l.Read(c.st[c.stn:])
			c.stn += m
		}
		if noWait {
			l.raw.mode = readWait
			if errors.Is(err, errWouldBlock) {
				if !c.statusLate {
					return nil, proxy.ErrWouldBlock
				}
				err = os.ErrDeadlineExceeded
			}
		} else {
			l.raw.SetReadDeadline(time.Time{})
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// Not a deadline error any more: the relay's idle timeout
			// would take it for its own and read again.
			err = fmt.Errorf("no status within %s", c.c.timeout)
		}
		if c.stn < StatusSize && err == io.EOF && c.stn > 0 {
			err = io.ErrUnexpectedEOF
		}
		n := c.stn
		c.stn = 0
		var status Status
		if err == nil {
			status, err = parseStatus(c.st[:], l.version)
		}
		retire := n == 0 && err == io.EOF || err == nil && !status.OK && status.Reason == ReasonRetired
		if retire && !c.retried {
			c.retried = true
			if err := c.again(l); err != nil {
				return nil, err
			}
			continue
		}
		var reason Reason
		switch {
		case err != nil && isAlert(err):
			reason, err = ReasonPeerRefusedHandshake, refusedHandshake(l.peer, err)
		case err != nil:
			reason, err = ReasonPeerProtocol, fmt.Errorf("reading tunnel status from %s: %w", l.peer, err)
		case !status.OK:
			reason, err = ReasonPeerRefused, &RefusedError{Peer: l.peer, Dst: c.dst, Reason: status.Reason}
		}
		c.mu.Lock()
		if err == nil {
			c.resolve(streamOK, nil)
		} else {
			c.resolve(streamFailed, err)
		}
		err = c.err
		c.mu.Unlock()
		if err != nil {
			l.Abort()
			if !errors.Is(err, errAborted) && !errors.Is(err, net.ErrClosed) {
				c.c.failed(c.dst, reason, err)
			}
			return nil, err
		}
		c.c.stats.Out.Connections.Add(1)
		return l, nil
	}
}

// again sends the header, and what was sent early, on a new link.
func (c *Conn) again(old *link) error {
	old.Close()
	// The peer retires links for a reason that holds for its other
	// links too (new credentials or policy, or it is draining).
	c.c.pool.drop(old.peer)
	l, reason, err := c.c.dialLink(context.Background(), c.dst)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err == nil && c.state == streamPending {
		_, err = l.Write(c.h.encode(l.version))
		if err == nil && len(c.early) > 0 {
			_, err = l.writeData(c.early)
		}
		if err == nil && c.earlyFin {
			err = l.writeFin()
		}
		reason = ReasonPeerUnreachable
	}
	if c.state != streamPending {
		err = c.err
	}
	if err != nil {
		if l != nil {
			l.Abort()
		}
		if c.state == streamPending {
			c.c.failed(c.dst, reason, err)
		}
		c.resolve(streamFailed, err)
		return c.err
	}
	c.l = l
	c.Reused, c.Resumed = false, l.resumed
	return nil
}

// serverStream is one tunnelled connection on a v2 link, server side. Its
// writes wait in the link's batch while the local end has more to read at
// once (corked): a local server's answer and its end of stream then cross
// the tunnel in one send, and wake the client's node once.
type serverStream struct {
	l     *link
	local *peeker // the local end, to look for more to read
	// settled: a look found nothing to read; more() looks no more.
	settled bool
	// flush sends the batch the status opened after at most statusDelay
	// (see Server.relay), unless a write sent it first.
	flush   atomic.Pointer[time.Timer] // Abort may stop it from the other direction
	finRead bool
	finSent bool
	aborted bool
}

func (s *serverStream) Read(p []byte) (int, error) { return readStream(s.l, p, &s.finRead) }

// ReadNoWait is Read without waiting, or proxy.ErrWouldBlock
// (proxy.ReadyReader).
func (s *serverStream) ReadNoWait(p []byte) (int, error) {
	return s.l.noWait(func() (int, error) { return s.Read(p) })
}

// WaitReadable waits, holding no buffer, until ReadNoWait may find bytes
// (proxy.ReadyReader).
func (s *serverStream) WaitReadable() error { return s.l.WaitReadable() }

func (s *serverStream) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		chunk := p[:min(len(p), maxFrameData)]
		p = p[len(chunk):]
		s.l.raw.startBatch() // or joins the one open: the status's, or a corked write's
		err := s.l.appendData(chunk)
		corked := err == nil && len(p) == 0 && s.l.raw.batchLen() < maxFrameData && s.more()
		if !corked {
			s.stopTimer()
			if ferr := s.l.raw.flushBatch(); err == nil {
				err = ferr
			}
		}
		if err != nil {
			return written, err
		}
		written += len(chunk)
	}
	return written, nil
}

// more reports whether a read of the local end would return at once
// (data, its end, or an error): the relay reads it next, without waiting.
//
// It looks (a recv(MSG_PEEK) each time) only until a look finds nothing: a
// server that answered and ended at once is found out by its first look,
// and a connection that goes on with requests and answers (where every
// look finds nothing) costs no syscall per answer after that.
func (s *serverStream) more() bool {
	if s.local == nil || s.settled {
		return false
	}
	wait, looked := s.local.look()
	if looked && wait {
		s.settled = true
	}
	return looked && !wait
}

func (s *serverStream) CloseWrite() error {
	if s.finSent {
		return nil
	}
	s.finSent = true
	s.stopTimer()
	return s.l.writeFin() // with what waits in the batch, in one send
}

// Abort resets the link, after what waits in its batch (a status comes
// before the reset).
func (s *serverStream) Abort() {
	s.aborted = true
	s.stopTimer()
	s.l.raw.flushBatch()
	s.l.Abort()
}

// stopTimer stops the status's wait, once its batch is sent another way.
func (s *serverStream) stopTimer() {
	if t := s.flush.Swap(nil); t != nil {
		t.Stop()
	}
}

// Close leaves the link to the server's loop: it carries the next
// tunnelled connection if this one ended cleanly (clean).
func (s *serverStream) Close() error { return nil }

func (s *serverStream) SetReadDeadline(t time.Time) error { return s.l.raw.SetReadDeadline(t) }

// SyscallConn is the link's socket, for a proxy.Parker to watch.
func (s *serverStream) SyscallConn() (syscall.RawConn, error) { return s.l.SyscallConn() }

// clean: both directions ended with 'F' and nothing was reset.
func (s *serverStream) clean() bool { return s.finRead && s.finSent && !s.aborted && s.l.rem == 0 }

// The relay reads tunnel connections only when they have bytes.
var (
	_ proxy.ReadyReader = (*Conn)(nil)
	_ proxy.ReadyReader = (*serverStream)(nil)
	_ proxy.ReadyReader = (*link)(nil)
)
