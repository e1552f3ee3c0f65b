package tunnel

import (
	"context"
	"crypto/tls"
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
	dialer   net.Dialer
	// noResume turns TLS session resumption off (for measuring it).
	noResume bool
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
	Logger            zerolog.Logger
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
	return &Client{
		peerPort: o.PeerPort,
		creds:    o.Credentials,
		timeout:  o.Timeout,
		stats:    o.Stats,
		log:      log,
		errLog:   newLimitedLog(log, 10, time.Second),
		noResume: o.DisableResumption,
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
	nc, err := c.dialer.DialContext(ctx, "tcp", peer.String())
	if err != nil {
		return nil, ReasonPeerUnreachable, fmt.Errorf("connecting to tunnel peer %s: %w", peer, err)
	}
	raw := &rawConn{TCPConn: nc.(*net.TCPConn)}
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
		cfg := c.creds.clientConfig()
		if c.noResume {
			cfg = cfg.Clone()
			cfg.ClientSessionCache = nil
		}
		tc = tls.Client(raw, cfg)
		start := time.Now()
		err := tc.HandshakeContext(ctx)
		c.stats.handshake("client", tc, err, start)
		if err != nil {
			return fail(ReasonPeerHandshake, fmt.Errorf("TLS handshake with tunnel peer %s: %w", peer, err))
		}
	}
	conn := newConn(raw, tc)
	if _, err := conn.Write(hdr); err != nil {
		return fail(ReasonPeerUnreachable, fmt.Errorf("sending tunnel header to %s: %w", peer, err))
	}
	var st [StatusSize]byte
	if _, err := io.ReadFull(conn, st[:]); err != nil {
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
