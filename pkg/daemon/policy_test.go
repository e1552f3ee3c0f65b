package daemon

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/policy"
	"github.com/smesh-dev/smesh/pkg/tunnel"
)

// TestPolicyCompile: the same-node verdicts of a set for this node's
// identities, and the tunnel's decisions by destination address.
func TestPolicyCompile(t *testing.T) {
	web := spiffeid.RequireFromString("spiffe://td/ns/web/sa/web")
	db := spiffeid.RequireFromString("spiffe://td/ns/db/sa/db")
	batch := spiffeid.RequireFromString("spiffe://td/ns/batch/sa/batch")
	names := map[uint32]spiffeid.ID{10: web, 20: db, 30: batch}
	dbAddr := netip.MustParseAddr("10.0.0.2")
	addrs := map[netip.Addr]uint32{
		netip.MustParseAddr("10.0.0.1"): 10, dbAddr: 20,
		// batch has two addresses, which ipBlocks tell apart.
		netip.MustParseAddr("10.0.0.3"): 30, netip.MustParseAddr("fd00::3"): 30,
	}
	cfg := config.Config{Policies: []config.Policy{
		{Name: "db-from-web", Action: "ALLOW", Workloads: []string{db.String()},
			Rules: []config.PolicyRule{{From: []config.PolicyFrom{{Principals: []string{"td/ns/web/sa/web"}}}, To: []config.PolicyTo{{Ports: []uint16{5432}}}}}},
		{Name: "db-batch-v4", Action: "ALLOW", Workloads: []string{db.String()},
			Rules: []config.PolicyRule{{From: []config.PolicyFrom{{IPBlocks: []string{"10.0.0.3/32"}}}}}},
	}}
	p := newPolicies(cfg, zerolog.Nop())
	entries, dsts, problems := p.compile(p.set.Load(), names, addrs, nil)
	p.dsts.Store(&dsts)

	got := map[[3]uint32]datapath.PolicyEntry{}
	for _, e := range entries {
		if e.Dst != 20 {
			t.Errorf("entry for %d, which no policy selects: %+v", e.Dst, e)
		}
		got[[3]uint32{e.Dst, e.Src, uint32(e.Port)}] = e
	}
	for _, c := range []struct {
		src   uint32
		port  uint16
		allow bool
	}{
		{10, 5432, true}, {10, 0, false}, // web: its port only
		{20, 5432, false}, {20, 0, false}, // db itself: nothing allows it
		{datapath.UnknownIdentity, 5432, false}, {datapath.UnknownIdentity, 0, false},
		{30, 5432, false}, {30, 0, false}, // batch: its addresses disagree: denied
	} {
		e, ok := got[[3]uint32{20, c.src, uint32(c.port)}]
		if !ok || e.Allow != c.allow {
			t.Errorf("src %d port %d: %+v (present %v), want allow %v", c.src, c.port, e, ok, c.allow)
		}
		if ok && !e.Allow && e.Policy == 0 {
			t.Errorf("src %d port %d: a denial counted under no policy number", c.src, c.port)
		}
	}
	if len(entries) != 8 {
		t.Errorf("%d entries, want 8 (4 sources x 2 ports): %+v", len(entries), entries)
	}
	if len(problems) != 2 {
		t.Errorf("problems %q, want batch's two ports reported", problems)
	}

	// The tunnel: by destination address; a destination that is no
	// workload is no policy's.
	for _, c := range []struct {
		src   tunnel.Source
		dst   string
		allow bool
	}{
		{tunnel.Source{Workload: web}, "10.0.0.2:5432", true},
		{tunnel.Source{Workload: web}, "10.0.0.2:80", false},
		{tunnel.Source{Workload: batch, Addr: netip.MustParseAddr("10.0.0.3")}, "10.0.0.2:80", true},
		{tunnel.Source{Workload: batch, Addr: netip.MustParseAddr("fd00::3")}, "10.0.0.2:80", false},
		{tunnel.Source{}, "10.0.0.1:80", true},  // web: no policy selects it
		{tunnel.Source{}, "192.0.2.1:80", true}, // no workload
		{tunnel.Source{}, "[::ffff:10.0.0.2]:80", false},
	} {
		if _, ok := p.authorize(c.src, netip.MustParseAddrPort(c.dst)); ok != c.allow {
			t.Errorf("%+v to %s: allowed %v, want %v", c.src, c.dst, ok, c.allow)
		}
	}
	pc := p.tunnel[denial{"", policy.ReasonNotAllowed}]
	if pc != 3 {
		t.Errorf("tunnel not_allowed count %d, want 3", pc)
	}
}

// TestPolicyCompilePorts: a workload known by (address, port) only (a
// systemd unit in the node's namespace, [[capture.workloads]] ports) is a
// destination like the others: policed on the same node by its identity's
// entries, decided on the tunnel path by address and port; another port of
// that address is no workload's.
func TestPolicyCompilePorts(t *testing.T) {
	web := spiffeid.RequireFromString("spiffe://td/node/a/unit/web.service")
	pay := spiffeid.RequireFromString("spiffe://td/node/a/unit/payments.service")
	names := map[uint32]spiffeid.ID{10: web, 20: pay}
	ports := map[netip.AddrPort]uint32{
		netip.MustParseAddrPort("198.18.0.1:8080"): 20, netip.MustParseAddrPort("[fd00:5e::1]:8080"): 20,
	}
	cfg := config.Config{Policies: []config.Policy{
		{Name: "pay-from-web", Action: "ALLOW", Workloads: []string{pay.String()},
			Rules: []config.PolicyRule{{From: []config.PolicyFrom{{Principals: []string{"td/node/a/unit/web.service"}}}}}},
	}}
	p := newPolicies(cfg, zerolog.Nop())
	entries, dsts, dstPorts, problems := p.compilePorts(p.set.Load(), names, nil, ports, nil)
	p.dsts.Store(&dsts)
	p.dstPorts.Store(&dstPorts)
	if len(problems) != 0 {
		t.Errorf("problems %q", problems)
	}
	got := map[uint32]bool{}
	for _, e := range entries {
		if e.Dst != 20 || e.Port != 0 {
			t.Errorf("entry %+v, want payments' (20), port 0 only", e)
		}
		got[e.Src] = e.Allow
	}
	if len(got) != 3 || !got[10] || got[20] || got[datapath.UnknownIdentity] {
		t.Errorf("verdicts by source %v, want web allowed, payments and unknown denied", got)
	}
	for _, c := range []struct {
		src   tunnel.Source
		dst   string
		allow bool
	}{
		{tunnel.Source{Workload: web}, "198.18.0.1:8080", true},
		{tunnel.Source{Workload: web}, "[fd00:5e::1]:8080", true},
		{tunnel.Source{}, "198.18.0.1:8080", false},
		{tunnel.Source{}, "[::ffff:198.18.0.1]:8080", false},
		{tunnel.Source{Workload: pay}, "[fd00:5e::1]:8080", false},
		{tunnel.Source{}, "198.18.0.1:8081", true}, // no workload's port
	} {
		if _, ok := p.authorize(c.src, netip.MustParseAddrPort(c.dst)); ok != c.allow {
			t.Errorf("%+v to %s: allowed %v, want %v", c.src, c.dst, ok, c.allow)
		}
	}
}

// TestNoDestination: a unit a policy selects that has neither an address
// nor a port is reported; one with a port, one no policy selects and a pod
// are not.
func TestNoDestination(t *testing.T) {
	cfg := config.Config{Policies: []config.Policy{
		{Name: "p", Action: "ALLOW", Workloads: []string{"spiffe://td/unit/pay", "spiffe://td/unit/web", "spiffe://td/ns/a/sa/pod"}},
	}}
	set := newPolicies(cfg, zerolog.Nop()).set.Load()
	view := []IdentityEntry{
		{Cgroup: "/cg/pay.service", Identity: "spiffe://td/unit/pay", Number: 5, From: "workload"},
		{Cgroup: "/cg/web.service", Identity: "spiffe://td/unit/web", Number: 6, From: "workload", Ports: []uint16{80}},
		{Cgroup: "/cg/other.service", Identity: "spiffe://td/unit/other", Number: 7, From: "workload"},
		{Cgroup: "/cg/pod", Identity: "spiffe://td/ns/a/sa/pod", Number: 8, From: "pod"},
	}
	got := noDestination(set, view, nil, map[datapath.PortKey]uint32{{Netns: 1, Port: 80}: 6})
	if len(got) != 1 || !strings.Contains(got[0], "spiffe://td/unit/pay") || !strings.Contains(got[0], "ports") {
		t.Errorf("noDestination = %q, want pay reported", got)
	}
}

// BenchmarkAuthorize: the tunnel's decision for a new connection.
func BenchmarkAuthorize(b *testing.B) {
	web := spiffeid.RequireFromString("spiffe://td/ns/web/sa/web")
	db := spiffeid.RequireFromString("spiffe://td/ns/db/sa/db")
	cfg := config.Config{Policies: []config.Policy{{Name: "db-from-web", Action: "ALLOW", Workloads: []string{db.String()},
		Rules: []config.PolicyRule{{From: []config.PolicyFrom{{Principals: []string{"td/ns/web/sa/web"}}}}}}}}
	p := newPolicies(cfg, zerolog.Nop())
	_, dsts, _ := p.compile(p.set.Load(), map[uint32]spiffeid.ID{10: web, 20: db}, map[netip.Addr]uint32{netip.MustParseAddr("10.0.0.2"): 20}, nil)
	p.dsts.Store(&dsts)
	src, dst := tunnel.Source{Workload: web}, netip.MustParseAddrPort("10.0.0.2:5432")
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := p.authorize(src, dst); !ok {
			b.Fatal("denied")
		}
	}
}

// TestPolicyCompileLabels: pods of one identity whose labels the policies
// treat differently: the tunnel decides per pod, the same node denies every
// connection to that identity (connect4/6 know identities only), reported;
// pods whose labels no policy tells apart keep exact verdicts.
func TestPolicyCompileLabels(t *testing.T) {
	web := spiffeid.RequireFromString("spiffe://td/ns/web/sa/web")
	api := spiffeid.RequireFromString("spiffe://td/ns/app/sa/api")
	a1, a2 := netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("10.0.0.3")
	names := map[uint32]spiffeid.ID{10: web, 20: api}
	addrs := map[netip.Addr]uint32{netip.MustParseAddr("10.0.0.1"): 10, a1: 20, a2: 20}
	set := policy.NewSet([]policy.Policy{{Name: "deny-canary", Namespace: "app", Action: policy.Deny,
		Selector: map[string]string{"track": "canary"}, Rules: []policy.Rule{{}}}}, "istio-system")
	p := newPolicies(config.Config{}, zerolog.Nop())
	wls := map[netip.Addr]policy.Workload{
		a1: {ID: api, Namespace: "app", Labels: map[string]string{"track": "stable"}},
		a2: {ID: api, Namespace: "app", Labels: map[string]string{"track": "canary"}},
	}
	entries, dsts, problems := p.compile(set, names, addrs, wls)
	if len(problems) != 1 {
		t.Errorf("problems %q, want the two label sets of api reported", problems)
	}
	for _, e := range entries {
		if e.Dst != 20 || e.Allow {
			t.Errorf("entry %+v: want every same-node connection to api denied", e)
		}
	}
	if len(entries) == 0 {
		t.Error("no entries: api is not policed")
	}
	p.set.Store(set)
	p.dsts.Store(&dsts)
	if _, ok := p.authorize(tunnel.Source{Workload: web}, netip.AddrPortFrom(a1, 80)); !ok {
		t.Error("tunnel: the stable pod is denied")
	}
	if _, ok := p.authorize(tunnel.Source{Workload: web}, netip.AddrPortFrom(a2, 80)); ok {
		t.Error("tunnel: the canary pod is allowed")
	}

	// Both stable: exact.
	wls[a2] = wls[a1]
	entries, _, problems = p.compile(set, names, addrs, wls)
	if len(problems) != 0 || len(entries) != 0 {
		t.Errorf("entries %+v problems %q: want api not policed", entries, problems)
	}
}

// TestPodVerifierSharedCertificate: with [kubernetes], a peer whose
// certificate names no node (one certificate for every node, as the shipped
// cert-manager Certificate) has its sources dropped, not refused; a node's
// go to the cluster's pods.
func TestPodVerifierSharedCertificate(t *testing.T) {
	d := &daemon{pods: fakePolicySource{}}
	d.cfg.Tunnel.TLS.TrustDomain = "cluster.local"
	v := podVerifier{d}
	shared := spiffeid.RequireFromString("spiffe://cluster.local/ns/smesh-system/sa/smeshd")
	web := spiffeid.RequireFromString("spiffe://cluster.local/ns/web/sa/web")
	if err := v.Verify(shared, web, netip.Addr{}); !errors.Is(err, tunnel.ErrUnverifiable) {
		t.Errorf("shared certificate: %v, want ErrUnverifiable", err)
	}
	if err := v.Verify(spiffeid.RequireFromString("spiffe://cluster.local/node/a"), web, netip.Addr{}); err != errFake {
		t.Errorf("node certificate: %v, want the pods' answer", err)
	}
}

var errFake = errors.New("asked the pods")

type fakePolicySource struct{ PodSource }

func (fakePolicySource) Workloads() map[string]policy.Workload { return nil }
func (fakePolicySource) Policies() *policy.Set                 { return nil }
func (fakePolicySource) PoliciesChanged() <-chan struct{}      { return nil }
func (fakePolicySource) Verify(node, workload spiffeid.ID, addr netip.Addr) error {
	return errFake
}
