// Package tunnel carries captured connections between the smeshd of two
// nodes over mutually authenticated TLS 1.3 connections to the destination
// node's [tunnel] port. Each captured connection starts with a fixed-size
// header naming the original destination and is answered with a status
// (header.go). Protocol v2 keeps those TLS connections warm in a pool and
// carries one captured connection after another on each, in frames, with
// the first bytes sent along with the header; v3 is v2 with the source
// workload (its SPIFFE ID and address) in the header, which the server
// verifies (SourceVerifier) and authorizes (ServerOptions.Authorize) before
// it connects; v1, which older nodes speak, is one TLS connection per
// captured connection.
//
// The server delivers only to addresses of its own node and, when set, to
// [tunnel] allow_ports, so the tunnel port is never an open relay. Every bad
// input is refused with a counted reason (Stats) and a rate-limited log line.
package tunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/proxy"
)

// Tunnel is a node's tunnel: the server on [tunnel] listen and the client
// the outbound proxy dials through.
type Tunnel struct {
	Server *Server
	Client *Client
	// Local are the addresses of smeshd's own network namespace: where the
	// server's own listener delivers.
	Local *LocalAddrs
	// Node are all addresses on this node (every namespace smeshd serves):
	// destinations there are dialled directly, never tunnelled.
	Node  *LocalAddrs
	Stats *Stats
	// Credentials are nil with [tunnel.tls] mode = "disabled".
	Credentials *Credentials
}

// New loads the credentials and opens the tunnel listener from cfg.
// ownPorts are smeshd's other listener ports, which the tunnel never
// delivers to.
func New(cfg config.Tunnel, ownPorts []uint16, log zerolog.Logger) (*Tunnel, error) {
	return NewFrom(cfg, ownPorts, nil, log)
}

// NewFrom is New serving ln, the tunnel listener a predecessor handed over,
// instead of listening on [tunnel] listen; nil listens.
func NewFrom(cfg config.Tunnel, ownPorts []uint16, ln *net.TCPListener, log zerolog.Logger) (*Tunnel, error) {
	t := &Tunnel{Local: new(LocalAddrs), Node: new(LocalAddrs), Stats: new(Stats)}
	switch cfg.TLS.Mode {
	case "mtls":
		creds, err := LoadConfigured(cfg.TLS, log)
		if err != nil {
			return nil, err
		}
		t.Credentials = creds
	case "disabled":
		log.Warn().Str("component", "tunnel").Str("listen", cfg.Listen.String()).
			Msg("TUNNEL TLS IS DISABLED (tunnel.tls.mode = \"disabled\"): traffic between nodes is neither encrypted nor " +
				"authenticated, and anyone who reaches the tunnel port can connect to this node's local services. " +
				"Only for tests and benchmarks.")
	default:
		return nil, fmt.Errorf("tunnel.tls.mode %q: want \"mtls\" or \"disabled\"", cfg.TLS.Mode)
	}
	addrs, err := InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	t.Local.Set(addrs)
	t.Node.Set(addrs)

	t.Client = NewClient(ClientOptions{
		PeerPort:    cfg.PeerPort,
		Credentials: t.Credentials,
		Stats:       t.Stats,
		Logger:      log,
	})
	t.Server, err = Listen(ServerOptions{
		Listen:                 cfg.Listen,
		Listener:               ln,
		Credentials:            t.Credentials,
		AllowPorts:             cfg.AllowPorts,
		OwnPorts:               slices.Concat(ownPorts, []uint16{cfg.Listen.Port()}),
		MaxConnections:         cfg.MaxConnections,
		MaxHandshakes:          cfg.MaxHandshakes,
		MaxHandshakesPerSource: cfg.MaxHandshakesPerSource,
		HandshakeTimeout:       cfg.HandshakeTimeout.Duration,
		IdleTimeout:            cfg.IdleTimeout.Duration,
		Local:                  t.Local,
		Stats:                  t.Stats,
		Logger:                 log,
	})
	if err != nil {
		return nil, err
	}
	return t, nil
}

// workloadAPIWait bounds the wait for the first SVID at start: a SPIRE
// agent starting on the same node answers within it.
const workloadAPIWait = 30 * time.Second

// LoadConfigured loads the [tunnel.tls] files with the identity policy of
// c, saying what to do when they are missing, or takes the credentials from
// the Workload API. smeshd start and smeshd check both load them with it.
func LoadConfigured(c config.TLS, log zerolog.Logger) (*Credentials, error) {
	policy, err := NewIdentityPolicy(c)
	if err != nil {
		return nil, err
	}
	if c.Source == "workload_api" {
		ctx, cancel := context.WithTimeout(context.Background(), workloadAPIWait)
		defer cancel()
		return WorkloadAPICredentials(ctx, c.WorkloadAPISocket, policy, log)
	}
	for _, f := range []struct{ key, path string }{{"cert", c.Cert}, {"key", c.Key}, {"ca", c.CA}} {
		if _, err := os.Stat(f.path); err != nil {
			return nil, fmt.Errorf("tunnel.tls.%s: %w: tunnel.tls.mode = \"mtls\" needs this node's certificate, key and CA; "+
				"point [tunnel.tls] cert, key and ca at them, or make a development set with "+
				"`smeshd certs init --dir DIR --nodes NAME` and use DIR/NAME.crt, DIR/NAME.key and DIR/ca.crt", f.key, err)
		}
	}
	return LoadCredentials(c.Cert, c.Key, c.CA, policy, log)
}

// Policy is what a reload may change in the tunnel: where the server
// delivers (tunnel.allow_ports) and who is a peer (tunnel.tls trust_domain,
// allow_identities and peers). Prepare makes one, Apply puts it in force.
type Policy struct {
	allowPorts []uint16
	identities *IdentityPolicy // nil without TLS
}

// Prepare checks cfg's policy without changing anything: the error says
// why it could not be applied.
func (t *Tunnel) Prepare(cfg config.Tunnel) (*Policy, error) {
	p := &Policy{allowPorts: slices.Clone(cfg.AllowPorts)}
	if t.Credentials != nil {
		ids, err := NewIdentityPolicy(cfg.TLS)
		if err != nil {
			return nil, err
		}
		if err := t.Credentials.CheckPolicy(ids); err != nil {
			return nil, err
		}
		p.identities = ids
	}
	return p, nil
}

// Apply puts p in force for new connections and returns the policy it
// replaces, for rolling back. It cannot fail.
func (t *Tunnel) Apply(p *Policy) (previous *Policy) {
	previous = &Policy{allowPorts: t.Server.AllowPorts()}
	if t.Credentials != nil {
		previous.identities = t.Credentials.SetPolicy(p.identities)
	}
	t.Server.SetAllowPorts(p.allowPorts)
	return previous
}

// Close closes the server and its connections and the client's idle
// pooled ones, and stops following the Workload API.
func (t *Tunnel) Close() error {
	t.Client.Close()
	err := t.Server.Close()
	if t.Credentials != nil {
		err = errors.Join(err, t.Credentials.Close())
	}
	return err
}

// Dialer is the outbound proxy's dialer for captured connections of
// smeshd's own network namespace: destinations on this node (copy mode
// captures those too) are dialled directly, all others through the tunnel
// to their node's smeshd.
func (t *Tunnel) Dialer() proxy.Dialer { return t.DialerIn(nil) }

// DialerIn is Dialer for the captured connections of another network
// namespace: local destinations are dialled by local, from inside that
// namespace (nil: from smeshd's own). The tunnel is always dialled from
// smeshd's own namespace, the node's.
func (t *Tunnel) DialerIn(local func(ctx context.Context, network, address string) (net.Conn, error)) proxy.Dialer {
	if local == nil {
		local = proxy.LocalDialer().DialContext
	}
	return routeDialer{t, local}
}

type routeDialer struct {
	t     *Tunnel
	local func(ctx context.Context, network, address string) (net.Conn, error)
}

func (r routeDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return r.DialEarly(ctx, network, address, nil)
}

// DialEarly is DialContext with the connection's first bytes: through the
// tunnel they go with the header. Through the tunnel there is no round
// trip before the first byte either way: the relay sends at once, and a
// refusal reaches the app as a reset all the same.
func (r routeDialer) DialEarly(ctx context.Context, network, address string, first []byte) (net.Conn, error) {
	dst, err := netip.ParseAddrPort(address)
	if err != nil {
		return nil, err
	}
	if !r.t.Node.Contains(dst.Addr()) {
		return r.t.Client.OpenEarly(ctx, network, address, first)
	}
	c, err := r.local(ctx, network, address)
	if err == nil && len(first) > 0 {
		if _, err = c.Write(first); err != nil {
			c.Close()
			return nil, err
		}
	}
	return c, err
}

// LocalAddrs is the set of this node's addresses, kept current by the
// daemon's address watcher. Loopback addresses are always local.
type LocalAddrs struct {
	m atomic.Pointer[map[netip.Addr]struct{}]
}

// Set replaces the set.
func (l *LocalAddrs) Set(addrs []netip.Addr) {
	m := make(map[netip.Addr]struct{}, len(addrs))
	for _, a := range addrs {
		m[a.Unmap()] = struct{}{}
	}
	l.m.Store(&m)
}

// Contains reports whether a is an address of this node.
func (l *LocalAddrs) Contains(a netip.Addr) bool {
	a = a.Unmap()
	if a.IsLoopback() {
		return true
	}
	m := l.m.Load()
	if m == nil {
		return false
	}
	_, ok := (*m)[a]
	return ok
}

// InterfaceAddrs lists the addresses of this node's interfaces (of the
// calling thread's network namespace).
func InterfaceAddrs() ([]netip.Addr, error) {
	ifas, err := net.InterfaceAddrs()
	if err != nil {
		return nil, fmt.Errorf("listing local addresses: %w", err)
	}
	var addrs []netip.Addr
	for _, ifa := range ifas {
		if p, err := netip.ParsePrefix(ifa.String()); err == nil {
			addrs = append(addrs, p.Addr())
		}
	}
	return addrs, nil
}
