package policy

import (
	"encoding/json"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var (
	web     = Workload{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/prod/sa/web"), Namespace: "prod", Labels: map[string]string{"app": "web", "tier": "front"}}
	db      = Workload{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/prod/sa/db"), Namespace: "prod", Labels: map[string]string{"app": "db"}}
	devWeb  = Workload{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/dev/sa/web"), Namespace: "dev", Labels: map[string]string{"app": "web"}}
	unitWeb = Workload{ID: spiffeid.RequireFromString("spiffe://smesh.local/node/a/unit/web.service")}
	unitDB  = Workload{ID: spiffeid.RequireFromString("spiffe://smesh.local/node/a/unit/db.service")}

	sleep    = Source{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/prod/sa/sleep"), IP: netip.MustParseAddr("10.1.0.5")}
	devSleep = Source{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/dev/sa/sleep"), IP: netip.MustParseAddr("10.2.0.5")}
	admin    = Source{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/prod/sa/admin-tools"), IP: netip.MustParseAddr("fd00:5e::5")}
	unit     = Source{ID: spiffeid.RequireFromString("spiffe://smesh.local/node/b/unit/client.service"), IP: netip.MustParseAddr("198.18.0.7")}
	anon     = Source{IP: netip.MustParseAddr("10.9.9.9")}
	nothing  = Source{}
	mapped   = Source{IP: netip.MustParseAddr("::ffff:10.1.0.5")}
)

func allow(ns, name string, rules ...Rule) Policy {
	return Policy{Namespace: ns, Name: name, Action: Allow, Rules: rules}
}

func deny(ns, name string, rules ...Rule) Policy {
	return Policy{Namespace: ns, Name: name, Action: Deny, Rules: rules}
}

func sel(p Policy, kv ...string) Policy {
	p.Selector = map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		p.Selector[kv[i]] = kv[i+1]
	}
	return p
}

func from(p ...Peer) Rule { return Rule{From: p} }

var (
	allowed    = Verdict{Allow: true}
	notAllowed = Verdict{Reason: ReasonNotAllowed}
)

func allowedBy(p string) Verdict { return Verdict{Allow: true, Policy: p} }
func deniedBy(p string) Verdict  { return Verdict{Policy: p, Reason: ReasonDenied} }
func invalid(p string) Verdict   { return Verdict{Policy: p, Reason: ReasonInvalid} }

type check struct {
	src  Source
	dst  Workload
	port uint16
	want Verdict
}

func TestDecide(t *testing.T) {
	for _, tc := range []struct {
		name     string
		policies []Policy
		root     string // DefaultRootNamespace unless set
		checks   []check
	}{
		{
			name: "no policy allows",
			checks: []check{
				{sleep, web, 80, allowed}, {anon, web, 0, allowed}, {nothing, unitWeb, 22, allowed},
			},
		},
		{
			name:     "allow without rules denies everything it selects",
			policies: []Policy{sel(allow("prod", "deny-web"), "app", "web")},
			checks: []check{
				{sleep, web, 80, notAllowed}, {sleep, web, 0, notAllowed},
				{sleep, db, 80, allowed}, {sleep, devWeb, 80, allowed},
			},
		},
		{
			name:     "empty rule allows everything",
			policies: []Policy{allow("prod", "all", Rule{})},
			checks: []check{
				{sleep, web, 80, allowedBy("prod/all")}, {anon, db, 0, allowedBy("prod/all")},
				{nothing, web, 1, allowedBy("prod/all")}, {sleep, devWeb, 80, allowed},
			},
		},
		{
			name:     "deny without rules does nothing",
			policies: []Policy{deny("prod", "nothing")},
			checks:   []check{{sleep, web, 80, allowed}},
		},
		{
			name:     "principal exact, both forms",
			policies: []Policy{allow("prod", "p", from(Peer{Principals: []string{"cluster.local/ns/prod/sa/sleep", "spiffe://smesh.local/node/b/unit/client.service"}}))},
			checks: []check{
				{sleep, web, 80, allowedBy("prod/p")}, {devSleep, web, 80, notAllowed},
				{admin, web, 80, notAllowed}, {anon, web, 80, notAllowed},
				{unit, web, 80, allowedBy("prod/p")},
			},
		},
		{
			name:     "principal prefix",
			policies: []Policy{allow("prod", "p", from(Peer{Principals: []string{"cluster.local/ns/prod/*"}}))},
			checks: []check{
				{sleep, web, 80, allowedBy("prod/p")}, {admin, web, 80, allowedBy("prod/p")},
				{devSleep, web, 80, notAllowed}, {anon, web, 80, notAllowed},
			},
		},
		{
			name:     "principal suffix",
			policies: []Policy{allow("prod", "p", from(Peer{Principals: []string{"*/sa/sleep"}}))},
			checks: []check{
				{sleep, web, 80, allowedBy("prod/p")}, {devSleep, web, 80, allowedBy("prod/p")},
				{admin, web, 80, notAllowed}, {anon, web, 80, notAllowed},
			},
		},
		{
			name:     "principal presence: any identified source",
			policies: []Policy{allow("prod", "p", from(Peer{Principals: []string{"*"}}))},
			checks: []check{
				{sleep, web, 80, allowedBy("prod/p")}, {unit, web, 80, allowedBy("prod/p")},
				{anon, web, 80, notAllowed}, {nothing, web, 80, notAllowed},
			},
		},
		{
			name:     "notPrincipals * denies sources without identity",
			policies: []Policy{deny("prod", "require-id", from(Peer{NotPrincipals: []string{"*"}}))},
			checks: []check{
				{sleep, web, 80, allowed}, {anon, web, 80, deniedBy("prod/require-id")},
				{nothing, db, 80, deniedBy("prod/require-id")},
			},
		},
		{
			name:     "notPrincipals with principals",
			policies: []Policy{allow("prod", "p", from(Peer{Principals: []string{"cluster.local/ns/prod/*"}, NotPrincipals: []string{"*/sa/admin-tools"}}))},
			checks: []check{
				{sleep, web, 80, allowedBy("prod/p")}, {admin, web, 80, notAllowed}, {devSleep, web, 80, notAllowed},
			},
		},
		{
			name:     "namespaces",
			policies: []Policy{allow("prod", "ns", from(Peer{Namespaces: []string{"prod"}}))},
			checks: []check{
				{sleep, web, 80, allowedBy("prod/ns")}, {devSleep, web, 80, notAllowed},
				{unit, web, 80, notAllowed}, {anon, web, 80, notAllowed},
			},
		},
		{
			name:     "namespace patterns",
			policies: []Policy{allow("prod", "ns", from(Peer{Namespaces: []string{"de*", "*od"}}))},
			checks:   []check{{sleep, web, 80, allowedBy("prod/ns")}, {devSleep, web, 80, allowedBy("prod/ns")}, {unit, web, 80, notAllowed}},
		},
		{
			name:     "notNamespaces",
			policies: []Policy{deny("prod", "not-dev", from(Peer{NotNamespaces: []string{"prod"}}))},
			checks: []check{
				{sleep, web, 80, allowed}, {devSleep, web, 80, deniedBy("prod/not-dev")},
				{anon, web, 80, deniedBy("prod/not-dev")}, {unit, web, 80, deniedBy("prod/not-dev")},
			},
		},
		{
			name:     "ipBlocks v4, v6, single addresses",
			policies: []Policy{allow("prod", "ip", from(Peer{IPBlocks: []string{"10.1.0.0/16", "fd00:5e::/32", "10.9.9.9"}}))},
			checks: []check{
				{sleep, web, 80, allowedBy("prod/ip")}, {admin, web, 80, allowedBy("prod/ip")},
				{anon, web, 80, allowedBy("prod/ip")}, {devSleep, web, 80, notAllowed},
				{nothing, web, 80, notAllowed}, {mapped, web, 80, allowedBy("prod/ip")},
			},
		},
		{
			name:     "single IPv6 address and mapped CIDR",
			policies: []Policy{allow("prod", "ip", from(Peer{IPBlocks: []string{"fd00:5e::5", "::ffff:10.2.0.0/112"}}))},
			checks: []check{
				{admin, web, 80, allowedBy("prod/ip")}, {devSleep, web, 80, allowedBy("prod/ip")},
				{sleep, web, 80, notAllowed},
			},
		},
		{
			name:     "notIpBlocks",
			policies: []Policy{deny("prod", "outside", from(Peer{NotIPBlocks: []string{"10.0.0.0/8"}}))},
			checks: []check{
				{sleep, web, 80, allowed}, {admin, web, 80, deniedBy("prod/outside")},
				{unit, web, 80, deniedBy("prod/outside")}, {nothing, web, 80, deniedBy("prod/outside")},
			},
		},
		{
			name:     "fields of one source all match",
			policies: []Policy{allow("prod", "and", from(Peer{Namespaces: []string{"prod"}, IPBlocks: []string{"10.1.0.0/16"}}))},
			checks: []check{
				{sleep, web, 80, allowedBy("prod/and")}, {admin, web, 80, notAllowed},
				{Source{ID: devSleep.ID, IP: sleep.IP}, web, 80, notAllowed},
			},
		},
		{
			name:     "sources and rules are alternatives",
			policies: []Policy{allow("prod", "or", from(Peer{Namespaces: []string{"dev"}}, Peer{IPBlocks: []string{"fd00::/8"}}), from(Peer{Principals: []string{"*client.service"}}))},
			checks: []check{
				{devSleep, web, 80, allowedBy("prod/or")}, {admin, web, 80, allowedBy("prod/or")},
				{unit, web, 80, allowedBy("prod/or")}, {sleep, web, 80, notAllowed},
			},
		},
		{
			name:     "ports",
			policies: []Policy{allow("prod", "ports", Rule{From: []Peer{{Namespaces: []string{"prod"}}}, To: []Operation{{Ports: []uint16{80, 443}}}})},
			checks: []check{
				{sleep, web, 80, allowedBy("prod/ports")}, {sleep, web, 443, allowedBy("prod/ports")},
				{sleep, web, 8080, notAllowed}, {sleep, web, 0, notAllowed}, {devSleep, web, 80, notAllowed},
			},
		},
		{
			name:     "notPorts",
			policies: []Policy{deny("prod", "admin-port", Rule{To: []Operation{{NotPorts: []uint16{80}}}})},
			checks: []check{
				{sleep, web, 80, allowed}, {sleep, web, 9000, deniedBy("prod/admin-port")},
				{sleep, web, 0, deniedBy("prod/admin-port")},
			},
		},
		{
			name:     "ports and notPorts in one operation, operations alternatives",
			policies: []Policy{allow("prod", "p", Rule{To: []Operation{{Ports: []uint16{80, 81}, NotPorts: []uint16{81}}, {Ports: []uint16{9090}}}})},
			checks: []check{
				{sleep, web, 80, allowedBy("prod/p")}, {sleep, web, 81, notAllowed},
				{sleep, web, 9090, allowedBy("prod/p")}, {sleep, web, 0, notAllowed},
			},
		},
		{
			name: "deny over allow",
			policies: []Policy{
				allow("prod", "all", Rule{}),
				deny("prod", "no-dev", from(Peer{Namespaces: []string{"dev"}})),
			},
			checks: []check{
				{sleep, web, 80, allowedBy("prod/all")}, {devSleep, web, 80, deniedBy("prod/no-dev")},
			},
		},
		{
			name: "one of several allow policies",
			policies: []Policy{
				sel(allow("prod", "a", from(Peer{Namespaces: []string{"dev"}})), "app", "web"),
				sel(allow("prod", "b", from(Peer{Principals: []string{"*/sa/sleep"}})), "tier", "front"),
			},
			checks: []check{
				{devSleep, web, 80, allowedBy("prod/a")}, {sleep, web, 80, allowedBy("prod/b")},
				{admin, web, 80, notAllowed}, {admin, db, 80, allowed},
			},
		},
		{
			name:     "selector mismatch",
			policies: []Policy{sel(allow("prod", "web-only", from(Peer{Namespaces: []string{"prod"}})), "app", "web", "tier", "back")},
			checks:   []check{{devSleep, web, 80, allowed}, {devSleep, db, 80, allowed}},
		},
		{
			name: "namespace policies stay in their namespace",
			policies: []Policy{
				allow("dev", "dev-only", from(Peer{Namespaces: []string{"dev"}})),
			},
			checks: []check{
				{sleep, devWeb, 80, notAllowed}, {devSleep, devWeb, 80, allowedBy("dev/dev-only")},
				{sleep, web, 80, allowed}, {sleep, unitWeb, 80, allowed},
			},
		},
		{
			name: "root namespace policy applies everywhere",
			policies: []Policy{
				sel(deny("istio-system", "no-anon", from(Peer{NotPrincipals: []string{"*"}})), "app", "web"),
				allow("istio-system", "mesh", from(Peer{Namespaces: []string{"prod", "dev"}})),
			},
			checks: []check{
				{anon, web, 80, deniedBy("istio-system/no-anon")}, {anon, devWeb, 80, deniedBy("istio-system/no-anon")},
				{anon, db, 80, notAllowed}, {sleep, devWeb, 80, allowedBy("istio-system/mesh")},
				{unit, db, 80, notAllowed},
			},
		},
		{
			name:     "configured root namespace",
			root:     "mesh-root",
			policies: []Policy{allow("mesh-root", "none"), allow("istio-system", "ignored")},
			checks:   []check{{sleep, web, 80, notAllowed}, {sleep, devWeb, 80, notAllowed}},
		},
		{
			name: "smesh.toml policies: workloads",
			policies: []Policy{
				{Name: "web", Action: Allow, Workloads: []spiffeid.ID{unitWeb.ID}, Rules: []Rule{from(Peer{Principals: []string{"smesh.local/node/b/*"}})}},
			},
			checks: []check{
				{unit, unitWeb, 80, allowedBy("web")}, {sleep, unitWeb, 80, notAllowed},
				{sleep, unitDB, 80, allowed},
			},
		},
		{
			name: "smesh.toml policies without workloads apply to all",
			policies: []Policy{
				{Name: "ssh", Action: Deny, Rules: []Rule{{From: []Peer{{NotIPBlocks: []string{"198.18.0.0/15"}}}, To: []Operation{{Ports: []uint16{22}}}}}},
			},
			checks: []check{
				{unit, unitWeb, 22, allowed}, {sleep, unitDB, 22, deniedBy("ssh")},
				{sleep, unitDB, 0, allowed}, {sleep, web, 22, deniedBy("ssh")},
			},
		},
		{
			name: "invalid denies only for its selector",
			policies: []Policy{
				sel(allow("prod", "l7", Rule{}), "app", "web"),
				{Namespace: "prod", Name: "custom", Action: "CUSTOM", Selector: map[string]string{"app": "db"}, Rules: []Rule{{}}},
			},
			checks: []check{
				{sleep, web, 80, allowedBy("prod/l7")},
				{sleep, db, 80, invalid("prod/custom")}, {sleep, devWeb, 80, allowed},
			},
		},
		{
			name: "invalid before deny and allow",
			policies: []Policy{
				allow("prod", "all", Rule{}),
				deny("prod", "dev", from(Peer{Namespaces: []string{"dev"}})),
				{Namespace: "prod", Name: "bad", Action: Allow, Invalid: "rules[0].to[0].operation.methods is not supported at L4", Rules: []Rule{{}}},
			},
			checks: []check{
				{sleep, web, 80, invalid("prod/bad")}, {devSleep, db, 80, invalid("prod/bad")},
				{sleep, devWeb, 80, allowed},
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := tc.root
			if root == "" {
				root = DefaultRootNamespace
			}
			s := NewSet(tc.policies, root)
			for _, d := range tc.checks {
				if got := s.Decide(d.src, d.dst, d.port); got != d.want {
					t.Errorf("Decide(%v %v -> %v:%d) = %+v, want %+v", d.src.ID, d.src.IP, d.dst.ID, d.port, got, d.want)
				}
			}
		})
	}
}

func TestInvalid(t *testing.T) {
	ok := allow("prod", "ok", Rule{})
	for _, tc := range []struct {
		p    Policy
		want string
	}{
		{Policy{Namespace: "prod", Name: "x", Action: "AUDIT"}, `action "AUDIT"`},
		{Policy{Namespace: "prod", Name: "x"}, `action ""`},
		{allow("prod", "x", from(Peer{IPBlocks: []string{"10.0.0.0/33"}})), `"10.0.0.0/33" is not an IP address or CIDR`},
		{allow("prod", "x", from(Peer{NotIPBlocks: []string{"fe80::1%eth0"}})), `"fe80::1%eth0"`},
		{allow("prod", "x", Rule{To: []Operation{{Ports: []uint16{0}}}}), "port 0"},
		{allow("prod", "x", Rule{To: []Operation{{NotPorts: []uint16{0}}}}), "port 0"},
		{allow("prod", "x", from(Peer{Principals: []string{""}})), "empty principal"},
		{Policy{Name: "x", Action: Allow, Workloads: []spiffeid.ID{{}}}, "workloads[0]"},
		{Policy{Namespace: "prod", Name: "x", Action: Deny, Invalid: "when is not supported"}, "when is not supported"},
	} {
		s := NewSet([]Policy{ok, tc.p}, DefaultRootNamespace)
		probs := s.Problems()
		if len(probs) != 1 || probs[0].Policy != tc.p.Key() || !strings.Contains(probs[0].Reason, tc.want) {
			t.Errorf("%+v: Problems() = %+v, want one for %s saying %q", tc.p, probs, tc.p.Key(), tc.want)
		}
		dst := web
		if tc.p.Namespace == "" {
			dst = unitWeb
		}
		if v := s.Decide(sleep, dst, 80); v != invalid(tc.p.Key()) {
			t.Errorf("%+v: Decide = %+v, want denied as invalid", tc.p, v)
		}
	}
	if p := NewSet([]Policy{ok}, "").Problems(); len(p) != 0 {
		t.Errorf("a valid policy has problems: %+v", p)
	}
}

// TestPortZero checks the promise to the BPF compiler: every port that
// Ports does not list decides as port 0.
func TestPortZero(t *testing.T) {
	ps := []Policy{
		allow("prod", "a", Rule{From: []Peer{{Namespaces: []string{"prod"}}}, To: []Operation{{Ports: []uint16{80, 443}}}}),
		deny("prod", "b", Rule{To: []Operation{{NotPorts: []uint16{80, 8080}}}, From: []Peer{{Principals: []string{"*/sa/admin-tools"}}}}),
		allow("dev", "c", Rule{To: []Operation{{Ports: []uint16{9999}}}}),
	}
	s := NewSet(ps, DefaultRootNamespace)
	if got, want := s.Ports(web), []uint16{80, 443, 8080}; !slices.Equal(got, want) {
		t.Fatalf("Ports(web) = %v, want %v", got, want)
	}
	if got := s.Ports(unitWeb); len(got) != 0 {
		t.Fatalf("Ports(unitWeb) = %v, want none", got)
	}
	named := s.Ports(web)
	for _, src := range []Source{sleep, devSleep, admin, anon, nothing} {
		zero := s.Decide(src, web, 0)
		for port := 1; port <= 65535; port++ {
			if slices.Contains(named, uint16(port)) {
				continue
			}
			if v := s.Decide(src, web, uint16(port)); v != zero {
				t.Fatalf("Decide(%v, web, %d) = %+v, but port 0 gives %+v", src.ID, port, v, zero)
			}
		}
	}
}

func TestSelectsDescribe(t *testing.T) {
	s := NewSet([]Policy{
		sel(allow("prod", "web", Rule{}), "app", "web"),
		{Namespace: "prod", Name: "bad", Action: "CUSTOM", Selector: map[string]string{"app": "db"}},
		allow("istio-system", "root", Rule{}),
	}, DefaultRootNamespace)
	if !s.Selects(web) || !s.Selects(db) || !s.Selects(devWeb) {
		t.Fatal("Selects misses a selected workload")
	}
	if NewSet(nil, "").Selects(web) {
		t.Fatal("an empty set selects")
	}
	b, err := json.Marshal(s.Describe(db))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"policy":"istio-system/root"`, `"meshWide":true`, `"policy":"prod/bad"`, `"invalid":"action \"CUSTOM\"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("Describe(db) = %s, missing %s", b, want)
		}
	}
	if strings.Contains(string(b), "prod/web") {
		t.Errorf("Describe(db) = %s, lists a policy not selecting db", b)
	}
	if s.Len() != 3 {
		t.Errorf("Len = %d", s.Len())
	}
}

func TestDecideAllocs(t *testing.T) {
	s := benchSet()
	n := testing.AllocsPerRun(100, func() {
		s.Decide(sleep, web, 8080)
		s.Decide(anon, db, 0)
	})
	if n != 0 {
		t.Fatalf("Decide allocates %v times", n)
	}
}

// benchSet is a realistic busy namespace: 100 policies, a third selecting
// web.
func benchSet() *Set {
	var ps []Policy
	ps = append(ps, deny("istio-system", "require-id", from(Peer{NotPrincipals: []string{"*"}, NotIPBlocks: []string{"10.9.0.0/16"}})))
	for i := range 100 {
		app := []string{"web", "db", "cache"}[i%3]
		ps = append(ps, sel(allow("prod", "p"+string(rune('a'+i%26))+string(rune('a'+i/26)), Rule{
			From: []Peer{{Principals: []string{"cluster.local/ns/other/sa/x", "cluster.local/ns/prod/sa/y*"}}, {Namespaces: []string{"team-*"}}},
			To:   []Operation{{Ports: []uint16{uint16(1000 + i)}}},
		}), "app", app))
	}
	ps = append(ps, sel(allow("prod", "sleep", Rule{From: []Peer{{Principals: []string{"*/sa/sleep"}}}, To: []Operation{{Ports: []uint16{8080}}}}), "app", "web"))
	return NewSet(ps, DefaultRootNamespace)
}

func BenchmarkDecide(b *testing.B) {
	s := benchSet()
	b.ReportAllocs()
	for b.Loop() {
		if !s.Decide(sleep, web, 8080).Allow {
			b.Fatal("denied")
		}
	}
}

func BenchmarkDecideDenied(b *testing.B) {
	s := benchSet()
	b.ReportAllocs()
	for b.Loop() {
		if s.Decide(devSleep, web, 9).Allow {
			b.Fatal("allowed")
		}
	}
}
