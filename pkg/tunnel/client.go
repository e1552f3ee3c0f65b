package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"time"

	"github.com/rs/zerolog"

	"github.com/smesh-dev/smesh/pkg/identity"
)

// RefusedError is the peer's refusal of a tunnel connection.
type RefusedError struct {
	Peer   netip.AddrPort
	Dst    netip.AddrPort
	Reason Reason
}

func (e *RefusedError) Error() string {
	return fmt.Sprintf("tunnel peer %s refused %s: %s", e.Peer, e.Dst, e.Reason)
}

// Client opens tunnel connections to other nodes' smeshd.
type Client struct {
	peerPort uint16
	creds    *Credentials // nil: plaintext ([tunnel.tls] mode = "disabled")
	timeout  time.Duration
	stats    *Stats
	log      zerolog.Logger
	errLog   *limitedLog
	dialTCP  func(ctx context.Context, network, address string) (net.Conn, error)
	pool     *pool
	dials    *dialSlots
	// noResume turns TLS session resumption off (for measuring it).
	noResume bool
	// v1Only: offer no protocol v2, as a node before it did.
	v1Only bool
	// v2Only: offer no protocol v3, as a node before it did.
	v2Only bool
	// testHookHandshakeDone, when set, runs after a successful handshake,
	// before the header is sent.
	testHookHandshakeDone func()
}

// ClientOptions configure a Client.
type ClientOptions struct {
	// PeerPort is the tunnel port of the other nodes ([tunnel] peer_port).
	PeerPort uint16
	// Credentials, or nil for plaintext.
	Credentials *Credentials
	// Timeout bounds connecting, the handshake and the status.
	Timeout time.Duration
	// Stats receives the counters; nil gets a private set.
	Stats *Stats
	// DisableResumption makes every connection a full handshake. Only for
	// measuring what resumption saves.
	DisableResumption bool
	// ProtocolV1 speaks wire protocol v1 only, one TLS connection per
	// tunnelled connection, as nodes before v2 do (for tests and
	// measurements).
	ProtocolV1 bool
	// ProtocolV2 offers wire protocol v2 at most, as nodes before v3 do:
	// no source in the header (for tests).
	ProtocolV2 bool
	// Dial connects to a peer's tunnel port; nil: a plain net.Dialer.
	// (Tests map node addresses to loopback with it.)
	Dial   func(ctx context.Context, network, address string) (net.Conn, error)
	Logger zerolog.Logger
}

// NewClient makes a Client.
func NewClient(o ClientOptions) *Client {
	if o.Stats == nil {
		o.Stats = new(Stats)
	}
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Second
	}
	log := o.Logger.With().Str("component", "tunnel-out").Logger()
	if o.Dial == nil {
		var d net.Dialer
		o.Dial = d.DialContext
	}
	return &Client{
		peerPort: o.PeerPort,
		creds:    o.Credentials,
		timeout:  o.Timeout,
		stats:    o.Stats,
		log:      log,
		errLog:   newLimitedLog(log, 10, time.Second),
		noResume: o.DisableResumption,
		v1Only:   o.ProtocolV1 || o.Credentials == nil,
		v2Only:   o.ProtocolV2,
		dialTCP:  o.Dial,
		pool:     newPool(o.Credentials, poolMaxIdle, poolIdle),
		dials:    newDialSlots(maxDialsPerPeer),
	}
}

// Close closes the idle pooled connections (tunnelled connections still
// open go on; their links are closed when they end).
func (c *Client) Close() { c.pool.close() }

// DialContext opens a tunnel connection to the smeshd on the node of
// address (the original destination, "ip:port") and asks it to connect to
// address. It returns a *Conn once the peer answered ok; a refusal is a
// *RefusedError. network must be "tcp", "tcp4" or "tcp6".
//
// The source the connection comes from is ctx's: the workload identity
// identity.WithSource put there and the address identity.WithSourceAddr
// put there, each if any. A peer that speaks v3 gets them in the header;
// to an older one the connection speaks as this node.
func (c *Client) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	conn, err := c.open(ctx, network, address, nil)
	if err != nil {
		return nil, err
	}
	if conn.v1 == nil {
		if _, err := conn.awaitStatus(); err != nil {
			return nil, err
		}
	}
	return conn, nil
}

// Open is DialContext without waiting for the peer's answer where the
// protocol allows it (v2): the connection may send at once, and a refusal
// comes as the error of its first Read (and of Writes from then on). The
// outbound proxy opens its tunnel connections so: no round trip before the
// first byte.
func (c *Client) Open(ctx context.Context, network, address string) (net.Conn, error) {
	return c.open(ctx, network, address, nil)
}

// OpenEarly is Open with the connection's first bytes (at most earlyMax),
// sent along with the header in v2.
func (c *Client) OpenEarly(ctx context.Context, network, address string, first []byte) (net.Conn, error) {
	if len(first) > earlyMax {
		return nil, fmt.Errorf("tunnel: %d first bytes, at most %d", len(first), earlyMax)
	}
	return c.open(ctx, network, address, first)
}

func (c *Client) open(ctx context.Context, network, address string, first []byte) (*Conn, error) {
	if network != "tcp" && network != "tcp4" && network != "tcp6" {
		return nil, fmt.Errorf("tunnel: network %q is not TCP", network)
	}
	dst, err := netip.ParseAddrPort(address)
	if err != nil {
		return nil, fmt.Errorf("tunnel: destination %q: %w", address, err)
	}
	conn, reason, err := c.dial(ctx, dst, first)
	if err != nil {
		c.failed(dst, reason, err)
		return nil, err
	}
	return conn, nil
}

// failed counts and logs a tunnel connection that failed.
func (c *Client) failed(dst netip.AddrPort, reason Reason, err error) {
	c.stats.Count(reason)
	c.errLog.warn().Err(err).Str("dst", dst.String()).Str("reason", reason.String()).Msg("tunnel connection failed")
}

func (c *Client) dial(ctx context.Context, dst netip.AddrPort, first []byte) (*Conn, Reason, error) {
	h := &Header{Dst: dst}
	if !c.v1Only && !c.v2Only {
		h.Workload, _ = identity.SourceFrom(ctx)
		h.SrcAddr, _ = identity.SourceAddrFrom(ctx)
	}
	if err := h.check(); err != nil {
		return nil, ReasonBadHeader, err
	}
	peer := netip.AddrPortFrom(dst.Addr(), c.peerPort)
	if conn := c.warm(peer, h, first); conn != nil {
		return conn, ReasonNone, nil
	}
	// A new link: wait for a place among the handshakes under way to
	// this peer (maxDialsPerPeer), then look for a warm one again.
	waitCtx, stopWait := context.WithTimeout(ctx, c.timeout)
	release, err := c.dials.acquire(waitCtx, peer.Addr())
	stopWait()
	if err != nil {
		return nil, ReasonPeerUnreachable, fmt.Errorf("waiting %s to connect to tunnel peer %s behind %d handshakes under way to it: %w",
			c.timeout, peer, c.dials.max, err)
	}
	// The place is given back once the peer has read the header: its
	// handshake budget counts a connection until then.
	handedOver := false
	defer func() {
		if !handedOver {
			release()
		}
	}()
	if conn := c.warm(peer, h, first); conn != nil {
		return conn, ReasonNone, nil
	}
	l, reason, err := c.dialLink(ctx, dst)
	if err != nil {
		return nil, reason, err
	}
	fail := func(r Reason, err error) (*Conn, Reason, error) {
		l.Abort()
		return nil, r, err
	}
	hdr := h.encode(l.version)
	if l.version >= Version2 {
		if err := l.open(hdr, first); err != nil {
			l.raw.SetReadDeadline(time.Now().Add(c.timeout))
			if alert := readAlert(l); alert != nil {
				return fail(ReasonPeerRefusedHandshake, refusedHandshake(peer, alert))
			}
			return fail(ReasonPeerUnreachable, fmt.Errorf("sending tunnel header to %s: %w", peer, err))
		}
		// With its status (or its end before one).
		conn := c.stream(l, h, first)
		conn.release, handedOver = release, true
		return conn, ReasonNone, nil
	}
	// A peer that speaks v1 only (an older smeshd, or no TLS).
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	deadline, _ := ctx.Deadline()
	l.raw.SetDeadline(deadline)
	if _, err := l.Write(hdr); err != nil {
		// In TLS 1.3 the client's handshake is done before the server
		// has checked its certificate: a server that refuses it answers
		// with an alert and closes, and the header then meets a closed
		// connection. The alert may still be there to read, and says why.
		if alert := readAlert(l); alert != nil {
			return fail(ReasonPeerRefusedHandshake, refusedHandshake(peer, alert))
		}
		return fail(ReasonPeerUnreachable, fmt.Errorf("sending tunnel header to %s: %w", peer, err))
	}
	var st [StatusSize]byte
	if _, err := io.ReadFull(l, st[:]); err != nil {
		if isAlert(err) {
			return fail(ReasonPeerRefusedHandshake, refusedHandshake(peer, err))
		}
		return fail(ReasonPeerProtocol, fmt.Errorf("reading tunnel status from %s: %w", peer, err))
	}
	status, err := ParseStatus(st[:])
	if err != nil {
		return fail(ReasonPeerProtocol, fmt.Errorf("tunnel peer %s: %w", peer, err))
	}
	if !status.OK {
		return fail(ReasonPeerRefused, &RefusedError{Peer: peer, Dst: dst, Reason: status.Reason})
	}
	l.raw.SetDeadline(time.Time{})
	l.raw.established.Store(true)
	c.stats.Out.Connections.Add(1)
	if len(first) > 0 {
		if _, err := l.Write(first); err != nil {
			l.Abort()
			return nil, ReasonPeerUnreachable, fmt.Errorf("sending to tunnel peer %s: %w", peer, err)
		}
	}
	return &Conn{Conn: l.Conn, Resumed: l.resumed, raw: l.raw, v1: l}, ReasonNone, nil
}

// warm opens the tunnelled connection on a pooled link to peer, if one is
// there (v2); a link that fails at once was dead already (its peer went
// away while it idled): the next one.
func (c *Client) warm(peer netip.AddrPort, h *Header, first []byte) *Conn {
	if c.v1Only {
		return nil
	}
	for l := c.pool.take(peer, h.Dst); l != nil; l = c.pool.take(peer, h.Dst) {
		if err := l.open(h.encode(l.version), first); err != nil {
			l.Abort()
			continue
		}
		conn := c.stream(l, h, first)
		conn.Reused = true
		return conn
	}
	return nil
}

// stream makes the v2 or v3 tunnelled connection whose header (and first
// bytes) were just sent on l.
func (c *Client) stream(l *link, h *Header, first []byte) *Conn {
	conn := &Conn{Conn: l.Conn, Resumed: l.resumed, raw: l.raw, c: c, dst: h.Dst, h: h, l: l}
	if len(first) > 0 {
		conn.early = append(make([]byte, 0, len(first)), first...)
	}
	return conn
}

// dialLink connects to the tunnel port of dst's node and, with TLS, does
// the handshake (offering protocol v2 unless v1Only).
func (c *Client) dialLink(ctx context.Context, dst netip.AddrPort) (*link, Reason, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	peer := netip.AddrPortFrom(dst.Addr(), c.peerPort)
	nc, err := c.dialTCP(ctx, "tcp", peer.String())
	if err != nil {
		return nil, ReasonPeerUnreachable, fmt.Errorf("connecting to tunnel peer %s: %w", peer, err)
	}
	tcp, ok := nc.(*net.TCPConn)
	if !ok {
		nc.Close()
		return nil, ReasonPeerUnreachable, fmt.Errorf("connecting to tunnel peer %s: dialled %T, not TCP", peer, nc)
	}
	raw := newRawConn(tcp)
	var tc *tls.Conn
	var set *credSet
	var pol *IdentityPolicy
	if c.creds != nil {
		var cfg *tls.Config
		pol = c.creds.policy.Load()
		cfg, set = c.creds.clientConfig(dst.Addr())
		if c.noResume || c.v1Only || c.v2Only {
			cfg = cfg.Clone()
			if c.noResume {
				cfg.ClientSessionCache = nil
			}
			switch {
			case c.v1Only:
				cfg.NextProtos = nil
			case c.v2Only:
				cfg.NextProtos = []string{ALPN2}
			}
		}
		tc = tls.Client(raw, cfg)
		start := time.Now()
		err := handshake(ctx, tc)
		c.stats.handshake("client", tc, err, start)
		if err != nil {
			raw.SetLinger(0)
			raw.TCPConn.Close()
			r, err := handshakeFailure(peer, err)
			return nil, r, err
		}
		if c.testHookHandshakeDone != nil {
			c.testHookHandshakeDone()
		}
	}
	l := newLink(raw, tc)
	l.peer, l.set, l.policy = peer, set, pol
	if l.version >= Version2 {
		// Relayed connections have no deadlines (v1 sets its own for
		// header and status).
		raw.established.Store(true)
	}
	return l, ReasonNone, nil
}

// handshakeFailure classifies a failed client handshake: the peer's alert
// (it refused this node), this node's refusal of the peer's identity, or
// anything else.
func handshakeFailure(peer netip.AddrPort, err error) (Reason, error) {
	var ie *identityError
	switch {
	case isAlert(err):
		return ReasonPeerRefusedHandshake, refusedHandshake(peer, err)
	case errors.As(err, &ie) && ie.reason == ReasonPeerIdentity:
		return ReasonPeerIdentity, fmt.Errorf("tunnel peer %s: %w", peer, err)
	}
	return ReasonPeerHandshake, fmt.Errorf("TLS handshake with tunnel peer %s: %w", peer, err)
}

// isAlert reports whether err is a TLS alert the peer sent.
func isAlert(err error) bool {
	var oe *net.OpError
	return errors.As(err, &oe) && oe.Op == "remote error"
}

// readAlert reads what the peer sent after the handshake, if anything is
// there (the read deadline set for the header bounds the wait), and
// returns it when it is a TLS alert.
func readAlert(conn *link) error {
	var b [1]byte
	_, err := conn.Read(b[:])
	if isAlert(err) {
		return err
	}
	return nil
}

// refusedHandshake says that the peer refused this node, and why as far as
// its TLS alert tells.
func refusedHandshake(peer netip.AddrPort, alert error) error {
	return fmt.Errorf("tunnel peer %s refused the TLS handshake (%w): it does not accept this node's certificate; "+
		"see its log for why (its tunnel.tls.ca, trust_domain and allow_identities decide)", peer, alert)
}

// check refuses a header no version could send, before anything is dialled.
func (h *Header) check() error {
	if err := checkDst(h.Dst); err != nil {
		return err
	}
	if err := checkSrc(h.SrcAddr); err != nil {
		return err
	}
	if h.Workload.IsZero() {
		return nil
	}
	if id := h.Workload.String(); len(id) > MaxSourceID || h.Workload.Path() == "" {
		return headerErr(ReasonBadHeader, "source %q: want a workload's SPIFFE ID of at most %d bytes", id, MaxSourceID)
	}
	return nil
}

// encode is h in version (checked already): v1 and v2 carry no source.
func (h *Header) encode(version byte) []byte {
	if version == Version3 {
		b, _ := AppendHeaderV3(make([]byte, 0, HeaderSizeV3+len(h.Workload.String())), *h)
		return b
	}
	b, _ := appendHeader(make([]byte, 0, HeaderSize), h.Dst, version)
	return b
}
