package e2e

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/certs"
	"github.com/smesh-dev/smesh/pkg/testenv"
	"github.com/smesh-dev/smesh/pkg/tunnel"
)

// TestTunnelPeersInTrustDomain: with allow_identities empty (the default),
// a certificate of the CA is a peer only with a SPIFFE ID in the configured
// trust domain: one without a SPIFFE ID, or from another trust domain, is
// refused in the handshake.
func TestTunnelPeersInTrustDomain(t *testing.T) {
	a, b, _, addrB := meshPair(t, "splice", "", "")
	server := netip.AddrPortFrom(addrB, 9000)
	b.server(b.enrolled, server.String())
	ca, err := certs.LoadCA(filepath.Join(a.pki, "ca.crt"), filepath.Join(a.pki, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	for name, uris := range map[string][]string{"noid": nil, "foreign": {"spiffe://other.example/node/" + a.name}} {
		c, k, err := ca.IssueURIs(name, uris, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(a.pki, name+".crt"), c, 0o644)
		os.WriteFile(filepath.Join(a.pki, name+".key"), k, 0o600)
	}
	bad := badClient{t: t, from: a, to: netip.AddrPortFrom(addrB, 18001)}
	for _, c := range []struct{ cert, reason string }{{"noid", "bad_identity"}, {"foreign", "wrong_trust_domain"}} {
		t.Run(c.cert, func(t *testing.T) {
			bad.t = t
			conn, err := bad.dial(clientTLS(t, a.pki, c.cert))
			if err == nil {
				if _, err = conn.Write(header(t, server)); err == nil {
					var st [tunnel.StatusSize]byte
					if n, err := conn.Read(st[:]); n != 0 || err == nil {
						t.Errorf("smeshd answered %d bytes (%v) to a certificate it must refuse", n, err)
					}
				}
			}
			waitLog(t, b, c.reason, 1)
		})
	}
	// The node certificate of the same CA is a peer.
	bad.t = t
	conn, err := bad.dial(clientTLS(t, a.pki, a.name))
	if err != nil {
		t.Fatal(err)
	}
	conn.Write(header(t, server))
	var st [tunnel.StatusSize]byte
	if _, err := conn.Read(st[:]); err != nil {
		t.Fatalf("node certificate: %v", err)
	}
	if s, err := tunnel.ParseStatus(st[:]); err != nil || !s.OK {
		t.Errorf("node certificate: status %+v, %v; want ok", s, err)
	}
}

// TestTunnelRefusedHandshakeLog: when the peer refuses this node's
// identity, the app's connection is reset (a delivered one would be held
// open by the server), and this node logs that the peer refused the
// handshake, with the TLS alert, not that the peer is unreachable.
func TestTunnelRefusedHandshakeLog(t *testing.T) {
	a, b := newNode(t), newNode(t)
	_, addrB := testenv.Link(t, a.ns, b.ns)
	a.start("splice", "")
	b.start("splice", b.tlsConf(fmt.Sprintf("allow_identities = [%q]", b.id())))
	server := netip.AddrPortFrom(addrB, 9000).String()
	b.server(b.enrolled, server)
	for range 5 {
		a.client(a.enrolled, "reset", server)
	}
	waitLog(t, a, "peer_refused_handshake", 5)
	waitLog(t, b, "identity_not_allowed", 5)
	for _, line := range strings.Split(a.smeshd.Stderr(), "\n") {
		if strings.Contains(line, `"reason":"peer_refused_handshake"`) &&
			(!strings.Contains(line, "refused the TLS handshake") || !strings.Contains(line, "bad certificate")) {
			t.Errorf("log line does not say the peer refused the handshake and why: %s", line)
		}
	}
	for _, r := range []string{"peer_unreachable", "peer_protocol"} {
		if strings.Contains(a.smeshd.Stderr(), fmt.Sprintf(`"reason":%q`, r)) {
			t.Errorf("node a logged %s for a peer that refused its identity", r)
		}
	}
}

// TestTunnelHandshakeBudget: idle TCP connections to the tunnel port, far
// more than max_connections and max_handshakes_per_source, from the very
// address of a legitimate peer, neither take the places of authenticated
// connections nor keep that peer out: its connections get through.
func TestTunnelHandshakeBudget(t *testing.T) {
	a, b := newNode(t), newNode(t)
	_, addrB := testenv.Link(t, a.ns, b.ns)
	b.start("splice", "[tunnel]\nmax_connections = 4\nmax_handshakes = 16\nmax_handshakes_per_source = 8\n")
	a.start("splice", "")
	server := netip.AddrPortFrom(addrB, 9000).String()
	b.server(b.enrolled, server)

	held := 0
	for range 100 {
		var c net.Conn
		err := a.ns.Do(func() (err error) {
			c, err = net.DialTimeout("tcp4", netip.AddrPortFrom(addrB, 18001).String(), 5*time.Second)
			return err
		})
		if err == nil {
			held++
			t.Cleanup(func() { c.Close() })
		} else if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatal(err)
		}
	}
	_, text := b.admin("/metrics")
	if n := testenv.Metric(t, text, "smesh_tunnel_errors_total", map[string]string{"reason": "too_many_handshakes"}); n < 1 {
		t.Errorf("no connection refused for too_many_handshakes (%v) after 100 idle ones", n)
	}
	// A real handshake takes milliseconds; the idle connections are stale
	// after a second and give their places to new connections.
	time.Sleep(1200 * time.Millisecond)
	a.client(a.enrolled, "oneway", server, "1000000")
	a.client(a.enrolled, "echo", server, "1000000")
	_, text = b.admin("/metrics")
	if n := testenv.Metric(t, text, "smesh_tunnel_errors_total", map[string]string{"reason": "handshake_evicted"}); n < 1 {
		t.Errorf("%v idle handshakes evicted, want at least 1", n)
	}
	t.Logf("%d of 100 idle connections were accepted by the kernel and held", held)
}

// TestTunnelIdleTimeout: a tunnelled connection that moves nothing for
// [tunnel] idle_timeout is reset by the receiving node, at both ends; one
// that keeps moving, slower than that, is not. On the sending node,
// [outbound] idle_timeout does the same.
func TestTunnelIdleTimeout(t *testing.T) {
	for _, tc := range []struct {
		name, confA, confB string
		cutter             int // 0: a counts it, 1: b
	}{
		{"receiving node", "", "[tunnel]\nidle_timeout = \"1s\"\n", 1},
		{"sending node", "[outbound]\nidle_timeout = \"1s\"\n", "", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := newNode(t), newNode(t)
			_, addrB := testenv.Link(t, a.ns, b.ns)
			b.start("splice", tc.confB)
			a.start("splice", tc.confA)
			server := netip.AddrPortFrom(addrB, 9000).String()
			srv := b.server(b.enrolled, server)

			a.client(a.enrolled, "idle", server)
			line, err := srv.ReadLine(10 * time.Second)
			if err != nil || !strings.HasPrefix(line, "result hold error:") {
				t.Errorf("the server's end of the idle connection: %q %v, want an error (a reset)", line, err)
			}
			a.client(a.enrolled, "paced", server, "200") // 2 s, 10 ms apart
			_, textA := a.admin("/metrics")
			_, textB := b.admin("/metrics")
			// (A family appears with its first count.)
			counts := []float64{0, 0}
			if strings.Contains(textA, "smesh_refused_connections_total{") {
				counts[0] = testenv.Metric(t, textA, "smesh_refused_connections_total", map[string]string{"reason": "idle_timeout"})
			}
			if strings.Contains(textB, "smesh_tunnel_errors_total{") {
				counts[1] = testenv.Metric(t, textB, "smesh_tunnel_errors_total", map[string]string{"reason": "idle_timeout"})
			}
			if counts[tc.cutter] != 1 || counts[1-tc.cutter] > 0 {
				t.Errorf("idle timeouts counted by node a %v, by node b %v; want 1 by node %c", counts[0], counts[1], "ab"[tc.cutter])
			}
		})
	}
}

// TestTunnelPins: [[tunnel.tls.peers]] ties a destination to the identities
// that may serve it. Pinned to another identity, node b's address is not
// served by node b (a node holding another node's key could answer for it
// otherwise); after a reload pinning it to node b, it is.
func TestTunnelPins(t *testing.T) {
	a, b := newNode(t), newNode(t)
	_, addrB := testenv.Link(t, a.ns, b.ns)
	b.start("splice", "")
	server := netip.AddrPortFrom(addrB, 9000).String()
	srv := b.server(b.enrolled, server)
	pin := func(id string) string {
		return a.tlsConf(fmt.Sprintf("[[tunnel.tls.peers]]\ncidrs = [%q]\nidentities = [%q]\n", netip.PrefixFrom(addrB, 32), id))
	}
	a.start("splice", pin("spiffe://test.local/node/someone-else"))

	// Refused: node a's smeshd resets the app's connection; delivered, it
	// would stay open to the server, which holds it.
	a.client(a.enrolled, "reset", server)
	waitLog(t, a, "peer_identity", 1)
	if strings.Contains(srv.Stdout(), "result hold") {
		t.Errorf("the server saw the connection: %s", srv.Stdout())
	}

	conf, err := os.ReadFile(a.confPath)
	if err != nil {
		t.Fatal(err)
	}
	a.reload(strings.Replace(string(conf), "spiffe://test.local/node/someone-else", b.id(), 1))
	a.client(a.enrolled, "oneway", server, "1000000")
}
