package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/identity"
)

// mapVerifier lets each node assert the workloads listed for it (or none),
// at any address; a node with no entry asserts ErrUnverifiable.
type mapVerifier map[spiffeid.ID][]spiffeid.ID

func (m mapVerifier) Verify(node, workload spiffeid.ID, addr netip.Addr) error {
	ws, ok := m[node]
	if !ok {
		return ErrUnverifiable
	}
	if workload.IsZero() {
		return nil
	}
	for _, w := range ws {
		if w == workload {
			return nil
		}
	}
	return fmt.Errorf("%s is not on %s", workload, node)
}

// authLog records what Authorize was asked and denies the ports in deny.
type authLog struct {
	mu   sync.Mutex
	srcs []Source
	deny map[uint16]bool
}

func (a *authLog) authorize(src Source, dst netip.AddrPort) (string, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.srcs = append(a.srcs, src)
	if a.deny[dst.Port()] {
		return "deny-test", false
	}
	return "", true
}

func (a *authLog) last(t *testing.T) Source {
	t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.srcs) == 0 {
		t.Fatal("Authorize was not called")
	}
	return a.srcs[len(a.srcs)-1]
}

func (a *authLog) calls() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.srcs)
}

var (
	nodeA    = spiffeid.RequireFromString("spiffe://test.local/node/a")
	payments = spiffeid.RequireFromString("spiffe://test.local/ns/prod/sa/payments")
	ledger   = spiffeid.RequireFromString("spiffe://test.local/ns/prod/sa/ledger")
	podAddr  = netip.MustParseAddr("198.18.1.7")
)

// sourceHarness is a server of this version that lets node a assert
// payments only, with Authorize recorded.
func sourceHarness(t *testing.T, mod func(*ServerOptions)) (*harness, *authLog) {
	auth := &authLog{deny: map[uint16]bool{}}
	h := newHarness(t, func(o *ServerOptions) {
		o.Verifier = mapVerifier{nodeA: {payments}}
		o.Authorize = auth.authorize
		if mod != nil {
			mod(o)
		}
	})
	return h, auth
}

func withSource(id spiffeid.ID, addr netip.Addr) context.Context {
	ctx := context.Background()
	if !id.IsZero() {
		ctx = identity.WithSource(ctx, id)
	}
	if addr.IsValid() {
		ctx = identity.WithSourceAddr(ctx, addr)
	}
	return ctx
}

// echoFrom opens a connection with ctx's source and echoes through it.
func (h *harness) echoFrom(t *testing.T, c *Client, ctx context.Context) *Conn {
	t.Helper()
	nc, err := c.DialContext(ctx, "tcp", h.dst())
	if err != nil {
		t.Fatal(err)
	}
	conn := nc.(*Conn)
	if _, err := conn.Write([]byte{'E'}); err != nil {
		t.Fatal(err)
	}
	echo(t, conn, 1000)
	return conn
}

// TestSourceV3: a v3 client sends its context's source; the server
// verifies it and hands it to Authorize, on a pooled link too.
func TestSourceV3(t *testing.T) {
	h, auth := sourceHarness(t, nil)
	c := h.client(t, "a")
	conn := h.echoFrom(t, c, withSource(payments, podAddr))
	if v := conn.l.version; v != Version3 {
		t.Fatalf("client and server of this version speak v%d", v)
	}
	want := Source{Node: nodeA, Workload: payments, Addr: podAddr}
	if got := auth.last(t); got != want {
		t.Errorf("Authorize saw %+v, want %+v", got, want)
	}
	// The next connection on the same link, from the node itself.
	conn = h.echoFrom(t, c, context.Background())
	if !conn.Reused {
		t.Error("second connection did not reuse the link")
	}
	want = Source{Node: nodeA, Addr: netip.MustParseAddr("127.0.0.1")}
	if got := auth.last(t); got != want {
		t.Errorf("Authorize saw %+v for a connection without a source, want %+v", got, want)
	}
	// An address alone.
	h.echoFrom(t, c, withSource(spiffeid.ID{}, podAddr))
	if got, want := auth.last(t), (Source{Node: nodeA, Addr: podAddr}); got != want {
		t.Errorf("Authorize saw %+v, want %+v", got, want)
	}
	if n := h.handshakes(); n != 1 {
		t.Errorf("%d handshakes for 3 connections, want 1", n)
	}
}

// TestSourceNotOnNode: a node asserting a workload it may not speak for
// is refused identity_not_on_node; nothing is dialled, Authorize is not
// asked, and the client's next connection works.
func TestSourceNotOnNode(t *testing.T) {
	h, auth := sourceHarness(t, nil)
	c := h.client(t, "a")
	for _, early := range []bool{false, true} {
		ctx := withSource(ledger, podAddr)
		var err error
		if early {
			nc, oerr := c.OpenEarly(ctx, "tcp", h.dst(), []byte("E early"))
			if oerr != nil {
				t.Fatal(oerr)
			}
			_, err = nc.Read(make([]byte, 1))
			nc.Close()
		} else {
			_, err = c.DialContext(ctx, "tcp", h.dst())
		}
		var re *RefusedError
		if !errors.As(err, &re) || re.Reason != ReasonIdentityNotOnNode {
			t.Fatalf("early %v: %v, want identity_not_on_node", early, err)
		}
	}
	h.waitCount(t, ReasonIdentityNotOnNode, 2)
	if n := h.backend.accepted.Load(); n != 0 {
		t.Errorf("the backend accepted %d connections of a refused source", n)
	}
	if n := auth.calls(); n != 0 {
		t.Errorf("Authorize asked %d times for a refused source", n)
	}
	h.echoFrom(t, c, withSource(payments, podAddr))

	// A node the verifier knows nothing about (ErrUnverifiable) speaks as
	// itself: its assertion is dropped, not refused.
	cb := h.client(t, "b")
	h.echoFrom(t, cb, withSource(ledger, podAddr))
	want := Source{Node: spiffeid.RequireFromString("spiffe://test.local/node/b"), Addr: netip.MustParseAddr("127.0.0.1")}
	if got := auth.last(t); got != want {
		t.Errorf("unverifiable source: Authorize saw %+v, want %+v", got, want)
	}
}

// TestSourceWithoutVerifier: a server without a SourceVerifier verifies
// nothing: every connection is its node's.
func TestSourceWithoutVerifier(t *testing.T) {
	h, auth := sourceHarness(t, func(o *ServerOptions) { o.Verifier = nil })
	c := h.client(t, "a")
	h.echoFrom(t, c, withSource(ledger, podAddr))
	if got, want := auth.last(t), (Source{Node: nodeA, Addr: netip.MustParseAddr("127.0.0.1")}); got != want {
		t.Errorf("Authorize saw %+v, want %+v", got, want)
	}
}

// TestPolicyDenied: a connection Authorize denies is refused policy_denied
// with nothing dialled (its early bytes discarded); the client's next
// connection works, on a new link as after any refusal.
func TestPolicyDenied(t *testing.T) {
	h, auth := sourceHarness(t, nil)
	c := h.client(t, "a")
	h.echoFrom(t, c, withSource(payments, podAddr))
	auth.mu.Lock()
	auth.deny[h.backend.addr().Port()] = true
	auth.mu.Unlock()
	nc, err := c.OpenEarly(withSource(payments, podAddr), "tcp", h.dst(), []byte("E early"))
	if err != nil {
		t.Fatal(err)
	}
	if !nc.(*Conn).Reused {
		t.Error("the denied connection did not ride the pooled link")
	}
	_, err = nc.Read(make([]byte, 1))
	var re *RefusedError
	if !errors.As(err, &re) || re.Reason != ReasonPolicyDenied {
		t.Fatalf("denied connection: %v, want policy_denied", err)
	}
	nc.Close()
	h.waitCount(t, ReasonPolicyDenied, 1)
	if n := h.backend.accepted.Load(); n != 1 {
		t.Errorf("the backend accepted %d connections, want 1 (the first; nothing for the denied one)", n)
	}
	auth.mu.Lock()
	auth.deny = map[uint16]bool{}
	auth.mu.Unlock()
	h.echoFrom(t, c, withSource(payments, podAddr))
	h.echoFrom(t, c, withSource(payments, podAddr))
	if n := h.handshakes(); n != 2 {
		t.Errorf("%d handshakes, want 2: the refusal ends its link, the next one is pooled", n)
	}
	if n := h.stats.In.Connections.Load(); n != 3 {
		t.Errorf("server relayed %d connections, want 3", n)
	}
}

// TestSourceOlderPeers: a v2 client and a v3 server, a v3 client and a
// v2-only server, talk v2: no source crosses, connections work, pooled.
func TestSourceOlderPeers(t *testing.T) {
	h, auth := sourceHarness(t, nil)
	old := h.newClient(t, ClientOptions{Credentials: h.pki.creds(t, "a"), ProtocolV2: true})
	for range 2 {
		conn := h.echoFrom(t, old, withSource(payments, podAddr))
		if v := conn.l.version; v != Version2 {
			t.Fatalf("v2 client speaks v%d", v)
		}
	}
	if got, want := auth.last(t), (Source{Node: nodeA, Addr: netip.MustParseAddr("127.0.0.1")}); got != want {
		t.Errorf("v2 client: Authorize saw %+v, want %+v", got, want)
	}
	if n := h.handshakes(); n != 1 {
		t.Errorf("v2 client: %d handshakes, want 1", n)
	}

	oldServer, auth2 := sourceHarness(t, func(o *ServerOptions) { o.ProtocolV2 = true })
	c := oldServer.client(t, "a")
	for range 2 {
		conn := oldServer.echoFrom(t, c, withSource(payments, podAddr))
		if v := conn.l.version; v != Version2 {
			t.Fatalf("v2-only server speaks v%d", v)
		}
	}
	if got := auth2.last(t); !got.Workload.IsZero() {
		t.Errorf("v2-only server: Authorize saw workload %s", got.Workload)
	}
	// A refusal reads the same.
	auth2.mu.Lock()
	auth2.deny[oldServer.backend.addr().Port()] = true
	auth2.mu.Unlock()
	_, err := c.DialContext(withSource(payments, podAddr), "tcp", oldServer.dst())
	var re *RefusedError
	if !errors.As(err, &re) || re.Reason != ReasonPolicyDenied {
		t.Errorf("v2 link: %v, want policy_denied", err)
	}
}

// TestSourceBadClientInput: a client refuses to send a source no header
// can carry; a raw v3 header with a foreign trust domain is refused.
func TestSourceBadClientInput(t *testing.T) {
	h, _ := sourceHarness(t, nil)
	c := h.client(t, "a")
	long := spiffeid.RequireFromString("spiffe://test.local/" + strings.Repeat("x", MaxSourceID))
	if _, err := c.DialContext(withSource(long, netip.Addr{}), "tcp", h.dst()); err == nil {
		t.Error("a source ID over MaxSourceID was sent")
	}
	foreign := spiffeid.RequireFromString("spiffe://other.local/ns/prod/sa/payments")
	_, err := c.DialContext(withSource(foreign, netip.Addr{}), "tcp", h.dst())
	var re *RefusedError
	if !errors.As(err, &re) || re.Reason != ReasonIdentityNotOnNode {
		t.Errorf("foreign trust domain: %v, want identity_not_on_node", err)
	}
}

// BenchmarkSourceCheck is what the server adds per tunnelled connection
// for a v3 source with trivial hooks: decoding the source from the
// header, the SourceVerifier and Authorize.
func BenchmarkSourceCheck(b *testing.B) {
	s := &Server{o: ServerOptions{
		Verifier:  mapVerifier{nodeA: {payments}},
		Authorize: func(Source, netip.AddrPort) (string, bool) { return "", true },
	}}
	hdr, err := AppendHeaderV3(nil, Header{Dst: netip.MustParseAddrPort("10.0.2.2:80"), Workload: payments, SrcAddr: podAddr})
	if err != nil {
		b.Fatal(err)
	}
	peer := netip.MustParseAddr("198.18.0.3")
	td := nodeA.TrustDomain()
	b.Run("parse", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := ParseHeaderV3(hdr, td); err != nil {
				b.Fatal(err)
			}
		}
	})
	h, _ := ParseHeaderV3(hdr, td)
	b.Run("verify+authorize", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			src, ref := s.source(nodeA, peer, &h)
			if ref != nil || s.authorize(src, h.Dst) != nil {
				b.Fatal("refused")
			}
		}
	})
}

// peersPolicy is the identity policy of [[tunnel.tls.peers]] entries.
func peersPolicy(t *testing.T, peers ...config.Peer) *IdentityPolicy {
	t.Helper()
	cfg := config.Default().Tunnel.TLS
	cfg.TrustDomain = "test.local"
	cfg.Peers = peers
	full := config.Default()
	full.Tunnel.TLS = cfg
	if err := full.Validate(); err != nil && strings.Contains(err.Error(), "tunnel.tls.peers") {
		t.Fatal(err)
	}
	p, err := NewIdentityPolicy(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestPeerWorkloads: [[tunnel.tls.peers]] workloads say which workloads a
// node may assert, and its cidrs at which addresses.
func TestPeerWorkloads(t *testing.T) {
	nodeB := spiffeid.RequireFromString("spiffe://test.local/node/b")
	nodeC := spiffeid.RequireFromString("spiffe://test.local/node/c")
	p := peersPolicy(t,
		config.Peer{CIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24")}, Identities: []string{nodeA.String()},
			Workloads: []string{payments.String(), "spiffe://test.local/ns/dev/"}},
		config.Peer{CIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.2.0/24")}, Identities: []string{nodeB.String()}},
		config.Peer{Identities: []string{nodeC.String()}, Workloads: []string{"spiffe://test.local/"}},
	)
	id := spiffeid.RequireFromString
	for _, c := range []struct {
		node, workload spiffeid.ID
		addr           netip.Addr
		ok             bool
		unverifiable   bool
	}{
		{nodeA, payments, netip.Addr{}, true, false},
		{nodeA, payments, podAddr, true, false},
		{nodeA, id("spiffe://test.local/ns/dev/sa/x"), podAddr, true, false},
		{nodeA, id("spiffe://test.local/ns/devx/sa/x"), podAddr, false, false}, // a prefix ends at "/"
		{nodeA, ledger, podAddr, false, false},
		{nodeA, payments, netip.MustParseAddr("198.18.2.1"), false, false}, // b's address
		{nodeA, spiffeid.ID{}, podAddr, true, false},
		{nodeA, spiffeid.ID{}, netip.MustParseAddr("198.18.2.1"), false, true}, // dropped, not refused
		{nodeB, payments, netip.Addr{}, false, false},                          // b has no workloads
		{nodeB, spiffeid.ID{}, netip.MustParseAddr("198.18.2.1"), true, false},
		{nodeC, ledger, netip.Addr{}, true, false},
		{nodeC, ledger, podAddr, false, false}, // c has no cidrs
		{id("spiffe://test.local/node/d"), payments, netip.Addr{}, false, false},
		{id("spiffe://test.local/node/d"), spiffeid.ID{}, podAddr, false, true}, // a node no entry lists
	} {
		err := p.Verify(c.node, c.workload, c.addr)
		if (err == nil) != c.ok || errors.Is(err, ErrUnverifiable) != c.unverifiable {
			t.Errorf("%s asserting %s at %s: %v, want ok %v, unverifiable %v", c.node, c.workload, c.addr, err, c.ok, c.unverifiable)
		}
	}
	// Today's configurations, without workloads, verify nothing.
	old := peersPolicy(t, config.Peer{CIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24")}, Identities: []string{nodeA.String()}})
	if err := old.Verify(nodeA, payments, podAddr); !errors.Is(err, ErrUnverifiable) {
		t.Errorf("without workloads: %v, want ErrUnverifiable", err)
	}
}

// TestPeerWorkloadsOverTLS: the server's Credentials.SourceVerifier
// applies the peers entries of its policy, and follows a reload.
func TestPeerWorkloadsOverTLS(t *testing.T) {
	var creds *Credentials
	h, auth := sourceHarness(t, func(o *ServerOptions) {
		creds = o.Credentials
		creds.SetPolicy(peersPolicy(t, config.Peer{CIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24")},
			Identities: []string{nodeA.String()}, Workloads: []string{payments.String()}}))
		o.Verifier = creds.SourceVerifier()
	})
	c := h.client(t, "a")
	h.echoFrom(t, c, withSource(payments, podAddr))
	if got, want := auth.last(t), (Source{Node: nodeA, Workload: payments, Addr: podAddr}); got != want {
		t.Errorf("Authorize saw %+v, want %+v", got, want)
	}
	_, err := c.DialContext(withSource(ledger, podAddr), "tcp", h.dst())
	var re *RefusedError
	if !errors.As(err, &re) || re.Reason != ReasonIdentityNotOnNode {
		t.Fatalf("ledger from a: %v, want identity_not_on_node", err)
	}
	if n := h.backend.accepted.Load(); n != 1 {
		t.Errorf("backend accepted %d, want 1", n)
	}
	// A reload without workloads: nothing verified, the node speaks.
	creds.SetPolicy(peersPolicy(t))
	h.echoFrom(t, c, withSource(ledger, podAddr))
	if got := auth.last(t); !got.Workload.IsZero() {
		t.Errorf("without workloads Authorize saw workload %s", got.Workload)
	}
}

// TestBadInputV3: a v3 peer's header is read in two bounded reads under the
// header deadline; whatever is wrong with its source is refused.
func TestBadInputV3(t *testing.T) {
	h, _ := sourceHarness(t, func(o *ServerOptions) { o.HandshakeTimeout = 300 * time.Millisecond })
	cfg := h.pki.tlsConfig(t, "a")
	cfg.NextProtos = []string{ALPN3}
	valid := func(id string) []byte {
		b, err := AppendHeaderV3(nil, Header{Dst: onNode(h.backend.addr())})
		if err != nil {
			t.Fatal(err)
		}
		b[26], b[27] = byte(len(id)>>8), byte(len(id))
		return append(b, id...)
	}
	cases := []struct {
		name   string
		send   []byte
		status bool
		want   Reason
	}{
		{"source ID cut short", valid("spiffe://test.local/ns/prod/sa/payments")[:HeaderSizeV3+10], false, ReasonHeaderTimeout},
		{"fixed part cut short", valid("")[:HeaderSizeV3-1], false, ReasonHeaderTimeout},
		{"source ID too long", func() []byte { b := valid(""); b[26], b[27] = 0x10, 0; return b }(), true, ReasonBadHeader},
		{"source ID not SPIFFE", valid("payments"), true, ReasonBadHeader},
		{"source in another trust domain", valid("spiffe://other.local/ns/prod/sa/payments"), true, ReasonIdentityNotOnNode},
		{"source not on the node", valid("spiffe://test.local/ns/prod/sa/ledger"), true, ReasonIdentityNotOnNode},
		{"v2 header on a v3 link", func() []byte {
			b, _ := appendHeader(nil, onNode(h.backend.addr()), Version2)
			return append(b, make([]byte, 20)...)
		}(), true, ReasonUnsupportedVersion},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := h.stats.Errors(c.want)
			conn, err := h.rawDial(t, cfg)
			if err != nil {
				t.Fatal(err)
			}
			if p := conn.(*tls.Conn).ConnectionState().NegotiatedProtocol; p != ALPN3 {
				t.Fatalf("negotiated %q", p)
			}
			if _, err := conn.Write(c.send); err != nil {
				t.Fatal(err)
			}
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			var st [StatusSize]byte
			_, err = io.ReadFull(conn, st[:])
			if c.status {
				if err != nil {
					t.Fatalf("reading the status: %v", err)
				}
				s, err := parseStatus(st[:], Version3)
				if err != nil || s.OK || s.Reason != c.want {
					t.Errorf("status %+v, %v, want refused %s", s, err, c.want)
				}
			} else if err == nil {
				t.Errorf("server answered % x", st)
			}
			h.waitCount(t, c.want, before+1)
		})
	}
	if n := h.backend.accepted.Load(); n != 0 {
		t.Errorf("the backend accepted %d connections", n)
	}
}

// BenchmarkConnectSource is BenchmarkConnect's pooled mode with a source:
// "v2" as before v3, "v3" without a source or hooks, "v3-source" with a
// source, a SourceVerifier and Authorize (trivial). The difference is what
// the source costs a whole tunnelled connection, both ends.
//
//	go test -run '^$' -bench ConnectSource -benchtime 3s ./pkg/tunnel
func BenchmarkConnectSource(b *testing.B) {
	for _, mode := range []string{"v2", "v3", "v3-source"} {
		b.Run(mode, func(b *testing.B) {
			h := newHarness(b, func(o *ServerOptions) {
				if mode == "v3-source" {
					o.Verifier = mapVerifier{nodeA: {payments}}
					o.Authorize = func(Source, netip.AddrPort) (string, bool) { return "", true }
				}
			})
			c := h.newClient(b, ClientOptions{Credentials: h.pki.creds(b, "a"), ProtocolV2: mode == "v2"})
			ctx := context.Background()
			if mode == "v3-source" {
				ctx = withSource(payments, podAddr)
			}
			dst := h.dst()
			var one [1]byte
			for b.Loop() {
				nc, err := c.OpenEarly(ctx, "tcp", dst, []byte{'E', 1})
				if err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(nc, one[:]); err != nil {
					b.Fatal(err)
				}
				nc.(*Conn).CloseWrite()
				if _, err := io.ReadAll(nc); err != nil {
					b.Fatal(err)
				}
				nc.Close()
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "conn/s")
		})
	}
}
