package tunnel

import (
	"net/netip"
	"sync"
	"time"
)

// handshakeBudget bounds the incoming connections that are not authenticated
// yet (in their TLS handshake or sending their header), in all and per
// source address. It is apart from [tunnel] max_connections, which counts
// authenticated connections only: connections anyone can open without a
// certificate must never take the places of peers.
//
// When a budget is full, a new connection takes the place of a pending one
// that is stale (pending for longer than a real peer's handshake takes, see
// staleAfter), and is reset at once when there is none. Per source, the
// oldest of that source's connections is taken; over the total, the oldest
// of the busiest source that has a stale one. So connections that sit idle,
// renewed as they time out, neither fill the server nor keep a peer out for
// long: each new connection, a peer's included, pushes a stale one out, and
// a fresh handshake (a peer's) is never pushed out.
type handshakeBudget struct {
	max, perSource int
	stale          time.Duration

	mu       sync.Mutex
	bySource map[netip.Addr][]*pending // oldest first
	total    int
}

// pending is one connection in its handshake.
type pending struct {
	src   netip.Addr
	start time.Time
	// evict resets the connection; called at most once, without the lock.
	evict   func()
	evicted bool // under the budget's mu
}

// staleAfter is how long a handshake may be pending before a new connection
// may take its place: a second (a handshake across a LAN takes a few
// milliseconds, a loaded node's well under a second), or half the
// handshake timeout if that is shorter.
func staleAfter(handshakeTimeout time.Duration) time.Duration {
	return min(time.Second, handshakeTimeout/2)
}

func newHandshakeBudget(max, perSource int, stale time.Duration) *handshakeBudget {
	return &handshakeBudget{max: max, perSource: perSource, stale: stale, bySource: make(map[netip.Addr][]*pending)}
}

// admit registers a new connection from src. ok is false when there is no
// room for it: the caller resets it. A connection it evicted to make room
// has been reset already.
func (b *handshakeBudget) admit(src netip.Addr, now time.Time, evict func()) (p *pending, ok bool) {
	src = src.Unmap()
	b.mu.Lock()
	var victim *pending
	full := false
	switch {
	case len(b.bySource[src]) >= b.perSource:
		full = true
		if oldest := b.bySource[src][0]; now.Sub(oldest.start) >= b.stale {
			victim = oldest
		}
	case b.total >= b.max:
		full = true
		for _, list := range b.bySource {
			oldest := list[0] // a source's oldest is its stalest
			if now.Sub(oldest.start) < b.stale {
				continue
			}
			if victim == nil || len(list) > len(b.bySource[victim.src]) ||
				len(list) == len(b.bySource[victim.src]) && oldest.start.Before(victim.start) {
				victim = oldest
			}
		}
	}
	if full && victim == nil {
		b.mu.Unlock()
		return nil, false
	}
	if victim != nil {
		b.remove(victim)
		victim.evicted = true
	}
	p = &pending{src: src, start: now, evict: evict}
	b.bySource[src] = append(b.bySource[src], p)
	b.total++
	b.mu.Unlock()
	if victim != nil {
		victim.evict()
	}
	return p, true
}

// done ends p's handshake phase; it reports whether p was evicted.
func (b *handshakeBudget) done(p *pending) (evicted bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if p.evicted {
		return true
	}
	b.remove(p)
	return false
}

func (b *handshakeBudget) remove(p *pending) {
	list := b.bySource[p.src]
	for i, q := range list {
		if q == p {
			list = append(list[:i], list[i+1:]...)
			break
		}
	}
	if len(list) == 0 {
		delete(b.bySource, p.src)
	} else {
		b.bySource[p.src] = list
	}
	b.total--
}

// pendingCount returns how many connections are pending, in all and from
// src (for tests).
func (b *handshakeBudget) pendingCount(src netip.Addr) (total, fromSrc int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.total, len(b.bySource[src.Unmap()])
}
