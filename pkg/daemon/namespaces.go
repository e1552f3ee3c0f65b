package daemon

import (
	"context"
	"fmt"
	"net"
	"net/netip"

	"github.com/smesh-dev/smesh/pkg/enrol"
	"github.com/smesh-dev/smesh/pkg/tunnel"
)

// nsService is smeshd's service inside one enrolled network namespace: an
// outbound listener, where connect4 sends the namespace's captured
// connections, and a tunnel listener, where tunnels from other nodes to the
// namespace's addresses arrive (as Istio ztunnel's in-pod mode listens inside
// each pod). Both are sockets of the namespace, created from a thread inside
// it; they keep the namespace whichever thread uses them.
type nsService struct {
	local *tunnel.LocalAddrs // the namespace's addresses: the tunnel delivers only there
	stops []func()
}

func (s *nsService) SetAddrs(addrs []netip.Addr) { s.local.Set(addrs) }

func (s *nsService) Close() error {
	for _, stop := range s.stops {
		stop()
	}
	return nil
}

// openNamespace is enrol's Open: it starts nsService in ns.
func (d *daemon) openNamespace(ctx context.Context) func(ns *enrol.Namespace) (enrol.Service, error) {
	cfg := d.cfg
	return func(ns *enrol.Namespace) (enrol.Service, error) {
		var out, tun *net.TCPListener
		err := ns.Do(func() error {
			var err error
			if out, err = net.ListenTCP("tcp4", net.TCPAddrFromAddrPort(cfg.Outbound.Listen)); err != nil {
				return fmt.Errorf("outbound listener %s: %w", cfg.Outbound.Listen, err)
			}
			network := "tcp"
			if cfg.Tunnel.Listen.Addr().Is4() {
				network = "tcp4"
			}
			if tun, err = net.ListenTCP(network, net.TCPAddrFromAddrPort(cfg.Tunnel.Listen)); err != nil {
				out.Close()
				return fmt.Errorf("tunnel listener %s: %w", cfg.Tunnel.Listen, err)
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
		dial := dialIn(ns)
		svc := &nsService{local: new(tunnel.LocalAddrs)}
		svc.local.Set(ns.Addrs())
		svc.stops = append(svc.stops,
			d.out.AddListener(ctx, out, d.tun.DialerIn(dial)),
			d.tun.Server.AddListener(ctx, tun, tunnel.Scope{Local: svc.local, Dial: dial}),
		)
		return svc, nil
	}
}

// dialIn dials from inside ns: the socket is made on a thread in ns, so the
// connection is routed as the namespace's own would be. The thread waits for
// the connect (same-node destinations only: quick).
func dialIn(ns *enrol.Namespace) func(ctx context.Context, network, address string) (net.Conn, error) {
	return func(ctx context.Context, network, address string) (net.Conn, error) {
		var c net.Conn
		err := ns.Do(func() error {
			var d net.Dialer
			var err error
			c, err = d.DialContext(ctx, network, address)
			return err
		})
		return c, err
	}
}

// ownService is the service of smeshd's own namespace: the listeners the
// daemon opened at start, which stay until it stops.
type ownService struct{ local *tunnel.LocalAddrs }

func (s ownService) SetAddrs(addrs []netip.Addr) { s.local.Set(addrs) }
func (s ownService) Close() error                { return nil }

var (
	_ enrol.Service = (*nsService)(nil)
	_ enrol.Service = ownService{}
)
