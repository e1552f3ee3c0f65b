package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/proxy"
)

// Hold makes the accept loops wait for g before they accept (proxy.Gate):
// a smeshd taking over from a running one accepts on the listeners they
// share only once the other released them. Call it before Serve.
func (s *Server) Hold(g *proxy.Gate) { s.gate = g }

// SetSourceChecks sets ServerOptions.Verifier and Authorize of a server
// made before its owner had them (smeshd makes the tunnel first). Call it
// before Serve and AddListener; what they answer may change later, behind
// them, never the hooks themselves.
func (s *Server) SetSourceChecks(v SourceVerifier, authorize func(src Source, dst netip.AddrPort) (policy string, allowed bool)) {
	s.o.Verifier, s.o.Authorize = v, authorize
}

// ServerOptions configure a Server.
type ServerOptions struct {
	Listen netip.AddrPort
	// Listener, when set, is served instead of listening on Listen: the
	// tunnel listener a predecessor handed over (pkg/handover), with the
	// connections already in its queue.
	Listener *net.TCPListener
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
	// ParkAfter: a relayed connection idle both ways for that long waits
	// without a goroutine (proxy.Parker). 0: proxy.DefaultParkAfter;
	// negative: never.
	ParkAfter time.Duration
	// Local are this node's addresses: the only destinations delivered to.
	Local *LocalAddrs
	// Dial connects the server's own listener to local destinations; nil
	// dials from this process's namespace. (Tests map addresses with it.)
	Dial func(ctx context.Context, network, address string) (net.Conn, error)
	// Stats receives the counters; nil gets a private set.
	Stats *Stats
	// ProtocolV1 accepts wire protocol v1 only, as nodes before v2 do
	// (for tests and measurements).
	ProtocolV1 bool
	// ProtocolV2 accepts wire protocols v2 and v1 only, as nodes before v3
	// do (for tests).
	ProtocolV2 bool
	// Verifier checks the source a v3 header asserts (nil: no source is
	// verified, every connection is its node's; see SourceVerifier).
	Verifier SourceVerifier
	// Authorize decides, after the source was checked and before the
	// destination is dialled, whether src may connect to dst; policy
	// names what denied it (logged). A denial is refused policy_denied.
	// nil allows all. It runs for every tunnelled connection, on its
	// goroutine: it must not block.
	Authorize func(src Source, dst netip.AddrPort) (policy string, allowed bool)
	Logger    zerolog.Logger
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
	gate   *proxy.Gate // nil: accept at once (Hold)
	ln     *net.TCPListener
	scope  Scope // of ln
	tlsCfg *tls.Config
	log    zerolog.Logger
	errLog *limitedLog

	allowPorts atomic.Pointer[[]uint16] // tunnel.allow_ports, changed by reloads

	slots      chan struct{} // one per tunnelled connection relayed (max_connections)
	park       *proxy.Parker // nil: relays keep their goroutines
	handshakes *handshakeBudget
	draining   atomic.Bool
	// released: StopAccepting ran; the accept loops end without taking
	// the queue (it is a successor's), and no new one starts.
	released atomic.Bool

	// testHookAccept, when set, runs before each accept.
	testHookAccept func()

	mu     sync.Mutex
	closed bool                               // under mu: no more accept loops or connections start
	wg     sync.WaitGroup                     // the connections; Add under mu, while !closed
	loops  sync.WaitGroup                     // the accept loops; Add under mu, while !closed
	conns  map[*rawConn]struct{}              // under mu
	lns    map[*net.TCPListener]chan struct{} // the AddListener ones, with their loop's end
	served map[*net.TCPListener]chan struct{} // every listener's loop's end, for Shutdown
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
	ln := o.Listener
	if ln == nil {
		var err error
		if ln, err = ListenTCP(o.Listen, o.Logger); err != nil {
			return nil, err
		}
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
		lns:        make(map[*net.TCPListener]chan struct{}),
		served:     make(map[*net.TCPListener]chan struct{}),
		scope:      Scope{Local: o.Local, Dial: o.Dial},
	}
	if o.Credentials != nil {
		s.tlsCfg = o.Credentials.ServerConfig()
		if o.ProtocolV1 || o.ProtocolV2 {
			var protos []string
			if !o.ProtocolV1 {
				protos = []string{ALPN2}
			}
			get := s.tlsCfg.GetConfigForClient
			s.tlsCfg.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
				cfg, err := get(hello)
				if cfg != nil {
					cfg = cfg.Clone()
					cfg.NextProtos = protos
				}
				return cfg, err
			}
		}
	}
	s.SetAllowPorts(o.AllowPorts)
	if o.ParkAfter >= 0 {
		p, err := proxy.NewParker(o.ParkAfter)
		if err != nil {
			log.Warn().Err(err).Msg("idle connections will hold their goroutines")
		}
		s.park = p
	}
	return s, nil
}

// Parked is how many directions of relayed connections wait without a
// goroutine (proxy.Parker).
func (s *Server) Parked() int { return s.park.Parked() }

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

// Listener is the server's own listener, for a hand-over: the caller sends
// a duplicate (File) and leaves this one to Release.
func (s *Server) Listener() *net.TCPListener { return s.ln }

// Serve accepts on the server's own listener until it is closed.
func (s *Server) Serve(ctx context.Context) error {
	done, ok := s.startLoop(s.ln)
	if !ok {
		return nil
	}
	return s.serveListener(ctx, s.ln, s.scope, done)
}

// AddListener serves ln too, delivering within scope, until the returned
// function closes it (connections being relayed go on) or the server closes.
func (s *Server) AddListener(ctx context.Context, ln *net.TCPListener, scope Scope) (stop func()) {
	done, ok := s.startLoop(ln)
	if !ok {
		ln.Close()
		return func() {}
	}
	s.mu.Lock()
	s.lns[ln] = done
	s.mu.Unlock()
	go s.serveListener(ctx, ln, scope, done)
	return func() {
		s.mu.Lock()
		delete(s.lns, ln)
		s.mu.Unlock()
		ln.Close()
	}
}

// startLoop registers the accept loop of ln, unless the server is closed.
func (s *Server) startLoop(ln *net.TCPListener) (done chan struct{}, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.released.Load() {
		return nil, false
	}
	done = make(chan struct{})
	s.served[ln] = done
	s.loops.Add(1)
	return done, true
}

// listeners returns every listener with its loop's end.
func (s *Server) listeners() map[*net.TCPListener]chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.served)
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

func (s *Server) serveListener(ctx context.Context, ln *net.TCPListener, scope Scope, done chan struct{}) error {
	defer s.loops.Done()
	defer close(done)
	defer func() {
		s.mu.Lock()
		delete(s.served, ln)
		s.mu.Unlock()
	}()
	if !s.gate.Wait() {
		return nil
	}
	for {
		if s.testHookAccept != nil {
			s.testHookAccept()
		}
		c, err := ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			if errors.Is(err, os.ErrDeadlineExceeded) && s.released.Load() {
				// Handed over: what is queued is the successor's.
				return nil
			}
			if errors.Is(err, os.ErrDeadlineExceeded) && s.draining.Load() {
				// Shutdown: take what the kernel queued, then stop.
				for _, c := range acceptQueued(ln) {
					s.admit(ctx, c, scope)
				}
				return nil
			}
			// EMFILE and friends: back off instead of spinning.
			s.log.Error().Err(err).Msg("accepting")
			time.Sleep(50 * time.Millisecond)
			continue
		}
		s.admit(ctx, c, scope)
	}
}

// acceptQueued accepts the connections in ln's queue without waiting:
// those whose handshake the kernel completed before the listener closes,
// which closing it would reset.
func acceptQueued(ln *net.TCPListener) []*net.TCPConn {
	sc, err := ln.SyscallConn()
	if err != nil {
		return nil
	}
	var fds []int
	sc.Control(func(fd uintptr) {
		for {
			nfd, _, err := unix.Accept4(int(fd), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
			if err == unix.EINTR || err == unix.ECONNABORTED {
				continue
			}
			if err != nil {
				return
			}
			fds = append(fds, nfd)
		}
	})
	var conns []*net.TCPConn
	for _, fd := range fds {
		f := os.NewFile(uintptr(fd), "tunnel")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			continue
		}
		if tc, ok := c.(*net.TCPConn); ok {
			conns = append(conns, tc)
		} else {
			c.Close()
		}
	}
	return conns
}

// admit puts a new connection under the handshake budget and serves it.
func (s *Server) admit(ctx context.Context, c *net.TCPConn, scope Scope) {
	raw := newRawConn(c)
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
		return
	}
	if !s.start(raw, func(done func()) bool { return s.serve(ctx, raw, scope, p, done) }) {
		s.handshakes.done(p)
	}
}

// start runs fn for raw in a goroutine of its own, unless the server is
// closed (then it resets raw and reports false). fn reports whether done is
// its to call, later, once raw is done; false: raw is done when fn returns.
// The WaitGroup's Add and Close's Wait are ordered by mu.
func (s *Server) start(raw *rawConn, fn func(done func()) bool) bool {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		raw.SetLinger(0)
		raw.TCPConn.Close()
		return false
	}
	s.conns[raw] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	done := func() {
		s.mu.Lock()
		delete(s.conns, raw)
		s.mu.Unlock()
		s.wg.Done()
	}
	go func() {
		if !fn(done) {
			done()
		}
	}()
	return true
}

// statusDelay bounds how long a v2 status waits for the local server's
// first bytes to go with (a millisecond: a server that answers at once has
// answered, and a client that waits for the status before it sends more
// than earlyMax loses no more).
const statusDelay = time.Millisecond

// acceptGrace is how long Shutdown lets the accept loops run before it
// takes what is queued and closes the listeners.
const acceptGrace = 100 * time.Millisecond

// Shutdown stops accepting: the connections peers already made (queued in
// the listeners) are accepted and served, none is reset. Idle pooled
// connections are retired (close_notify: their clients open new ones for
// what comes next), and the tunnelled connections being relayed may end
// until ctx is done; then it closes the rest (see Close).
func (s *Server) Shutdown(ctx context.Context) error {
	s.draining.Store(true)
	s.wakeIdle()
	lns := s.listeners()
	for ln := range lns {
		ln.SetDeadline(time.Now().Add(acceptGrace))
	}
	for _, done := range lns {
		select {
		case <-done:
		case <-ctx.Done():
		}
	}
	err := s.closeListeners()
	// No accept loop runs any more: the connections started are all in wg.
	loops := make(chan struct{})
	go func() { s.loops.Wait(); close(loops) }()
	select {
	case <-loops:
	case <-ctx.Done():
	}
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

// StopAccepting ends every accept loop without accepting what the kernel
// has queued, and returns once none runs: the listeners stay open, so peers'
// connections keep completing their handshake into the queues, for whoever
// holds the listeners next (a successor they were handed to). Release then
// closes this process's copies.
func (s *Server) StopAccepting() {
	s.mu.Lock()
	s.released.Store(true) // under mu: startLoop sees it or its loop is in served
	s.mu.Unlock()
	lns := s.listeners()
	// A deadline in the past wakes a waiting Accept at once.
	for ln := range lns {
		ln.SetDeadline(time.Unix(1, 0))
	}
	for _, done := range lns {
		<-done
	}
}

// Release hands the listeners over: it stops accepting (StopAccepting),
// leaves what is queued to the successor, closes this process's listeners
// and drains: idle pooled links are retired (their peers open new ones,
// to the successor) and the tunnelled connections being relayed go on.
// Shutdown then waits for them.
func (s *Server) Release() error {
	s.StopAccepting()
	s.draining.Store(true)
	s.wakeIdle()
	if err := s.closeListeners(); err != nil && !errors.Is(err, net.ErrClosed) {
		return err
	}
	return nil
}

// wakeIdle wakes the v2 connections waiting idle for their next header, so
// that they see the server draining and retire.
func (s *Server) wakeIdle() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for raw := range s.conns {
		if raw.idle.Load() {
			raw.SetReadDeadline(time.Now())
		}
	}
}

// Close stops accepting and resets every tunnel connection (their local
// ends are reset by the relay in turn).
func (s *Server) Close() error {
	// Parked relays wait again as Relay's do, so that resetting their
	// links below ends them. Not under mu: a relay that ends takes it.
	s.park.Close()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	for raw := range s.conns {
		raw.SetLinger(0)
		raw.TCPConn.Close()
	}
	s.mu.Unlock()
	err := s.closeListeners()
	s.loops.Wait()
	s.wg.Wait()
	return err
}

// refusal is a connection the server will not deliver, with its reason.
type refusal struct {
	reason Reason
	err    error
}

// serve runs one tunnel connection: handshake and header (under the
// handshake budget, p), then its tunnelled connection (relay); in protocol
// v2 and v3, the tunnelled connections that follow on it too. A refusal
// ends the link in every version (a status, then close_notify): what the
// client sent early after the header is discarded with it.
func (s *Server) serve(ctx context.Context, raw *rawConn, scope Scope, p *pending, done func()) bool {
	l, h, ref := s.accept(ctx, raw)
	if s.handshakes.done(p) {
		ref = &refusal{ReasonHandshakeEvicted, fmt.Errorf("still in its handshake after %s, when a new connection needed the place", staleAfter(s.o.HandshakeTimeout))}
	}
	lk := &served{raw: raw, l: l, scope: scope, done: done}
	if ta, ok := raw.RemoteAddr().(*net.TCPAddr); ok {
		lk.peer = ta.AddrPort().Addr().Unmap()
	}
	return s.serveFrom(ctx, lk, h, ref)
}

// served is a link the server's loop serves.
type served struct {
	raw   *rawConn
	l     *link
	scope Scope
	peer  netip.Addr
	done  func() // the link is done (start's)
}

// serveFrom serves the link's tunnelled connections from header h (or
// refusal ref) on. It reports whether lk.done is called later: a relay went
// on without this goroutine (proxy.Parker) and serves the rest of the link
// once it ends.
func (s *Server) serveFrom(ctx context.Context, lk *served, h Header, ref *refusal) bool {
	for {
		var src Source
		if ref == nil {
			src, ref = s.source(lk.l.node, lk.peer, &h)
		}
		if ref != nil {
			s.refuse(lk.raw, lk.l, h.Dst, ref)
			return false
		}
		reuse, later := s.relay(ctx, lk.raw, lk.l, h.Dst, src, lk.scope, func(reuse bool) {
			// The relay ended in a goroutine of its own: it serves on.
			if !reuse || !s.serveNext(ctx, lk) {
				lk.done()
			}
		})
		if later {
			return true
		}
		if !reuse {
			return false
		}
		var more bool
		if h, ref, more = s.next(lk.raw, lk.l); !more {
			return false
		}
	}
}

// serveNext waits for the link's next header and serves from it; as
// serveFrom.
func (s *Server) serveNext(ctx context.Context, lk *served) bool {
	h, ref, more := s.next(lk.raw, lk.l)
	if !more {
		return false
	}
	return s.serveFrom(ctx, lk, h, ref)
}

// relay delivers one tunnelled connection and relays it. reuse reports
// whether the link may carry the next one: protocol v2 or v3, and this one
// ended cleanly. later: the relay went on without this goroutine (its
// other direction outlived this one's, or it parked: proxy.Parker), and
// then gets reuse once it ended, in another goroutine.
func (s *Server) relay(ctx context.Context, raw *rawConn, l *link, dst netip.AddrPort, src Source, scope Scope, then func(reuse bool)) (reuse, later bool) {
	select {
	case s.slots <- struct{}{}:
	default:
		s.refuse(raw, l, dst, &refusal{ReasonTooManyConnections, fmt.Errorf("%d connections open (tunnel.max_connections)", s.o.MaxConnections)})
		return false, false
	}
	up, ref := s.deliver(ctx, dst, src, scope)
	if ref != nil {
		<-s.slots
		s.refuse(raw, l, dst, ref)
		return false, false
	}
	raw.SetDeadline(time.Time{})
	raw.established.Store(true)
	status := appendStatus(make([]byte, 0, StatusSize), Status{OK: true}, l.version)
	var ss *serverStream
	var err error
	if l.version >= Version2 {
		// The client sends without waiting for the status: it may wait
		// (statusDelay at most) for the local server's first bytes or
		// end, and cross the tunnel with them: one wake-up of the client's
		// node instead of two.
		ss = &serverStream{l: l}
		if rc, err := up.SyscallConn(); err == nil {
			ss.local = newPeeker(rc)
		}
		l.raw.startBatch()
		_, err = l.tls.Write(status)
		ss.flush.Store(time.AfterFunc(statusDelay, func() { l.raw.flushBatch() }))
	} else {
		_, err = l.Write(status)
	}
	if err != nil {
		<-s.slots
		up.SetLinger(0)
		up.Close()
		l.Abort()
		return false, false
	}

	st := &s.o.Stats.In
	st.Connections.Add(1)
	st.Active.Add(1)
	var tunnelled proxy.Conn = l
	if ss != nil {
		tunnelled = ss
	}
	// The relay may end before Relay returns, in this goroutine: then the
	// loop goes on here, not in then (which would nest a call per
	// tunnelled connection the link carries).
	var mu sync.Mutex
	returned, ended := false, false
	// s.park may be nil: the relay then never parks.
	s.park.Relay(tunnelled, proxy.TCP(up), proxy.RelayOptions{Idle: s.o.IdleTimeout, Done: func(res proxy.Result) {
		r := s.relayed(raw, l, ss, dst, res)
		mu.Lock()
		if !returned {
			ended, reuse = true, r
			mu.Unlock()
			return
		}
		mu.Unlock()
		then(r)
	}})
	mu.Lock()
	defer mu.Unlock()
	returned = true
	return reuse, !ended
}

// relayed counts and logs a relayed connection that ended, gives its place
// back, and reports whether its link may carry the next one (see relay).
func (s *Server) relayed(raw *rawConn, l *link, ss *serverStream, dst netip.AddrPort, res proxy.Result) bool {
	defer func() { <-s.slots }()
	reuse := false
	if ss != nil {
		ss.stopTimer()
		reuse = res.Err == nil && ss.clean()
		if !reuse && !ss.aborted {
			l.Abort()
		}
	}
	st := &s.o.Stats.In
	st.Active.Add(-1)
	st.BytesRx.Add(uint64(res.AtoB))
	st.BytesTx.Add(uint64(res.BtoA))
	var fe *frameError
	switch {
	case errors.Is(res.Err, proxy.ErrIdle):
		s.o.Stats.Count(ReasonIdleTimeout)
		s.errLog.warn().Str("peer", raw.RemoteAddr().String()).Str("dst", dst.String()).Str("reason", ReasonIdleTimeout.String()).
			Dur("idle_timeout", s.o.IdleTimeout).Msg("tunnel connection reset: nothing moved for tunnel.idle_timeout")
	case errors.As(res.Err, &fe):
		s.o.Stats.Count(ReasonBadFrame)
		s.errLog.warn().Str("peer", raw.RemoteAddr().String()).Str("dst", dst.String()).Str("reason", ReasonBadFrame.String()).
			Err(res.Err).Msg("tunnel connection reset")
	}
	if e := s.log.Debug(); e.Enabled() {
		if l.tls != nil {
			e = e.Str("peer_id", PeerID(l.tls.ConnectionState()))
		}
		e.Str("peer", raw.RemoteAddr().String()).Str("dst", dst.String()).Bool("resumed", l.resumed).
			Int64("rx", res.AtoB).Int64("tx", res.BtoA).AnErr("err", res.Err).Msg("tunnel connection done")
	}
	return reuse
}

// next waits on an idle v2 link for the header of its next tunnelled
// connection. more is false when the link ends: the client closed it, it
// idled for serverPoolIdle, or the server drains (then it retires the link
// with close_notify, and the client sends what it had for it on a new
// one). A link made with credentials or under a policy no longer in force
// gets the refusal "retired" instead of a delivery.
func (s *Server) next(raw *rawConn, l *link) (hdr Header, ref *refusal, more bool) {
	// The deadline before idle, idle before draining is checked: Shutdown
	// sets draining, then wakes the idle ones (wakeIdle).
	raw.SetReadDeadline(time.Now().Add(serverPoolIdle))
	raw.idle.Store(true)
	var h [HeaderSizeV3]byte
	size := headerSize(l.version)
	n, err := 0, error(nil)
	if !s.draining.Load() {
		n, err = io.ReadFull(l, h[:size])
	}
	raw.idle.Store(false)
	var ne net.Error
	switch {
	case s.draining.Load() && (err == nil || errors.As(err, &ne) && ne.Timeout()):
		l.Close()
		return hdr, nil, false
	case n == 0 && err != nil:
		// The client closed the idle link (or reset it, or the server
		// closes).
		l.Close()
		return hdr, nil, false
	case err != nil && errors.As(err, &ne) && ne.Timeout():
		return hdr, &refusal{ReasonHeaderTimeout, fmt.Errorf("%d of %d header bytes before the deadline", n, size)}, true
	case err != nil:
		return hdr, &refusal{ReasonTruncatedHeader, fmt.Errorf("%d of %d header bytes: %w", n, size, err)}, true
	}
	raw.SetReadDeadline(time.Time{})
	hdr, ref = s.finishHeader(l, h[:size], true)
	if ref != nil {
		return hdr, ref, true
	}
	if err := s.stale(raw, l); err != nil {
		return hdr, &refusal{ReasonRetired, err}, true
	}
	return hdr, nil, true
}

// headerSize is the size of a header, or of its fixed part, in version.
func headerSize(version byte) int {
	if version == Version3 {
		return HeaderSizeV3
	}
	return HeaderSize
}

// v3Buf holds a v3 header while its source ID is read: taken only then.
var v3Buf = sync.Pool{New: func() any { return new([HeaderSizeV3 + MaxSourceID]byte) }}

// finishHeader decodes a header whose fixed part is read: in v3 it reads
// the source ID the fixed part announces (exactly that many bytes, at most
// MaxSourceID), under the read deadline set or, with deadline, under one
// of its own (the header deadline: handshake_timeout).
func (s *Server) finishHeader(l *link, fixed []byte, deadline bool) (Header, *refusal) {
	fail := func(err error) (Header, *refusal) {
		var he *HeaderError
		errors.As(err, &he)
		return Header{}, &refusal{he.Reason, err}
	}
	if l.version != Version3 {
		dst, err := parseHeader(fixed, l.version)
		if err != nil {
			return fail(err)
		}
		return Header{Dst: dst}, nil
	}
	n, err := headerV3Len(fixed)
	if err != nil {
		return fail(err)
	}
	buf := v3Buf.Get().(*[HeaderSizeV3 + MaxSourceID]byte)
	defer v3Buf.Put(buf)
	copy(buf[:], fixed)
	if deadline && n > 0 {
		l.raw.SetReadDeadline(time.Now().Add(s.o.HandshakeTimeout))
		defer l.raw.SetReadDeadline(time.Time{})
	}
	if m, err := io.ReadFull(l, buf[HeaderSizeV3:HeaderSizeV3+n]); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return Header{}, &refusal{ReasonHeaderTimeout, fmt.Errorf("%d of %d header bytes before the deadline", HeaderSizeV3+m, HeaderSizeV3+n)}
		}
		return Header{}, &refusal{ReasonTruncatedHeader, fmt.Errorf("%d of %d header bytes: %w", HeaderSizeV3+m, HeaderSizeV3+n, err)}
	}
	var td spiffeid.TrustDomain
	if s.o.Credentials != nil {
		td = s.o.Credentials.policy.Load().TrustDomain
	}
	h, err := ParseHeaderV3(buf[:HeaderSizeV3+n], td)
	if err != nil {
		return fail(err)
	}
	return h, nil
}

// stale says why a v2 link may carry no more tunnelled connections, or nil:
// this node's certificate files changed since its handshake, or its peer's
// certificate no longer passes the identity policy in force (a reload that
// dropped it from allow_identities), or expired.
func (s *Server) stale(raw *rawConn, l *link) error {
	creds := s.o.Credentials
	if creds == nil {
		return nil
	}
	if creds.current() != raw.set {
		return errors.New("this node's certificate files changed since the connection's handshake")
	}
	if l.leaf == nil || time.Now().After(l.leaf.NotAfter) {
		return errors.New("the peer's certificate expired")
	}
	if pol := creds.policy.Load(); pol != raw.policy {
		if _, err := pol.check(l.leaf); err != nil {
			return err
		}
		raw.policy = pol
	}
	if s.draining.Load() {
		return errors.New("the server is draining")
	}
	return nil
}

// accept does the handshake and reads the header, both under the handshake
// deadline. l is nil if the handshake failed.
func (s *Server) accept(ctx context.Context, raw *rawConn) (*link, Header, *refusal) {
	deadline := time.Now().Add(s.o.HandshakeTimeout)
	raw.SetDeadline(deadline)
	var tc *tls.Conn
	if s.tlsCfg != nil {
		tc = tls.Server(raw, s.tlsCfg)
		hctx, cancel := context.WithDeadline(ctx, deadline)
		start := time.Now()
		err := handshake(hctx, tc)
		cancel()
		s.o.Stats.handshake("server", tc, err, start)
		if err != nil {
			return nil, Header{}, &refusal{handshakeReason(err), err}
		}
		raw.policy = s.o.Credentials.policy.Load()
	}
	l := newLink(raw, tc)
	if l.leaf != nil {
		// The policy checked it has one.
		l.node, _ = x509svid.IDFromCert(l.leaf)
	}
	h, ref := s.readHeader(l)
	return l, h, ref
}

// readHeader reads exactly one header. In v1 the client sends nothing else
// before the status, so with TLS the header is a record of its own: a
// first read that returns more than a header is an oversized header. In v2
// and v3 what follows the header stays unread until the destination is
// connected.
func (s *Server) readHeader(l *link) (Header, *refusal) {
	var buf [HeaderSizeV3 + 1]byte
	size := headerSize(l.version)
	p := buf[:HeaderSize+1]
	if l.version >= Version2 {
		p = buf[:size]
	}
	n, err := l.Read(p)
	if n > size {
		return Header{}, &refusal{ReasonOversizedHeader, fmt.Errorf("more than %d bytes before the status", size)}
	}
	if err == nil && n < size {
		var m int
		m, err = io.ReadFull(l, buf[n:size])
		n += m
	}
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return Header{}, &refusal{ReasonHeaderTimeout, fmt.Errorf("%d of %d header bytes before the deadline", n, size)}
		}
		return Header{}, &refusal{ReasonTruncatedHeader, fmt.Errorf("%d of %d header bytes: %w", n, size, err)}
	}
	return s.finishHeader(l, buf[:size], false)
}

// deliver checks dst and connects to it. Only addresses of the listener's
// namespace, never loopback, never smeshd's own ports, and only allow_ports
// when set: the tunnel port must never be an open relay, nor a way to the
// services a node keeps on localhost.
//
// Then src must be allowed to connect to dst (ServerOptions.Authorize):
// nothing is dialled for a connection it denies.
func (s *Server) deliver(ctx context.Context, dst netip.AddrPort, src Source, scope Scope) (*net.TCPConn, *refusal) {
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
	if ref := s.authorize(src, dst); ref != nil {
		return nil, ref
	}
	// smeshd's own connect() is never captured; in splice mode sock_ops
	// splices this hop with the local server's socket.
	dctx, cancel := context.WithTimeout(ctx, s.o.HandshakeTimeout)
	defer cancel()
	dial := scope.Dial
	if dial == nil {
		dial = proxy.LocalDialer().DialContext
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
func (s *Server) refuse(raw *rawConn, conn *link, dst netip.AddrPort, ref *refusal) {
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
		conn.Write(appendStatus(make([]byte, 0, StatusSize), Status{Reason: ref.reason}, conn.version))
		conn.Close()
		return
	}
	conn.Abort()
}
