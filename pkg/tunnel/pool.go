package tunnel

import (
	"net/netip"
	"slices"
	"sync"
	"time"
)

// pool keeps the idle v2 links of a Client, by the peer listener they are
// connected to (a node's tunnel port, or a pod's: a listener delivers only
// to the addresses of its own network namespace, so a link serves the
// destinations of one address). A tunnelled connection takes a link, the
// most recently used first, and gives it back when it ended cleanly; a
// link is reused only while the credentials and identity policy it was
// checked with still hold (see usable).
type pool struct {
	maxIdle int
	idleFor time.Duration
	creds   *Credentials

	mu     sync.Mutex
	idle   map[netip.AddrPort][]*link // most recently used last
	closed bool
	timer  *time.Timer // prunes idle links; nil while none are
}

// Pool sizes: per peer listener, at most poolMaxIdle idle links, each kept
// for at most poolIdle unused. A server keeps an idle link for longer
// (serverPoolIdle), so that it is the client that normally ends one.
const (
	poolMaxIdle    = 64
	poolIdle       = 30 * time.Second
	serverPoolIdle = 90 * time.Second
)

func newPool(creds *Credentials, maxIdle int, idleFor time.Duration) *pool {
	return &pool{maxIdle: maxIdle, idleFor: idleFor, creds: creds, idle: make(map[netip.AddrPort][]*link)}
}

// take returns an idle link to peer usable for dst, or nil.
func (p *pool) take(peer, dst netip.AddrPort) *link {
	now := time.Now()
	for {
		p.mu.Lock()
		list := p.idle[peer]
		if len(list) == 0 {
			p.mu.Unlock()
			return nil
		}
		l := list[len(list)-1]
		list[len(list)-1] = nil
		p.idle[peer] = list[:len(list)-1]
		if len(list) == 1 {
			delete(p.idle, peer)
		}
		p.mu.Unlock()
		if now.Sub(l.idleSince) < p.idleFor && p.usable(l, dst, now) && l.alive() {
			return l
		}
		l.Close()
	}
}

// usable checks a pooled link against the credentials and policy in force
// now: a link made with this node's previous certificate or CA is not
// reused (current() also notices changed files), nor one whose peer's
// certificate the policy no longer accepts for dst (allow_identities,
// trust_domain, [[tunnel.tls.peers]] pins) or that expired.
func (p *pool) usable(l *link, dst netip.AddrPort, now time.Time) bool {
	if p.creds == nil {
		return true
	}
	if p.creds.current() != l.set || l.leaf == nil || now.After(l.leaf.NotAfter) {
		return false
	}
	if pol := p.creds.policy.Load(); pol != l.policy {
		if pol.checkServer(l.leaf, dst.Addr()) != nil {
			return false
		}
		l.policy = pol
	}
	return true
}

// put gives back the link of a tunnelled connection that ended cleanly.
func (p *pool) put(l *link) {
	l.raw.SetReadDeadline(time.Time{})
	l.idleSince = time.Now()
	p.mu.Lock()
	if p.closed || len(p.idle[l.peer]) >= p.maxIdle {
		p.mu.Unlock()
		l.Close()
		return
	}
	p.idle[l.peer] = append(p.idle[l.peer], l)
	if p.timer == nil {
		p.timer = time.AfterFunc(p.idleFor, p.prune)
	}
	p.mu.Unlock()
}

// prune closes the links idle for too long.
func (p *pool) prune() {
	now := time.Now()
	var old []*link
	p.mu.Lock()
	for peer, list := range p.idle {
		// Oldest first: the links at the front have idled longest.
		i := 0
		for i < len(list) && now.Sub(list[i].idleSince) >= p.idleFor {
			i++
		}
		old = append(old, list[:i]...)
		if i == len(list) {
			delete(p.idle, peer)
		} else {
			p.idle[peer] = slices.Clone(list[i:])
		}
	}
	p.timer = nil
	if len(p.idle) > 0 && !p.closed {
		p.timer = time.AfterFunc(p.idleFor/2, p.prune)
	}
	p.mu.Unlock()
	for _, l := range old {
		l.Close()
	}
}

// drop closes the idle links to peer.
func (p *pool) drop(peer netip.AddrPort) {
	p.mu.Lock()
	list := p.idle[peer]
	delete(p.idle, peer)
	p.mu.Unlock()
	for _, l := range list {
		l.Close()
	}
}

// idleCount is how many idle links to peer the pool holds (for tests).
func (p *pool) idleCount(peer netip.AddrPort) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle[peer])
}

// close closes every idle link; links given back later are closed too.
func (p *pool) close() {
	p.mu.Lock()
	p.closed = true
	all := p.idle
	p.idle = make(map[netip.AddrPort][]*link)
	if p.timer != nil {
		p.timer.Stop()
		p.timer = nil
	}
	p.mu.Unlock()
	for _, list := range all {
		for _, l := range list {
			l.Close()
		}
	}
}
