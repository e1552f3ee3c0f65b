package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/smesh-dev/smesh/pkg/proxy"
)

// ServerOptions configure a Server.
type ServerOptions struct {
	Listen netip.AddrPort
	// Credentials, or nil for plaintext.
	Credentials *Credentials
	// AllowPorts: the only destination ports delivered to; empty, any.
	AllowPorts []uint16
	// OwnPorts are smeshd's own listener ports, never delivered to.
	OwnPorts []uint16
	// MaxConnections bounds the authenticated connections (past their
	// handshake and header) open at once; more are refused with a status.
	MaxConnections int
	// MaxHandshakes and MaxHandshakesPerSource bound the connections not
	// authenticated yet, in all and per source address (handshakeBudget);
	// 0: as many as MaxConnections.
	MaxHandshakes, MaxHandshakesPerSource int
	// HandshakeTimeout bounds the TLS handshake and the header together.
	HandshakeTimeout time.Duration
	// IdleTimeout resets a relayed connection that moved nothing either
	// way for that long; 0: never.
	IdleTimeout time.Duration
	// Local are this node's addresses: the only destinations delivered to.
	Local *LocalAddrs
	// Dial connects the server's own listener to local destinations; nil
	// dials from this process's namespace. (Tests map addresses with it.)
	Dial func(ctx context.Context, network, address string) (net.Conn, error)
	// Stats receives the counters; nil gets a private set.
	Stats  *Stats
	Logger zerolog.Logger
}

// Server accepts tunnel connections from other nodes and delivers each to
// the local destination its header names, after checking that it is one.
//
// It serves its own listener ([tunnel] listen, in smeshd's namespace, which
// delivers to the node's addresses) and one more in every enrolled network
// namespace (AddListener), which delivers only to that namespace's own
// addresses: a tunnel to a pod on this node arrives inside the pod's
// namespace, where the pod's address is local, and nowhere else is.
type Server struct {
	o      ServerOptions
	ln     *net.TCPListener
	scope  Scope // of ln
	tlsCfg *tls.Config
	log    zerolog.Logger
	errLog *limitedLog

	allowPorts atomic.Pointer[[]uint16] // tunnel.allow_ports, changed by reloads

	slots      chan struct{} // one per authenticated connection (max_connections)
	handshakes *handshakeBudget
	wg         sync.WaitGroup
	closed     atomic.Bool

	mu    sync.Mutex
	conns map[*rawConn]struct{}
	lns   map[*net.TCPListener]struct{} // the AddListener ones
}

// Scope is where a listener's connections may be delivered: the addresses
// of one network namespace, dialled from inside it.
type Scope struct {
	Local *LocalAddrs
	// Dial connects to a local destination from the namespace; nil dials
	// from smeshd's own.
	Dial func(ctx context.Context, network, address string) (net.Conn, error)
}

// ListenTCP opens a tunnel listener on addr ([tunnel] listen) in the
// calling thread's network namespace. "[::]" is dual-stack (IPv4 and IPv6);
// where the kernel has no IPv6 it falls back to 0.0.0.0 on the same port,
// saying so. "0.0.0.0" means every IPv4 address, not IPv6 too.
func ListenTCP(addr netip.AddrPort, log zerolog.Logger) (*net.TCPListener, error) {
	network := "tcp"
	if addr.Addr().Is4() {
		network = "tcp4"
	}
	ln, err := net.ListenTCP(network, net.TCPAddrFromAddrPort(addr))
	if err != nil && addr.Addr() == netip.IPv6Unspecified() && errors.Is(err, syscall.EAFNOSUPPORT) {
		v4 := netip.AddrPortFrom(netip.IPv4Unspecified(), addr.Port())
		log.Warn().Str("component", "tunnel-in").Str("listen", addr.String()).Str("instead", v4.String()).
			Msg("this kernel has no IPv6 (ipv6.disable=1?): the tunnel accepts IPv4 only")
		ln, err = net.ListenTCP("tcp4", net.TCPAddrFromAddrPort(v4))
	}
	if err != nil {
		return nil, fmt.Errorf("listening on %s (tunnel.listen): %w", addr, err)
	}
	return ln, nil
}

// Listen opens the tunnel listener.
func Listen(o ServerOptions) (*Server, error) {
	if o.MaxConnections < 1 || o.HandshakeTimeout <= 0 || o.Local == nil {
		return nil, errors.New("tunnel server: MaxConnections, HandshakeTimeout and Local must be set")
	}
	if o.Stats == nil {
		o.Stats = new(Stats)
	}
	if o.MaxHandshakes < 1 {
		o.MaxHandshakes = o.MaxConnections
	}
	if o.MaxHandshakesPerSource < 1 {
		o.MaxHandshakesPerSource = o.MaxHandshakes
	}
	ln, err := ListenTCP(o.Listen, o.Logger)
	if err != nil {
		return nil, err
	}
	// The bound port too: with port 0 in Listen it is known only now.
	o.OwnPorts = append(slices.Clone(o.OwnPorts), ln.Addr().(*net.TCPAddr).AddrPort().Port())
	log := o.Logger.With().Str("component", "tunnel-in").Logger()
	s := &Server{
		o:          o,
		ln:         ln,
		log:        log,
		errLog:     newLimitedLog(log, 20, time.Second),
		slots:      make(chan struct{}, o.MaxConnections),
		handshakes: newHandshakeBudget(o.MaxHandshakes, o.MaxHandshakesPerSource, staleAfter(o.HandshakeTimeout)),
		conns:      make(map[*rawConn]struct{}),
		lns:        make(map[*net.TCPListener]struct{}),
		scope:      Scope{Local: o.Local, Dial: o.Dial},
	}
	if o.Credentials != nil {
		s.tlsCfg = o.Credentials.ServerConfig()
	}
	s.SetAllowPorts(o.AllowPorts)
	return s, nil
}

// SetAllowPorts replaces tunnel.allow_ports (empty: any port) for the
// connections accepted from now on.
func (s *Server) SetAllowPorts(ports []uint16) {
	p := slices.Clone(ports)
	s.allowPorts.Store(&p)
}

// AllowPorts returns tunnel.allow_ports in force.
func (s *Server) AllowPorts() []uint16 { return slices.Clone(*s.allowPorts.Load()) }

// Addr is the address the listener is bound to.
func (s *Server) Addr() netip.AddrPort { return s.ln.Addr().(*net.TCPAddr).AddrPort() }

// Serve accepts on the server's own listener until it is closed.
func (s *Server) Serve(ctx context.Context) error {
	return s.serveListener(ctx, s.ln, s.scope)
}

// AddListener serves ln too, delivering within scope, until the returned
// function closes it (connections being relayed go on) or the server closes.
func (s *Server) AddListener(ctx context.Context, ln *net.TCPListener, scope Scope) (stop func()) {
	s.mu.Lock()
	if s.closed.Load() {
		s.mu.Unlock()
		ln.Close()
		return func() {}
	}
	s.lns[ln] = struct{}{}
	s.mu.Unlock()
	go s.serveListener(ctx, ln, scope)
	return func() {
		s.mu.Lock()
		delete(s.lns, ln)
		s.mu.Unlock()
		ln.Close()
	}
}

// closeListeners closes every listener (no new tunnel connections).
func (s *Server) closeListeners() error {
	err := s.ln.Close()
	s.mu.Lock()
	for ln := range s.lns {
		ln.Close()
		delete(s.lns, ln)
	}
	s.mu.Unlock()
	return err
}

func (s *Server) serveListener(ctx context.Context, ln *net.TCPListener, scope Scope) error {
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			// EMFILE and friends: back off instead of spinning.
			s.log.Error().Err(err).Msg("accepting")
			time.Sleep(50 * time.Millisecond)
			continue
		}
		raw := &rawConn{TCPConn: c}
		src := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr()
		p, ok := s.handshakes.admit(src, time.Now(), func() {
			raw.SetLinger(0)
			raw.TCPConn.Close()
		})
		if !ok {
			// Refusing must stay cheaper than serving: no handshake, a reset.
			s.o.Stats.Count(ReasonTooManyHandshakes)
			s.errLog.warn().Str("peer", c.RemoteAddr().String()).Str("reason", ReasonTooManyHandshakes.String()).
				Int("max_handshakes", s.o.MaxHandshakes).Int("max_handshakes_per_source", s.o.MaxHandshakesPerSource).
				Msg("tunnel connection reset: too many connections in their handshake")
			raw.SetLinger(0)
			c.Close()
			continue
		}
		s.start(raw, func() { s.serve(ctx, raw, scope, p) })
	}
}

func (s *Server) start(raw *rawConn, fn func()) {
	s.mu.Lock()
	s.conns[raw] = struct{}{}
	s.mu.Unlock()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer func() {
			s.mu.Lock()
			delete(s.conns, raw)
			s.mu.Unlock()
		}()
		fn()
	}()
}

// Shutdown stops accepting and waits for the connections being relayed to
// end until ctx is done; then it closes the rest (see Close).
func (s *Server) Shutdown(ctx context.Context) error {
	err := s.closeListeners()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
	if cerr := s.Close(); cerr != nil && !errors.Is(cerr, net.ErrClosed) {
		return cerr
	}
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// Close stops accepting and resets every tunnel connection (their local
// ends are reset by the relay in turn).
func (s *Server) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	err := s.closeListeners()
	s.mu.Lock()
	for raw := range s.conns {
		raw.SetLinger(0)
		raw.TCPConn.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return err
}

// refusal is a connection the server will not deliver, with its reason.
type refusal struct {
	reason Reason
	err    error
}

// serve runs one tunnel connection: handshake and header (under the
// handshake budget, p), then a place among max_connections, checks, status,
// relay.
func (s *Server) serve(ctx context.Context, raw *rawConn, scope Scope, p *pending) {
	conn, dst, ref := s.accept(ctx, raw)
	if s.handshakes.done(p) {
		ref = &refusal{ReasonHandshakeEvicted, fmt.Errorf("still in its handshake after %s, when a new connection needed the place", staleAfter(s.o.HandshakeTimeout))}
	}
	if ref != nil {
		s.refuse(raw, conn, dst, ref)
		return
	}
	select {
	case s.slots <- struct{}{}:
		defer func() { <-s.slots }()
	default:
		s.refuse(raw, conn, dst, &refusal{ReasonTooManyConnections, fmt.Errorf("%d connections open (tunnel.max_connections)", s.o.MaxConnections)})
		return
	}
	up, ref := s.deliver(ctx, dst, scope)
	if ref != nil {
		s.refuse(raw, conn, dst, ref)
		return
	}
	if _, err := conn.Write(AppendStatus(make([]byte, 0, StatusSize), Status{OK: true})); err != nil {
		up.SetLinger(0)
		up.Close()
		conn.Abort()
		return
	}
	raw.SetDeadline(time.Time{})
	raw.established.Store(true)

	st := &s.o.Stats.In
	st.Connections.Add(1)
	st.Active.Add(1)
	res := proxy.RelayIdle(conn, proxy.TCP(up), s.o.IdleTimeout)
	st.Active.Add(-1)
	st.BytesRx.Add(uint64(res.AtoB))
	st.BytesTx.Add(uint64(res.BtoA))
	if errors.Is(res.Err, proxy.ErrIdle) {
		s.o.Stats.Count(ReasonIdleTimeout)
		s.errLog.warn().Str("peer", raw.RemoteAddr().String()).Str("dst", dst.String()).Str("reason", ReasonIdleTimeout.String()).
			Dur("idle_timeout", s.o.IdleTimeout).Msg("tunnel connection reset: nothing moved for tunnel.idle_timeout")
	}
	if e := s.log.Debug(); e.Enabled() {
		if conn.tls != nil {
			e = e.Str("peer_id", PeerID(conn.tls.ConnectionState()))
		}
		e.Str("peer", raw.RemoteAddr().String()).Str("dst", dst.String()).Bool("resumed", conn.Resumed).
			Int64("rx", res.AtoB).Int64("tx", res.BtoA).AnErr("err", res.Err).Msg("tunnel connection done")
	}
}

// accept does the handshake and reads the header, both under the handshake
// deadline. conn is nil if the handshake failed.
func (s *Server) accept(ctx context.Context, raw *rawConn) (*Conn, netip.AddrPort, *refusal) {
	deadline := time.Now().Add(s.o.HandshakeTimeout)
	raw.SetDeadline(deadline)
	var tc *tls.Conn
	if s.tlsCfg != nil {
		tc = tls.Server(raw, s.tlsCfg)
		hctx, cancel := context.WithDeadline(ctx, deadline)
		start := time.Now()
		err := tc.HandshakeContext(hctx)
		cancel()
		s.o.Stats.handshake("server", tc, err, start)
		if err != nil {
			return nil, netip.AddrPort{}, &refusal{handshakeReason(err), err}
		}
	}
	conn := newConn(raw, tc)
	dst, ref := readHeader(conn)
	return conn, dst, ref
}

// readHeader reads exactly one header. The client sends nothing else before
// the status, so with TLS the header is a record of its own: a first read
// that returns more than a header is an oversized header.
func readHeader(conn *Conn) (netip.AddrPort, *refusal) {
	var buf [HeaderSize + 1]byte
	n, err := conn.Read(buf[:])
	if n > HeaderSize {
		return netip.AddrPort{}, &refusal{ReasonOversizedHeader, fmt.Errorf("more than %d bytes before the status", HeaderSize)}
	}
	if err == nil && n < HeaderSize {
		var m int
		m, err = io.ReadFull(conn, buf[n:HeaderSize])
		n += m
	}
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return netip.AddrPort{}, &refusal{ReasonHeaderTimeout, fmt.Errorf("%d of %d header bytes before the deadline", n, HeaderSize)}
		}
		return netip.AddrPort{}, &refusal{ReasonTruncatedHeader, fmt.Errorf("%d of %d header bytes: %w", n, HeaderSize, err)}
	}
	dst, err := ParseHeader(buf[:HeaderSize])
	if err != nil {
		var he *HeaderError
		errors.As(err, &he)
		return netip.AddrPort{}, &refusal{he.Reason, err}
	}
	return dst, nil
}

// deliver checks dst and connects to it. Only addresses of the listener's
// namespace, never loopback, never smeshd's own ports, and only allow_ports
// when set: the tunnel port must never be an open relay, nor a way to the
// services a node keeps on localhost.
func (s *Server) deliver(ctx context.Context, dst netip.AddrPort, scope Scope) (*net.TCPConn, *refusal) {
	switch {
	case dst.Addr().Unmap().IsLoopback():
		return nil, &refusal{ReasonLoopback, fmt.Errorf("%s is a loopback address: no captured connection goes to another node's loopback", dst.Addr())}
	case !scope.Local.Contains(dst.Addr()):
		return nil, &refusal{ReasonNotLocal, fmt.Errorf("%s is not an address of this node", dst.Addr())}
	case slices.Contains(s.o.OwnPorts, dst.Port()):
		return nil, &refusal{ReasonOwnPort, fmt.Errorf("port %d is one of smeshd's own", dst.Port())}
	case len(*s.allowPorts.Load()) > 0 && !slices.Contains(*s.allowPorts.Load(), dst.Port()):
		return nil, &refusal{ReasonPortNotAllowed, fmt.Errorf("port %d is not in tunnel.allow_ports", dst.Port())}
	}
	// smeshd's own connect() is never captured; in splice mode sock_ops
	// splices this hop with the local server's socket.
	dctx, cancel := context.WithTimeout(ctx, s.o.HandshakeTimeout)
	defer cancel()
	dial := scope.Dial
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	c, err := dial(dctx, "tcp", dst.String())
	if err != nil {
		return nil, &refusal{ReasonUnreachable, err}
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		return nil, &refusal{ReasonUnreachable, fmt.Errorf("dialled %T, not TCP", c)}
	}
	return tc, nil
}

// refuse counts and logs a refusal and ends the connection: with a status
// when the header was read (the peer then resets its app's connection), by
// closing it otherwise.
func (s *Server) refuse(raw *rawConn, conn *Conn, dst netip.AddrPort, ref *refusal) {
	s.o.Stats.Count(ref.reason)
	ev := s.errLog.warn()
	if ev != nil {
		ev = ev.Str("peer", raw.RemoteAddr().String()).Str("reason", ref.reason.String()).Err(ref.err)
		if conn != nil && conn.tls != nil {
			ev = ev.Str("peer_id", PeerID(conn.tls.ConnectionState()))
		}
		if dst.IsValid() {
			ev = ev.Str("dst", dst.String())
		}
		ev.Msg("tunnel connection refused")
	}
	if conn == nil {
		raw.Close()
		return
	}
	if ref.reason < ReasonNotTLS {
		// A status, then close_notify and FIN: the client reads the
		// reason, not a reset.
		conn.Write(AppendStatus(make([]byte, 0, StatusSize), Status{Reason: ref.reason}))
		conn.Close()
		return
	}
	conn.Abort()
}
