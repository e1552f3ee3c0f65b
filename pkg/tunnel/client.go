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
	// noResume turns TLS session resumption off (for measuring it).
	noResume bool
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
		dialTCP:  o.Dial,
	}
}

// DialContext opens a tunnel connection to the smeshd on the node of
// address (the original destination, "ip:port") and asks it to connect to
// address. It returns a *Conn once the peer answered ok; a refusal is a
// *RefusedError. network must be "tcp" or "tcp4".
func (c *Client) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	if network != "tcp" && network != "tcp4" && network != "tcp6" {
		return nil, fmt.Errorf("tunnel: network %q is not TCP", network)
	}
	dst, err := netip.ParseAddrPort(address)
	if err != nil {
		return nil, fmt.Errorf("tunnel: destination %q: %w", address, err)
	}
	conn, reason, err := c.dial(ctx, dst)
	if err != nil {
		c.stats.Count(reason)
		c.errLog.warn().Err(err).Str("dst", dst.String()).Str("reason", reason.String()).Msg("tunnel connection failed")
		return nil, err
	}
	c.stats.Out.Connections.Add(1)
	return conn, nil
}

func (c *Client) dial(ctx context.Context, dst netip.AddrPort) (*Conn, Reason, error) {
	hdr, err := AppendHeader(make([]byte, 0, HeaderSize), dst)
	if err != nil {
		return nil, ReasonBadHeader, err
	}
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
	raw := &rawConn{TCPConn: tcp}
	fail := func(r Reason, err error) (*Conn, Reason, error) {
		raw.SetLinger(0)
		raw.TCPConn.Close()
		return nil, r, err
	}
	// The context bounds the handshake; the deadline the header and
	// status that follow.
	deadline, _ := ctx.Deadline()
	raw.SetDeadline(deadline)

	var tc *tls.Conn
	if c.creds != nil {
		cfg := c.creds.clientConfig(dst.Addr())
		if c.noResume {
			cfg = cfg.Clone()
			cfg.ClientSessionCache = nil
		}
		tc = tls.Client(raw, cfg)
		start := time.Now()
		err := tc.HandshakeContext(ctx)
		c.stats.handshake("client", tc, err, start)
		if err != nil {
			r, err := handshakeFailure(peer, err)
			return fail(r, err)
		}
		if c.testHookHandshakeDone != nil {
			c.testHookHandshakeDone()
		}
	}
	conn := newConn(raw, tc)
	if _, err := conn.Write(hdr); err != nil {
		// In TLS 1.3 the client's handshake is done before the server
		// has checked its certificate: a server that refuses it answers
		// with an alert and closes, and the header then meets a closed
		// connection. The alert may still be there to read, and says why.
		if alert := readAlert(conn); alert != nil {
			return fail(ReasonPeerRefusedHandshake, refusedHandshake(peer, alert))
		}
		return fail(ReasonPeerUnreachable, fmt.Errorf("sending tunnel header to %s: %w", peer, err))
	}
	var st [StatusSize]byte
	if _, err := io.ReadFull(conn, st[:]); err != nil {
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
	raw.SetDeadline(time.Time{})
	raw.established.Store(true)
	return conn, ReasonNone, nil
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
func readAlert(conn *Conn) error {
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
