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
	"sync"
	"time"

	"github.com/rs/zerolog"
)

// Dialer reaches a captured connection's original destination.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// Outbound accepts captured connections and relays each to its original
// destination.
type Outbound struct {
	ln     *net.TCPListener
	dialer Dialer
	log    zerolog.Logger
	wg     sync.WaitGroup

	mu    sync.Mutex
	conns map[*net.TCPConn]struct{}
}

// DialTimeout bounds how long a captured connection waits for its upstream.
const DialTimeout = 10 * time.Second

// Listen opens the outbound listener. dialer nil means dial destinations
// directly.
func Listen(addr netip.AddrPort, dialer Dialer, log zerolog.Logger) (*Outbound, error) {
	ln, err := net.ListenTCP("tcp4", net.TCPAddrFromAddrPort(addr))
	if err != nil {
		return nil, fmt.Errorf("listening on %s (outbound.listen): %w", addr, err)
	}
	if dialer == nil {
		dialer = &net.Dialer{Timeout: DialTimeout}
	}
	return &Outbound{
		ln:     ln,
		dialer: dialer,
		log:    log.With().Str("component", "outbound").Logger(),
		conns:  make(map[*net.TCPConn]struct{}),
	}, nil
}

// Addr is the address the listener is bound to.
func (o *Outbound) Addr() netip.AddrPort { return o.ln.Addr().(*net.TCPAddr).AddrPort() }

// Serve accepts until the listener is closed.
func (o *Outbound) Serve(ctx context.Context) error {
	for {
		c, err := o.ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			// EMFILE and friends: back off instead of spinning.
			o.log.Error().Err(err).Msg("accepting")
			time.Sleep(50 * time.Millisecond)
			continue
		}
		o.track(c, true)
		o.wg.Add(1)
		go func() {
			defer o.wg.Done()
			defer o.track(c, false)
			o.handle(ctx, c)
		}()
	}
}

func (o *Outbound) track(c *net.TCPConn, add bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if add {
		o.conns[c] = struct{}{}
	} else {
		delete(o.conns, c)
	}
}

func (o *Outbound) handle(ctx context.Context, c *net.TCPConn) {
	dst, err := OriginalDst(c)
	if err != nil {
		// Not a captured connection (someone dialled the port directly):
		// there is nowhere to send it.
		o.log.Warn().Err(err).Str("src", c.RemoteAddr().String()).Msg("refusing connection without an original destination")
		c.SetLinger(0)
		c.Close()
		return
	}
	up, err := o.dialer.DialContext(ctx, "tcp4", dst.String())
	if err != nil {
		o.log.Debug().Err(err).Str("dst", dst.String()).Msg("upstream unreachable")
		c.SetLinger(0) // the app sees a reset, as it would without the mesh
		c.Close()
		return
	}
	var upc Conn
	switch u := up.(type) {
	case Conn:
		upc = u
	case *net.TCPConn:
		upc = TCP(u)
	default:
		o.log.Error().Str("type", fmt.Sprintf("%T", up)).Msg("dialer returned a connection the relay cannot use")
		up.Close()
		c.SetLinger(0)
		c.Close()
		return
	}
	res := Relay(TCP(c), upc)
	o.log.Debug().Str("src", c.RemoteAddr().String()).Str("dst", dst.String()).
		Int64("tx", res.AtoB).Int64("rx", res.BtoA).AnErr("err", res.Err).Msg("connection done")
}

// Close stops accepting and resets every relayed connection.
func (o *Outbound) Close() error {
	err := o.ln.Close()
	o.mu.Lock()
	for c := range o.conns {
		c.SetLinger(0)
		c.Close()
	}
	o.mu.Unlock()
	o.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}
