package tunnel

import (
	"context"
	"net/netip"
	"sync"
)

// maxDialsPerPeer bounds how many tunnel connections this node has in
// their handshake to one peer address at a time. A burst of new captured
// connections to one node (a client warming a pool of a thousand
// connections) would otherwise open as many TLS connections at once, and
// the peer resets those beyond its max_handshakes_per_source (512 by
// default) as it would a flood: the burst's connections would fail. Past
// the bound a new connection waits for a handshake to end (then takes a
// warm connection if one came back meanwhile). A handshake takes
// milliseconds, so the bound costs a burst little; it is well below the
// peer's default per-source budget, which also counts the connections of
// the pod listeners of the same node.
const maxDialsPerPeer = 64

// dialSlots counts the handshakes under way per peer address.
type dialSlots struct {
	max   int
	mu    sync.Mutex
	peers map[netip.Addr]chan struct{} // a token per handshake under way
}

func newDialSlots(max int) *dialSlots {
	return &dialSlots{max: max, peers: make(map[netip.Addr]chan struct{})}
}

// acquire waits, until ctx is done, for a place to start a handshake to
// peer, and returns what gives it back.
func (d *dialSlots) acquire(ctx context.Context, peer netip.Addr) (release func(), err error) {
	d.mu.Lock()
	ch, ok := d.peers[peer]
	if !ok {
		ch = make(chan struct{}, d.max)
		d.peers[peer] = ch
	}
	d.mu.Unlock()
	select {
	case ch <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return func() {
		d.mu.Lock()
		<-ch
		// Forget a peer with nothing under way: pod addresses come and go.
		if len(ch) == 0 && d.peers[peer] == ch {
			delete(d.peers, peer)
		}
		d.mu.Unlock()
	}, nil
}

// underWay returns how many handshakes to peer are under way (for tests).
func (d *dialSlots) underWay(peer netip.Addr) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.peers[peer])
}
