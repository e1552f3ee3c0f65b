package e2e

import (
	"encoding/json"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// serviceCount reads smesh_service_connections_total{result} from node n.
func serviceCount(t *testing.T, n *node, result string) float64 {
	t.Helper()
	_, text := n.admin("/metrics")
	return testenv.Metric(t, text, "smesh_service_connections_total", map[string]string{"result": result})
}

// TestServiceSameNode: [[services]] whose backends run on the node. A
// connection to the VIP is sent to the backend in connect4 and spliced with
// no proxy hop (the server sees the client itself; sk_msg carries the
// bytes); the client sees the VIP as its peer; each connection counts once
// as local_splice. A Service without a usable backend refuses at once with
// ECONNREFUSED, IPv6 VIPs and dual-stack sockets to a v4-mapped VIP work.
func TestServiceSameNode(t *testing.T) {
	n := newNode(t)
	n.server(n.enrolled, "127.0.0.1:9000")
	n.server(n.enrolled, "[::1]:9001")
	n.start("splice", `
[[services]]
name = "web"
vip = "198.19.0.10"
port = 80
backends = ["127.0.0.1:9000"]

[[services]]
name = "web6"
vip = "fd00:5e:ff::10"
port = 80
backends = ["[::1]:9001"]

[[services]]
name = "empty"
vip = "198.19.0.11"
port = 80

[[services]]
name = "closed"
vip = "198.19.0.13"
port = 80
backends = ["127.0.0.1:1"]

[[services]]
name = "elsewhere-only"
vip = "198.19.0.12"
port = 80
backends = ["198.18.250.1:80"]
local_only = true
`)
	vip := "198.19.0.10:80"
	before := serviceCount(t, n, "local_splice")

	saw, local, remote := peerOf(n, n.enrolled, vip)
	if remote.String() != vip {
		t.Errorf("client's peer is %s, want the VIP %s", remote, vip)
	}
	if saw != local {
		t.Errorf("server saw %s, client is %s: want no proxy hop", saw, local)
	}
	if saw.Addr() != netip.MustParseAddr("127.0.0.1") {
		t.Errorf("server saw %s", saw)
	}

	st := n.stats()
	n.client(n.enrolled, "oneway", vip, "1000000")
	checkSpliced(t, "sk_msg", st, n.stats(), 1000000, false)

	// IPv6 VIP, and a dual-stack socket to the v4-mapped VIP.
	for _, addr := range []string{"[fd00:5e:ff::10]:80", "[::ffff:198.19.0.10]:80"} {
		saw, local, remote := peerOf(n, n.enrolled, addr)
		// Go shows a v4-mapped peer as the IPv4 address it carries.
		want := netip.MustParseAddrPort(addr)
		if netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port()) != netip.AddrPortFrom(want.Addr().Unmap(), want.Port()) || saw != local {
			t.Errorf("%s: client's peer %s, server saw %s, client %s: want the VIP, no proxy hop", addr, remote, saw, local)
		}
		n.client(n.enrolled, "echo", addr, "100000")
	}
	if got := serviceCount(t, n, "local_splice") - before; got != 6 {
		t.Errorf("smesh_service_connections_total{result=local_splice} moved by %v, want 6", got)
	}

	noBackend := serviceCount(t, n, "no_backend")
	n.client(n.enrolled, "refused", "198.19.0.11:80")
	n.client(n.enrolled, "refused", "198.19.0.12:80")
	// A socket whose connection to a Service's backend was refused (the
	// backend's port closed), connected elsewhere, then names its new
	// peer, not the Service.
	n.client(n.enrolled, "reconnect", "198.19.0.13:80", "127.0.0.1:9000")
	if got := serviceCount(t, n, "no_backend") - noBackend; got != 2 {
		t.Errorf("smesh_service_connections_total{result=no_backend} moved by %v, want 2", got)
	}

	// /debug/services shows all five, with where their backends are.
	_, body := n.admin("/debug/services")
	var svcs []struct {
		Name     string
		VIP      string
		Port     int
		Backends []struct {
			Addr   string
			Local  bool
			Usable bool
		}
		LocalOnly bool `json:"local_only"`
	}
	if err := json.Unmarshal([]byte(body), &svcs); err != nil {
		t.Fatalf("/debug/services: %v: %s", err, body)
	}
	byName := make(map[string]int)
	for i, s := range svcs {
		byName[s.Name] = i
	}
	if len(svcs) != 5 {
		t.Fatalf("/debug/services lists %d services: %s", len(svcs), body)
	}
	if web := svcs[byName["web"]]; web.VIP != "198.19.0.10" || web.Port != 80 || len(web.Backends) != 1 || !web.Backends[0].Local || !web.Backends[0].Usable {
		t.Errorf("/debug/services web = %+v", web)
	}
	if e := svcs[byName["elsewhere-only"]]; !e.LocalOnly || len(e.Backends) != 1 || e.Backends[0].Local || e.Backends[0].Usable {
		t.Errorf("/debug/services elsewhere-only = %+v", e)
	}
}

// TestServiceTunnel: a Service on node a whose backend runs on node b. The
// connection is sent to the backend in connect4, captured, and goes through
// the tunnel: b's server sees b's smeshd, the client sees the VIP, the bytes
// arrive, and a counts each connection once as tunnel.
func TestServiceTunnel(t *testing.T) {
	a, b := newNode(t), newNode(t)
	_, addrB := testenv.Link(t, a.ns, b.ns)
	backend := netip.AddrPortFrom(addrB, 9000)
	svc := `
[[services]]
name = "web"
vip = "198.19.0.20"
port = 80
backends = ["` + backend.String() + `"]
`
	a.start("splice", svc)
	b.start("splice", "")
	b.server(b.enrolled, backend.String())
	vip := "198.19.0.20:80"
	before := serviceCount(t, a, "tunnel")
	saw, local, remote := peerOf(a, a.enrolled, vip)
	if remote.String() != vip || saw == local {
		t.Fatalf("client's peer %s, server saw %s, client %s: want the VIP, captured", remote, saw, local)
	}
	if saw.Addr() != addrB {
		t.Fatalf("server saw %s, want its own node's smeshd at %s", saw, addrB)
	}
	a.client(a.enrolled, "echo", vip, "1000000")
	if got := serviceCount(t, a, "tunnel") - before; got != 2 {
		t.Errorf("smesh_service_connections_total{result=tunnel} moved by %v, want 2", got)
	}
	_, text := b.admin("/metrics")
	if v := testenv.Metric(t, text, "smesh_connections_total", map[string]string{"path": "tunnel_in"}); v < 2 {
		t.Errorf("node b counted %v incoming tunnel connections, want at least 2", v)
	}

	// A reload that makes the Service local_only: its one backend is on
	// another node, so connections are refused.
	conf, err := os.ReadFile(a.confPath)
	if err != nil {
		t.Fatal(err)
	}
	a.reload(strings.Replace(string(conf), svc, svc+"local_only = true\n", 1))
	a.client(a.enrolled, "refused", vip)
}
