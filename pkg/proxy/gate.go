package proxy

import "sync"

// Gate holds accept loops back until it opens. A smeshd taking over from a
// running one (pkg/daemon's hand-over) takes the listeners it shares with
// its predecessor at start but accepts on them only once the predecessor
// released them: until then the predecessor serves, and should the start
// fail (Cancel), not one connection was accepted by the process that gives
// up, so none is cut by its exit.
type Gate struct {
	ch     chan struct{}
	once   sync.Once
	mu     sync.Mutex
	opened bool
}

// NewGate returns a closed Gate, or an open one.
func NewGate(open bool) *Gate {
	g := &Gate{ch: make(chan struct{})}
	if open {
		g.Open()
	}
	return g
}

// Open lets the loops accept. Open and Cancel do nothing on a nil Gate, or
// after the first of them.
func (g *Gate) Open() { g.end(true) }

// Cancel ends the wait of every loop without letting it accept.
func (g *Gate) Cancel() { g.end(false) }

func (g *Gate) end(open bool) {
	if g == nil {
		return
	}
	g.once.Do(func() {
		g.mu.Lock()
		g.opened = open
		g.mu.Unlock()
		close(g.ch)
	})
}

// Wait waits until the gate opens (true) or is cancelled (false). A nil
// Gate is open.
func (g *Gate) Wait() bool {
	if g == nil {
		return true
	}
	<-g.ch
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.opened
}
