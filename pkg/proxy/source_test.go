package proxy

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/smesh-dev/smesh/pkg/identity"
)

// ctxDialer notes the source identity in the context of each dial.
type ctxDialer struct {
	sources chan string
}

func (d *ctxDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	id, ok := identity.SourceFrom(ctx)
	if ok {
		d.sources <- id.String()
	} else {
		d.sources <- "none"
	}
	return nil, errors.New("ctxDialer dials nothing")
}

// TestSourceInDialContext: the dialer's context carries the identity the
// connection's source number names; a number that names none, the number 0
// (no source recorded: a predecessor's connection), and a failed lookup
// carry none, and the connection is still dialled.
func TestSourceInDialContext(t *testing.T) {
	known := spiffeid.RequireFromString("spiffe://smesh.local/ns/prod/sa/payments")
	cases := []struct {
		n    uint32
		err  error
		want string
	}{
		{7, nil, known.String()},
		{8, nil, "none"},
		{0, nil, "none"},
		{7, errors.New("getsockopt: broken"), "none"},
	}
	for _, tc := range cases {
		d := &ctxDialer{sources: make(chan string, 1)}
		out, err := Listen(Options{
			Listen:         netip.MustParseAddrPort("127.0.0.1:0"),
			Dialer:         d,
			OriginalDst:    func(*net.TCPConn) (netip.AddrPort, error) { return netip.MustParseAddrPort("198.18.0.1:80"), nil },
			OriginalSource: func(*net.TCPConn) (uint32, error) { return tc.n, tc.err },
			Source: func(n uint32) (spiffeid.ID, bool) {
				return known, n == 7
			},
			Logger: zerolog.Nop(),
		})
		if err != nil {
			t.Fatal(err)
		}
		go out.Serve(context.Background())
		// The dial fails, so the connection is reset, maybe before
		// connect(2) returns.
		c, err := net.Dial("tcp4", out.Addr().String())
		if err == nil {
			defer c.Close()
		}
		select {
		case got := <-d.sources:
			if got != tc.want {
				t.Errorf("source %d (%v): the dialer got %s, want %s", tc.n, tc.err, got, tc.want)
			}
		case <-time.After(5 * time.Second):
			t.Errorf("source %d: not dialled", tc.n)
		}
		out.Close()
	}
}
