// Package proxy is smeshd's userspace side of captured connections: the
// outbound listener that connect4 sends captured connections to, and the
// relay that moves their bytes.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/identity"
)

// Dialer reaches a captured connection's original destination.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// EarlyDialer is a Dialer that can send a connection's first bytes along
// with what opens it (the tunnel sends them with its header: one send, one
// wake-up of the peer, instead of two). The outbound proxy hands it what
// the app sent before the proxy got to the connection; first is valid
// only during the call.
type EarlyDialer interface {
	Dialer
	DialEarly(ctx context.Context, network, address string, first []byte) (net.Conn, error)
}

// Observer receives connection events; smeshd's metrics implement it.
type Observer interface {
	ConnOpened(path string)
	ConnClosed(path string, tx, rx int64)
	Refused(reason string)
}

// Paths of relayed connections, as the metrics name them.
const (
	PathCopy      = "copy"       // to a destination on this node, dialled directly
	PathTunnelOut = "tunnel_out" // through the tunnel to another node
)

// Options configure an Outbound.
type Options struct {
	Listen netip.AddrPort
	// Listener, when set, is served instead of listening on Listen: the
	// outbound listener a predecessor handed over (pkg/handover), with
	// the connections already in its queue.
	Listener *net.TCPListener
	// Gate, when set, holds every accept loop back until it opens (see
	// Gate); nil accepts at once.
	Gate *Gate
	// Dialer reaches destinations; nil dials them directly.
	Dialer Dialer
	// MaxConnections bounds the connections relayed at once; more are
	// reset at once. 0: no limit.
	MaxConnections int
	// IdleTimeout resets a connection that moved no byte either way for
	// that long. 0: no limit.
	IdleTimeout time.Duration
	// ParkAfter: a relayed connection idle both ways for that long waits
	// without a goroutine (Parker). 0: DefaultParkAfter; negative: never.
	ParkAfter time.Duration
	// OwnPorts are the ports of smeshd's own listeners (outbound, tunnel,
	// admin). A connection whose original destination is one of them on
	// a local address (loopback, unspecified, or Local) is refused, never
	// dialled: smeshd would be dialling itself, and each such dial could
	// come back as another such connection.
	OwnPorts []uint16
	// Local reports whether an address is on this node; nil: loopback
	// and unspecified addresses only.
	Local func(netip.Addr) bool
	// OriginalDst finds a connection's original destination; nil asks
	// the kernel (SO_ORIGINAL_DST, see OriginalDst).
	OriginalDst func(*net.TCPConn) (netip.AddrPort, error)
	// Source names the workload a connection comes from by the source
	// identity number connect4/6 recorded for it (OriginalSource); false
	// when the number names none. nil: connections carry no source.
	Source func(uint32) (spiffeid.ID, bool)
	// OriginalSource finds a connection's source identity number; nil
	// asks the kernel (OriginalSource).
	OriginalSource func(*net.TCPConn) (uint32, error)
	Observer       Observer // may be nil
	Logger         zerolog.Logger
}

// Outbound accepts captured connections and relays each to its original
// destination.
//
// It serves its own listener (Options.Listen, in smeshd's namespace) and one
// more in every enrolled network namespace (AddListener): connect4 sends a
// captured connection to [outbound] listen in the app's own namespace. The
// limits are shared by all of them.
type Outbound struct {
	o     Options
	main  *listener
	log   zerolog.Logger
	warn  zerolog.Logger // rate-limited, for per-connection refusals
	slots chan struct{}  // nil without a limit
	wg    sync.WaitGroup
	park  *Parker // nil: relays keep their goroutines

	mu       sync.Mutex
	conns    map[*net.TCPConn]*relayed
	lns      map[*listener]struct{} // the AddListener ones
	released bool                   // under mu: StopAccepting ran, no loop starts any more
}

// listener is one outbound listener and how its connections reach their
// destinations.
type listener struct {
	ln     *net.TCPListener
	dialer Dialer
	served chan struct{} // closed when its accept loop returns
}

// acceptGrace is how long Shutdown keeps accepting: connections the kernel
// already completed sit in the listen queue, and closing the listener would
// reset them instead of draining them.
const acceptGrace = 100 * time.Millisecond

// relayed is one connection being relayed, as /debug/connections shows it.
type relayed struct {
	src, dst string
	path     atomic.Value // string, once the upstream is known
	source   atomic.Value // string: the source workload's identity, when known
	start    time.Time
	tx, rx   atomic.Int64
}

// ConnInfo describes one relayed connection.
type ConnInfo struct {
	Source, OriginalDst, Path string
	// SourceIdentity is the source workload's SPIFFE ID, when known.
	SourceIdentity   string
	TxBytes, RxBytes int64
	Age              time.Duration
}

// DialTimeout bounds how long a captured connection waits for its upstream.
const DialTimeout = 10 * time.Second

// Listen opens the outbound listener, or takes Options.Listener.
func Listen(o Options) (*Outbound, error) {
	ln := o.Listener
	if ln == nil {
		var err error
		if ln, err = ListenLocal("tcp4", o.Listen); err != nil {
			return nil, fmt.Errorf("listening on %s (outbound.listen): %w", o.Listen, err)
		}
	}
	if o.Dialer == nil {
		o.Dialer = &net.Dialer{Timeout: DialTimeout, KeepAlive: -1}
	}
	if o.OriginalSource == nil {
		o.OriginalSource = OriginalSource
	}
	if o.OriginalDst == nil {
		o.OriginalDst = OriginalDst
	}
	log := o.Logger.With().Str("component", "outbound").Logger()
	out := &Outbound{
		o:     o,
		main:  &listener{ln: ln, dialer: o.Dialer, served: make(chan struct{})},
		log:   log,
		warn:  log.Sample(&zerolog.BurstSampler{Burst: 5, Period: time.Second}),
		conns: make(map[*net.TCPConn]*relayed),
		lns:   make(map[*listener]struct{}),
	}
	if o.MaxConnections > 0 {
		out.slots = make(chan struct{}, o.MaxConnections)
	}
	if o.ParkAfter >= 0 {
		p, err := NewParker(o.ParkAfter)
		if err != nil {
			// Relays keep a goroutine per direction, as without parking.
			log.Warn().Err(err).Msg("idle connections will hold their goroutines")
		}
		out.park = p
	}
	return out, nil
}

// Addr is the address the listener is bound to.
func (o *Outbound) Addr() netip.AddrPort { return o.main.ln.Addr().(*net.TCPAddr).AddrPort() }

// Listener is the outbound's own listener, for a hand-over: the caller
// sends a duplicate (File) and leaves this one to Release.
func (o *Outbound) Listener() *net.TCPListener { return o.main.ln }

// Serve accepts on the outbound's own listener until it is closed.
func (o *Outbound) Serve(ctx context.Context) error {
	return o.serve(ctx, o.main)
}

// AddListener serves ln too (the outbound listener of another network
// namespace), reaching destinations with dialer, until the returned function
// closes it; connections already accepted go on.
func (o *Outbound) AddListener(ctx context.Context, ln *net.TCPListener, dialer Dialer) (stop func()) {
	l := &listener{ln: ln, dialer: dialer, served: make(chan struct{})}
	o.mu.Lock()
	if o.released {
		// Handed over already: the successor serves this namespace.
		o.mu.Unlock()
		ln.Close()
		return func() {}
	}
	o.lns[l] = struct{}{}
	o.mu.Unlock()
	go o.serve(ctx, l)
	return func() {
		o.mu.Lock()
		delete(o.lns, l)
		o.mu.Unlock()
		ln.Close()
	}
}

func (o *Outbound) serve(ctx context.Context, l *listener) error {
	defer close(l.served)
	if !o.o.Gate.Wait() {
		return nil
	}
	for {
		c, err := l.ln.AcceptTCP()
		if err != nil {
			// Closed, or Shutdown's accept deadline: the queue is drained.
			if errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrDeadlineExceeded) {
				return nil
			}
			// EMFILE and friends: back off instead of spinning.
			o.warn.Error().Err(err).Msg("accepting")
			time.Sleep(50 * time.Millisecond)
			continue
		}
		if o.slots != nil {
			select {
			case o.slots <- struct{}{}:
			default:
				o.refuse(c, "max_connections")
				continue
			}
		}
		r := o.track(c)
		o.wg.Add(1)
		done := func() {
			o.untrack(c)
			if o.slots != nil {
				<-o.slots
			}
			o.wg.Done()
		}
		go func() {
			if !o.handle(ctx, c, r, l.dialer, done) {
				done()
			}
		}()
	}
}

// refuse resets c: the app sees a reset, as it would without the mesh.
func (o *Outbound) refuse(c *net.TCPConn, reason string) {
	o.refuseWhy(c, reason, o.warn.Warn())
}

// refuseWhy is refuse, logging ev (filled with more fields by the caller).
func (o *Outbound) refuseWhy(c *net.TCPConn, reason string, ev *zerolog.Event) {
	ev.Str("src", c.RemoteAddr().String()).Str("reason", reason).Msg("captured connection reset")
	if o.o.Observer != nil {
		o.o.Observer.Refused(reason)
	}
	c.SetLinger(0)
	c.Close()
}

func (o *Outbound) track(c *net.TCPConn) *relayed {
	r := &relayed{src: c.RemoteAddr().String(), start: time.Now()}
	o.mu.Lock()
	o.conns[c] = r
	o.mu.Unlock()
	return r
}

func (o *Outbound) untrack(c *net.TCPConn) {
	o.mu.Lock()
	delete(o.conns, c)
	o.mu.Unlock()
}

// withSource puts the identity of the workload c comes from into ctx, for
// the dialer (the tunnel client asserts it). A connection without one (made
// before this smeshd's programs ran: a predecessor's in-flight connection;
// from a cgroup no workload names; a number no longer known) carries none:
// it speaks as the node, which is no error.
func (o *Outbound) withSource(ctx context.Context, c *net.TCPConn, r *relayed) context.Context {
	if o.o.Source == nil {
		return ctx
	}
	n, err := o.o.OriginalSource(c)
	if err != nil {
		o.log.Debug().Err(err).Str("dst", r.dst).Msg("no source identity")
		return ctx
	}
	if n == 0 {
		return ctx
	}
	id, ok := o.o.Source(n)
	if !ok {
		return ctx
	}
	r.source.Store(id.String())
	return identity.WithSource(ctx, id)
}

// handle dials c's destination and relays c to it. It reports whether done
// is the relay's to call (once the connection ended); false: c was refused
// and is done.
func (o *Outbound) handle(ctx context.Context, c *net.TCPConn, r *relayed, dialer Dialer, done func()) bool {
	dst, err := o.o.OriginalDst(c)
	if err != nil {
		// Not a captured connection (someone dialled the port directly):
		// there is nowhere to send it. smesh alone answers smeshd's
		// SO_ORIGINAL_DST, so conntrack's answer for such a connection
		// (this very listener) never comes back here.
		o.refuseWhy(c, "no_original_destination", o.warn.Warn().AnErr("why", err))
		return false
	}
	r.dst = dst.String()
	if o.ownListener(dst) {
		o.refuseWhy(c, "own_listener", o.warn.Warn().Str("dst", r.dst).
			Str("why", "the original destination is one of smeshd's own listeners: smeshd would be dialling itself"))
		return false
	}
	ctx = o.withSource(ctx, c, r)
	var early int64 // bytes handed to the dialer
	var up net.Conn
	if ed, ok := dialer.(EarlyDialer); ok {
		// The relay buffer goes back before dialling: a dial may wait
		// (for a place among the handshakes under way to a busy peer,
		// then for its own) and a burst of new connections would
		// otherwise hold a buffer each meanwhile. The first bytes are
		// kept in a copy of their own size.
		bp := getBuffer()
		first := readReady(c, *bp)
		if len(first) > 0 {
			first = append([]byte(nil), first...)
		}
		putBuffer(bp)
		up, err = ed.DialEarly(ctx, "tcp", dst.String(), first)
		early = int64(len(first))
	} else {
		up, err = dialer.DialContext(ctx, "tcp", dst.String())
	}
	if err != nil {
		// The dialer counts and logs tunnel failures itself.
		o.log.Debug().Err(err).Str("dst", dst.String()).Msg("upstream unreachable")
		c.SetLinger(0)
		c.Close()
		return false
	}
	path := PathTunnelOut
	var upc Conn
	switch u := up.(type) {
	case *net.TCPConn:
		upc, path = TCP(u), PathCopy
	case Conn:
		upc = u
	default:
		o.log.Error().Str("type", fmt.Sprintf("%T", up)).Msg("dialer returned a connection the relay cannot use")
		up.Close()
		c.SetLinger(0)
		c.Close()
		return false
	}
	r.path.Store(path)
	if o.o.Observer != nil {
		o.o.Observer.ConnOpened(path)
	}
	r.tx.Add(early)
	finish := func(res Result) {
		res.AtoB += early
		if o.o.Observer != nil {
			o.o.Observer.ConnClosed(path, res.AtoB, res.BtoA)
			if errors.Is(res.Err, ErrIdle) {
				o.o.Observer.Refused("idle_timeout")
			}
		}
		o.log.Debug().Str("src", r.src).Str("dst", r.dst).Str("path", path).
			Int64("tx", res.AtoB).Int64("rx", res.BtoA).AnErr("err", res.Err).Msg("connection done")
	}
	// o.park may be nil: the relay then never parks.
	o.park.Relay(TCP(c), upc, RelayOptions{Idle: o.o.IdleTimeout, CountA: &r.tx, CountB: &r.rx,
		Done: func(res Result) { finish(res); done() }})
	return true
}

// ListenLocal opens a listener for hops within a node (an app's captured
// connection to smeshd): its connections have no TCP keepalive, which
// means nothing on a hop whose both ends are on this node and would cost
// four setsockopt(2) per connection.
func ListenLocal(network string, addr netip.AddrPort) (*net.TCPListener, error) {
	lc := net.ListenConfig{KeepAlive: -1}
	ln, err := lc.Listen(context.Background(), network, addr.String())
	if err != nil {
		return nil, err
	}
	return ln.(*net.TCPListener), nil
}

// LocalDialer dials hops within a node (smeshd to a local destination): no
// TCP keepalive, see ListenLocal.
func LocalDialer() *net.Dialer { return &net.Dialer{KeepAlive: -1} }

// readReady reads what c has already received into buf, without waiting:
// nothing when it has nothing (or only its end, which the relay reads
// again: an end of stream stays).
func readReady(c *net.TCPConn, buf []byte) []byte {
	sc, err := c.SyscallConn()
	if err != nil {
		return nil
	}
	n := 0
	sc.Read(func(fd uintptr) bool {
		for {
			m, err := unix.Read(int(fd), buf)
			if err == unix.EINTR {
				continue
			}
			if m > 0 {
				n = m
			}
			return true
		}
	})
	return buf[:n]
}

// ownListener reports whether dst is one of smeshd's own listeners: one of
// OwnPorts on an address of this node.
func (o *Outbound) ownListener(dst netip.AddrPort) bool {
	if !slices.Contains(o.o.OwnPorts, dst.Port()) {
		return false
	}
	a := dst.Addr().Unmap()
	return a.IsLoopback() || a.IsUnspecified() || o.o.Local != nil && o.o.Local(a)
}

// Connections lists the connections being relayed.
func (o *Outbound) Connections() []ConnInfo {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make([]ConnInfo, 0, len(o.conns))
	for _, r := range o.conns {
		path, _ := r.path.Load().(string)
		id, _ := r.source.Load().(string)
		out = append(out, ConnInfo{Source: r.src, SourceIdentity: id, OriginalDst: r.dst, Path: path,
			TxBytes: r.tx.Load(), RxBytes: r.rx.Load(), Age: time.Since(r.start)})
	}
	return out
}

// StopAccepting ends every accept loop without accepting what the kernel
// has queued, and returns once none runs: the listeners stay open, so
// connections keep completing their handshake into the queues, for whoever
// holds the listeners next (a successor they were handed to). Release then
// closes this process's copies.
func (o *Outbound) StopAccepting() {
	o.mu.Lock()
	o.released = true
	lns := []*listener{o.main}
	for l := range o.lns {
		lns = append(lns, l)
	}
	o.mu.Unlock()
	// A deadline in the past wakes a waiting Accept at once; serve
	// returns on it without another accept.
	for _, l := range lns {
		l.ln.SetDeadline(time.Unix(1, 0))
	}
	grace := time.After(2 * acceptGrace) // for loops that never ran
	for _, l := range lns {
		select {
		case <-l.served:
		case <-grace:
		}
	}
}

// Release hands the listeners over: it stops accepting (StopAccepting),
// leaves what is queued to the successor, and closes this process's
// listeners. The connections being relayed go on; Shutdown then waits for
// them.
func (o *Outbound) Release() error {
	o.StopAccepting()
	o.mu.Lock()
	lns := []*listener{o.main}
	for l := range o.lns {
		lns = append(lns, l)
	}
	o.mu.Unlock()
	var err error
	for _, l := range lns {
		if cerr := l.ln.Close(); l == o.main && !errors.Is(cerr, net.ErrClosed) {
			err = cerr
		}
	}
	return err
}

// Shutdown stops accepting, waits for the relayed connections to end until
// ctx is done, then resets those still open.
func (o *Outbound) Shutdown(ctx context.Context) error {
	// Take what is already queued (capture is detached by then, so no new
	// connections arrive in open mode), then close.
	o.mu.Lock()
	lns := []*listener{o.main}
	for l := range o.lns {
		lns = append(lns, l)
	}
	o.mu.Unlock()
	for _, l := range lns {
		l.ln.SetDeadline(time.Now().Add(acceptGrace))
	}
	grace := time.After(2 * acceptGrace) // for loops that never ran
	var err error
	for _, l := range lns {
		select {
		case <-l.served:
		case <-grace:
		case <-ctx.Done():
		}
		if cerr := l.ln.Close(); l == o.main {
			err = cerr
		}
	}
	done := make(chan struct{})
	go func() { o.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		// Parked directions wait again as Relay's do, so that closing
		// their connections below ends them.
		o.park.Close()
		o.mu.Lock()
		n := len(o.conns)
		for c := range o.conns {
			c.SetLinger(0)
			c.Close()
		}
		o.mu.Unlock()
		if n > 0 {
			o.log.Warn().Int("connections", n).Msg("drain timeout: reset the connections still open")
		}
		<-done
	}
	o.park.Close()
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// Parked is how many directions of relayed connections wait without a
// goroutine (Parker).
func (o *Outbound) Parked() int { return o.park.Parked() }

// Close resets every relayed connection at once.
func (o *Outbound) Close() error {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return o.Shutdown(ctx)
}
