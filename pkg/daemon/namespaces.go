package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"

	"github.com/rs/zerolog"

	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/enrol"
	"github.com/smesh-dev/smesh/pkg/identity"
	"github.com/smesh-dev/smesh/pkg/proxy"
	"github.com/smesh-dev/smesh/pkg/tunnel"
)

// nsService is smeshd's service inside one enrolled network namespace:
// outbound listeners, where connect4 and connect6 send the namespace's
// captured connections, and a tunnel listener, where tunnels from other
// nodes to the namespace's addresses arrive (as Istio ztunnel's in-pod mode
// listens inside each pod). All are sockets of the namespace, created from a
// thread inside it; they keep the namespace whichever thread uses them.
type nsService struct {
	local  *tunnel.LocalAddrs // the namespace's addresses: the tunnel delivers only there
	source *sourceAddrs       // the namespace's own address per family, asserted as the source
	ready6 bool               // the IPv6 outbound listener is up
	stops  []func()
	// cookie and lns name and are the listeners, for a hand-over.
	cookie uint64
	lns    listeners
}

func (s *nsService) SetAddrs(addrs []netip.Addr) { s.local.Set(addrs); s.source.set(addrs) }

// Ready: v4 always, for an nsService exists only once its IPv4 outbound
// listener is open (openListeners requires it).
func (s *nsService) Ready() (v4, v6 bool) { return true, s.ready6 }

func (s *nsService) Close() error {
	for _, stop := range s.stops {
		stop()
	}
	return nil
}

// listeners are smeshd's listeners of one network namespace.
type listeners struct {
	out, out6, tun *net.TCPListener // out6 nil without IPv6
	err6           error            // why out6 is nil
}

// openListeners opens the listeners of the calling thread's network
// namespace that l lacks (l: those a predecessor handed over). out and tun
// are required; out6 fails alone where the namespace has no IPv6, and then
// IPv6 is not captured there. On error every listener of l is closed.
func openListeners(cfg config.Config, l listeners, log zerolog.Logger) (_ listeners, err error) {
	if l.out == nil {
		if l.out, err = proxy.ListenLocal("tcp4", cfg.Outbound.Listen); err != nil {
			l.close()
			return l, fmt.Errorf("outbound listener %s: %w", cfg.Outbound.Listen, err)
		}
	}
	if l.out6 == nil {
		if l.out6, err = proxy.ListenLocal("tcp6", cfg.Outbound.Listen6); err != nil {
			l.out6, l.err6 = nil, fmt.Errorf("outbound.listen6 %s: %w", cfg.Outbound.Listen6, err)
		}
	}
	if l.tun == nil {
		if l.tun, err = tunnel.ListenTCP(cfg.Tunnel.Listen, log); err != nil {
			l.close()
			return l, err
		}
	}
	return l, nil
}

// takeListeners takes the listeners of the namespace with cookie netns
// that a predecessor handed over, if any.
func (d *daemon) takeListeners(netns uint64) listeners {
	return listeners{
		out:  d.from.take("out4", netns, d.cfg.Outbound.Listen),
		out6: d.from.take("out6", netns, d.cfg.Outbound.Listen6),
		tun:  d.from.take("tun", netns, tunnelAddrs(d.cfg.Tunnel.Listen)...),
	}
}

func (l listeners) close() {
	for _, ln := range []*net.TCPListener{l.out, l.out6, l.tun} {
		if ln != nil {
			ln.Close()
		}
	}
}

// openNamespace is enrol's Open: it starts nsService in ns.
func (d *daemon) openNamespace(ctx context.Context) func(ns *enrol.Namespace) (enrol.Service, error) {
	cfg := d.cfg
	return func(ns *enrol.Namespace) (enrol.Service, error) {
		if d.released.Load() {
			// Not even a bind: the successor opens it (the tracker tries
			// again, and this process exits once drained).
			return nil, errors.New("handed over to a successor, which serves new namespaces")
		}
		l := d.takeListeners(ns.Cookie)
		err := ns.Do(func() (err error) {
			l, err = openListeners(cfg, l, d.log)
			return err
		})
		if err != nil {
			return nil, err
		}
		if l.err6 != nil {
			d.log.Warn().Err(l.err6).Uint64("netns", ns.Cookie).
				Msg("no IPv6 outbound listener in this network namespace: its IPv6 connections are not captured (capture.on_failure decides)")
		}
		dial := dialIn(ns)
		svc := &nsService{local: new(tunnel.LocalAddrs), source: new(sourceAddrs), ready6: l.out6 != nil, cookie: ns.Cookie, lns: l}
		svc.local.Set(ns.Addrs())
		svc.source.set(ns.Addrs())
		dialer := sourceAddrDialer{d.tun.DialerIn(dial).(proxy.EarlyDialer), svc.source}
		svc.stops = append(svc.stops,
			d.out.AddListener(ctx, l.out, dialer),
			d.tun.Server.AddListener(ctx, l.tun, tunnel.Scope{Local: svc.local, Dial: dial}),
		)
		if l.out6 != nil {
			svc.stops = append(svc.stops, d.out.AddListener(ctx, l.out6, dialer))
		}
		// Known to a hand-over until closed (stops run first to last).
		d.nsMu.Lock()
		d.nsSvcs[svc] = struct{}{}
		d.nsMu.Unlock()
		d.kickStore() // its listeners into systemd's store
		svc.stops = append([]func(){func() {
			d.nsMu.Lock()
			delete(d.nsSvcs, svc)
			d.nsMu.Unlock()
			d.kickStore()
		}}, svc.stops...)
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
			var err error
			c, err = proxy.LocalDialer().DialContext(ctx, network, address)
			return err
		})
		return c, err
	}
}

// ownService is the service of smeshd's own namespace: the listeners the
// daemon opened at start, which stay until it stops.
type ownService struct {
	local  *tunnel.LocalAddrs
	ready6 bool
}

func (s ownService) SetAddrs(addrs []netip.Addr) { s.local.Set(addrs) }
func (s ownService) Ready() (v4, v6 bool)        { return true, s.ready6 }
func (s ownService) Close() error                { return nil }

// releasableMaps are the data path's namespace maps as the namespace
// tracker writes them, until this smeshd handed over: the maps are the
// successor's then, and this one's tracker, closing its namespaces on the
// way out, must not remove them there.
type releasableMaps struct{ d *daemon }

func (m releasableMaps) SetNamespace(cookie uint64, addrs []netip.Addr, ready4, ready6 bool) error {
	if m.d.released.Load() {
		return nil
	}
	defer m.d.pokeAddrIDs()
	return m.d.dp.SetNamespace(cookie, addrs, ready4, ready6)
}

func (m releasableMaps) RemoveNamespace(cookie uint64) error {
	if m.d.released.Load() {
		return nil
	}
	defer m.d.pokeAddrIDs()
	return m.d.dp.RemoveNamespace(cookie)
}

// CgroupsChanged: a namespace's workloads changed, so may the owners of
// its addresses and ports (runAddrIDs).
func (m releasableMaps) CgroupsChanged() { m.d.pokeAddrIDs() }

var (
	_ enrol.Maps           = releasableMaps{}
	_ enrol.CgroupsWatcher = releasableMaps{}
	_ enrol.Service        = (*nsService)(nil)
	_ enrol.Service        = ownService{}
)

// sourceAddrs is a namespace's own address of each family, the source
// address of its captured connections: they reach smeshd's listener at
// loopback in that namespace, so the accepted connection's remote address
// says nothing. Invalid where the namespace has none of that family, or
// several (ambiguous: no address is asserted rather than a wrong one).
type sourceAddrs struct {
	v atomic.Pointer[[2]netip.Addr] // IPv4, IPv6
}

func (s *sourceAddrs) set(addrs []netip.Addr) {
	var out [2]netip.Addr
	var seen [2]int
	for _, a := range addrs {
		a = a.Unmap()
		if a.IsLoopback() || a.IsLinkLocalUnicast() || a.IsUnspecified() || a.IsMulticast() {
			continue
		}
		i := 0
		if a.Is6() {
			i = 1
		}
		seen[i]++
		out[i] = a
	}
	for i := range out {
		if seen[i] != 1 {
			out[i] = netip.Addr{}
		}
	}
	s.v.Store(&out)
}

// of is the source address for a destination of dst's family.
func (s *sourceAddrs) of(dst netip.Addr) netip.Addr {
	v := s.v.Load()
	if v == nil {
		return netip.Addr{}
	}
	if dst.Unmap().Is4() {
		return v[0]
	}
	return v[1]
}

// sourceAddrDialer puts the namespace's own address into the dial context
// (identity.WithSourceAddr) for the tunnel client to assert (ipBlocks).
type sourceAddrDialer struct {
	inner proxy.EarlyDialer
	src   *sourceAddrs
}

func (s sourceAddrDialer) withAddr(ctx context.Context, address string) context.Context {
	dst, err := netip.ParseAddrPort(address)
	if err != nil {
		return ctx
	}
	if a := s.src.of(dst.Addr()); a.IsValid() {
		return identity.WithSourceAddr(ctx, a)
	}
	return ctx
}

func (s sourceAddrDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return s.inner.DialContext(s.withAddr(ctx, address), network, address)
}

func (s sourceAddrDialer) DialEarly(ctx context.Context, network, address string, first []byte) (net.Conn, error) {
	return s.inner.DialEarly(s.withAddr(ctx, address), network, address, first)
}
