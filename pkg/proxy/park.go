package proxy

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Parking: a relayed connection that moved nothing for a while waits for its
// next byte without a goroutine.
//
// Relay keeps a goroutine per direction, parked in the runtime's netpoller
// while its end has nothing: a stack each (4-8 KiB once crypto/tls grew it)
// that the collector also counts into the heap's headroom. For thousands of
// idle keep-alive connections that is most of what the relay costs (issue
// 26). A Parker's relays give their goroutines up once both directions have
// been idle for a while: the sweeper asks (a read deadline in the past wakes
// a waiting read), each direction registers its end with the Parker's own
// epoll instance (EPOLLONESHOT) and its goroutine ends, and the epoll loop
// starts a goroutine for a direction again when its end has bytes, its end
// or an error. A busy connection never meets any of it: the sweeper looks
// at idle ones only, and nothing is added per read but the activity time.

// DefaultParkAfter is how long both directions of a relayed connection stay
// idle before they park. Short, so that a burst of connections that go idle
// at once (a client pool opening its keep-alive connections) parks while it
// opens, before its goroutines' stacks add up; a park and the wake-up after
// it cost some microseconds, once per quarter second of idleness at most.
const DefaultParkAfter = 250 * time.Millisecond

// errPark is a read interrupted to park.
var errPark = errors.New("relay direction parks")

// Parker runs relays whose idle connections hold no goroutine. Its methods
// are safe for concurrent use.
type Parker struct {
	after time.Duration
	epfd  int
	evfd  int // an eventfd, token 0: wakes the epoll loop to end it

	mu      sync.Mutex
	relays  map[*relay]struct{}
	tokens  map[int32]*half // parked or registered directions, by epoll token
	next    int32
	closing bool
	closed  atomic.Bool // the epoll instance is closed

	stop chan struct{}
	wg   sync.WaitGroup
}

// NewParker starts a Parker whose relays park after after (0: DefaultParkAfter).
func NewParker(after time.Duration) (*Parker, error) {
	if after <= 0 {
		after = DefaultParkAfter
	}
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("creating the relay's epoll instance: %w", err)
	}
	evfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("creating the relay's eventfd: %w", err)
	}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, evfd, &unix.EpollEvent{Events: unix.EPOLLIN}); err != nil {
		unix.Close(epfd)
		unix.Close(evfd)
		return nil, fmt.Errorf("registering the relay's eventfd: %w", err)
	}
	p := &Parker{after: after, epfd: epfd, evfd: evfd,
		relays: map[*relay]struct{}{}, tokens: map[int32]*half{}, stop: make(chan struct{})}
	p.wg.Add(2)
	go p.loop()
	go p.sweep()
	return p, nil
}

// Parked is how many relay directions wait without a goroutine. A nil
// Parker parks nothing: Relay, Parked and Close all take one.
func (p *Parker) Parked() int {
	if p == nil {
		return 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, h := range p.tokens {
		if h.parked.Load() {
			n++
		}
	}
	return n
}

// Close starts a goroutine again for every parked direction (they then wait
// as Relay's do, so that closing their ends ends them), parks nothing more
// and stops the Parker. Relays go on until their connections end.
func (p *Parker) Close() error {
	if p == nil {
		return nil
	}
	p.mu.Lock()
	if p.closing {
		p.mu.Unlock()
		return nil
	}
	p.closing = true
	parked := make([]*half, 0, len(p.tokens))
	for _, h := range p.tokens {
		parked = append(parked, h)
	}
	p.mu.Unlock()
	for _, h := range parked {
		h.wake()
	}
	close(p.stop)
	var one [8]byte
	one[0] = 1
	unix.Write(p.evfd, one[:])
	p.wg.Wait()
	p.closed.Store(true)
	unix.Close(p.evfd)
	return unix.Close(p.epfd)
}

// loop starts the directions whose ends became readable.
func (p *Parker) loop() {
	defer p.wg.Done()
	events := make([]unix.EpollEvent, 64)
	for {
		n, err := unix.EpollWait(p.epfd, events, -1)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return
		}
		for _, ev := range events[:n] {
			if ev.Fd == 0 {
				return // Close
			}
			p.mu.Lock()
			h := p.tokens[ev.Fd]
			p.mu.Unlock()
			if h != nil {
				h.wake()
			}
		}
	}
}

// sweep asks the relays idle for after to park, every after/2.
func (p *Parker) sweep() {
	defer p.wg.Done()
	t := time.NewTicker(p.after / 2)
	defer t.Stop()
	var idle []*relay
	for {
		select {
		case <-p.stop:
			return
		case <-t.C:
		}
		since := time.Now().Add(-p.after).UnixNano()
		idle = idle[:0]
		p.mu.Lock()
		for r := range p.relays {
			if r.act.last.Load() <= since {
				idle = append(idle, r)
			}
		}
		p.mu.Unlock()
		for _, r := range idle {
			r.requestPark()
		}
		clear(idle)
	}
}

// token is a free epoll token (under mu): never 0, which is Close's.
func (p *Parker) token() int32 {
	for {
		p.next++
		if p.next <= 0 {
			p.next = 1
		}
		if _, used := p.tokens[p.next]; !used {
			return p.next
		}
	}
}

// RelayOptions are a parked relay's.
type RelayOptions struct {
	// Idle resets both ends when neither moved a byte for this long
	// (Result.Err is ErrIdle); 0 is no timeout.
	Idle time.Duration
	// CountA and CountB, if set, count what is read from a and from b.
	CountA, CountB *atomic.Int64
	// Done is called once both directions ended and both ends are closed.
	Done func(Result)
}

// Relay relays a and b for a caller that does not wait for the end (see
// proxy.Relay for what it does with ends of stream and errors): it relays
// in the caller's goroutine until the b to a direction ends or parks, then
// returns; o.Done gets the result once both directions ended and both ends
// are closed. p may be nil: the connection then never parks, nor does one
// whose ends cannot (no socket to watch, or one that is not ready to: a
// tunnel connection before its status).
func (p *Parker) Relay(a, b Conn, o RelayOptions) {
	r := &relay{p: p, a: a, b: b, done: o.Done, live: 2}
	r.act.timeout = o.Idle
	r.act.touch()
	r.halves[0].init(r, b, a, o.CountA)
	r.halves[1].init(r, a, b, o.CountB)
	if p != nil && r.halves[0].canPark() && r.halves[1].canPark() {
		p.mu.Lock()
		if !p.closing {
			p.relays[r] = struct{}{}
		}
		p.mu.Unlock()
	}
	go r.halves[0].run()
	r.halves[1].run()
}

// relayWait is Parker.Relay without a Parker for a caller that waits for
// the result.
func relayWait(a, b Conn, o RelayOptions) Result {
	res := make(chan Result, 1)
	o.Done = func(r Result) { res <- r }
	(*Parker)(nil).Relay(a, b, o)
	return <-res
}

// relay is one relayed connection (of a Parker, if p is set).
type relay struct {
	p      *Parker
	a, b   Conn
	halves [2]half // a to b, b to a
	act    activity
	// parkReq: the sweeper asked both directions to park; a resumed one
	// withdraws it.
	parkReq atomic.Bool
	done    func(Result)

	mu     sync.Mutex // the halves' states, live, failed, res
	live   int        // directions not ended
	failed bool
	res    Result
}

// half is one direction of a relay.
type half struct {
	r        *relay
	dst, src Conn
	w        *watched
	dl       deadliner       // src's; nil: cannot park
	rc       syscall.RawConn // src's socket; nil: cannot park
	n        int64           // bytes written to dst

	// Under r.mu:
	state      halfState
	tok        int32 // epoll token, 0 when none
	registered bool  // src's socket is in the Parker's epoll set
	// parked mirrors state == halfParked for Parker.Parked.
	parked atomic.Bool
}

type halfState uint8

const (
	halfRunning halfState = iota
	halfParked
	halfEnded
)

// syscallConner is a relay end with a socket the Parker can watch.
type syscallConner interface {
	SyscallConn() (syscall.RawConn, error)
}

// ParkReady is a relay end that is not always ready to park (a tunnel
// connection waiting for its status watches its own deadline).
type ParkReady interface {
	ParkReady() bool
}

func (h *half) init(r *relay, dst, src Conn, count *atomic.Int64) {
	if count == nil {
		count = new(atomic.Int64)
	}
	h.r, h.dst, h.src = r, dst, src
	h.w = watch(src, count, &r.act)
	if r.p != nil {
		h.w.park = &r.parkReq
	}
	h.dl, _ = src.(deadliner)
	if sc, ok := src.(syscallConner); ok {
		h.rc, _ = sc.SyscallConn()
	}
}

func (h *half) canPark() bool { return h.dl != nil && h.rc != nil }

// run relays src to dst until src ends or this direction parks.
func (h *half) run() {
	r := h.r
	for {
		bp, nr, rerr := h.w.ReadPooled()
		if nr > 0 {
			nw, werr := h.dst.Write((*bp)[:nr])
			h.n += int64(nw)
			if werr != nil {
				putBuffer(bp)
				r.fail(werr)
				h.end()
				return
			}
		}
		if bp != nil {
			putBuffer(bp)
		}
		switch {
		case rerr == nil:
		case errors.Is(rerr, errPark):
			if h.park() {
				return
			}
		case errors.Is(rerr, io.EOF):
			if err := h.dst.CloseWrite(); err != nil {
				r.fail(err)
			}
			h.end()
			return
		default:
			r.fail(rerr)
			h.end()
			return
		}
	}
}

// park registers src with the Parker's epoll set and reports whether the
// direction parked (its goroutine then ends); false: it reads again.
func (h *half) park() bool {
	r := h.r
	// Whether it parks or not, the next read must not meet the sweeper's
	// deadline, and re-arms the idle timeout's.
	h.dl.SetReadDeadline(time.Time{})
	h.w.armed = time.Time{}
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.parkReq.Load() || r.failed {
		return false
	}
	p := r.p
	p.mu.Lock()
	closing := p.closing
	if !closing && h.tok == 0 {
		h.tok = p.token()
		p.tokens[h.tok] = h
	}
	p.mu.Unlock()
	if closing {
		return false
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: h.tok}
	op := unix.EPOLL_CTL_MOD
	if !h.registered {
		op = unix.EPOLL_CTL_ADD
	}
	var cerr error
	if err := h.rc.Control(func(fd uintptr) { cerr = unix.EpollCtl(p.epfd, op, int(fd), &ev) }); err != nil || cerr != nil {
		return false // closed meanwhile: the next read says so
	}
	h.registered = true
	h.state = halfParked
	h.parked.Store(true)
	return true
}

// wake starts a parked direction again: its end became readable, or the
// Parker closes, or the relay fails.
func (h *half) wake() {
	r := h.r
	r.mu.Lock()
	if h.state != halfParked {
		r.mu.Unlock()
		return
	}
	h.state = halfRunning
	h.parked.Store(false)
	r.parkReq.Store(false)
	r.mu.Unlock()
	r.act.touch()
	go h.run()
}

// unregister takes src out of the epoll set, before it is closed (under
// r.mu).
func (h *half) unregister() {
	p := h.r.p
	if h.registered && !p.closed.Load() {
		h.rc.Control(func(fd uintptr) { unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, int(fd), nil) })
		h.registered = false
	}
	if h.tok != 0 {
		p.mu.Lock()
		delete(p.tokens, h.tok)
		p.mu.Unlock()
		h.tok = 0
	}
	h.parked.Store(false)
}

// end ends this direction; the last one to end finishes the relay.
func (h *half) end() {
	r := h.r
	r.mu.Lock()
	h.unregister()
	h.state = halfEnded
	r.live--
	last := r.live == 0
	r.mu.Unlock()
	if last {
		r.finish()
	}
}

// requestPark is the sweeper's: both directions idle for the Parker's
// time. A relay with no direction running (parked, or one of them ended)
// whose idle timeout passed is reset here, since no read waits to see it.
func (r *relay) requestPark() {
	r.mu.Lock()
	if r.failed || r.live == 0 {
		r.mu.Unlock()
		return
	}
	running, parked := 0, 0
	for i := range r.halves {
		switch r.halves[i].state {
		case halfRunning:
			running++
		case halfParked:
			parked++
		}
	}
	if r.act.timeout > 0 && running == 0 && parked > 0 && r.act.idleFor() >= r.act.timeout {
		r.mu.Unlock()
		go r.fail(ErrIdle) // its Done may take long: not in the sweeper
		return
	}
	for i := range r.halves {
		h := &r.halves[i]
		if h.state != halfRunning {
			continue
		}
		if pr, ok := h.src.(ParkReady); ok && !pr.ParkReady() {
			r.mu.Unlock()
			return
		}
	}
	r.parkReq.Store(true)
	// Asked again at every sweep while a direction still runs: a wait
	// that set a deadline of its own meanwhile may have replaced this one.
	for i := range r.halves {
		if h := &r.halves[i]; h.state == halfRunning {
			h.dl.SetReadDeadline(time.Unix(1, 0))
		}
	}
	r.mu.Unlock()
}

// fail ends the relay with err: parked directions end at once, both ends
// are reset, and running directions end on their next read or write.
func (r *relay) fail(err error) {
	r.mu.Lock()
	if r.failed {
		r.mu.Unlock()
		return
	}
	r.failed = true
	r.res.Err = err
	for i := range r.halves {
		if h := &r.halves[i]; h.state == halfParked {
			h.unregister()
			h.state = halfEnded
			r.live--
		}
	}
	last := r.live == 0
	r.mu.Unlock()
	r.a.Abort()
	r.b.Abort()
	if last {
		r.finish()
	}
}

// finish closes both ends and reports the result.
func (r *relay) finish() {
	r.a.Close()
	r.b.Close()
	if p := r.p; p != nil {
		p.mu.Lock()
		delete(p.relays, r)
		p.mu.Unlock()
	}
	r.res.AtoB, r.res.BtoA = r.halves[0].n, r.halves[1].n
	if r.done != nil {
		r.done(r.res)
	}
}

// SyscallConn is the socket's, for a Parker to watch.
func (t *tcpConn) SyscallConn() (syscall.RawConn, error) { return t.rc, t.rcErr }
