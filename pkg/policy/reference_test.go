package policy

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// reference decides as the semantics read, policy by policy, with none of
// Set's compilation and index: TestAgainstReference compares the two.
func reference(ps []Policy, root string, src Source, dst Workload, port uint16) Verdict {
	applies := func(p Policy) bool {
		if p.Namespace != "" && p.Namespace != root && (dst.Namespace == "" || p.Namespace != dst.Namespace) {
			return false
		}
		for k, v := range p.Selector {
			if got, ok := dst.Labels[k]; !ok || got != v {
				return false
			}
		}
		return len(p.Workloads) == 0 || slices.Contains(p.Workloads, dst.ID)
	}
	principal := strings.TrimPrefix(src.ID.String(), "spiffe://")
	ns := ""
	if parts := strings.Split(src.ID.Path(), "/"); len(parts) > 2 && parts[1] == "ns" {
		ns = parts[2]
	}
	one := func(pat, v string) bool {
		switch {
		case v == "":
			return false
		case pat == "*":
			return true
		case strings.HasPrefix(pat, "*"):
			return strings.HasSuffix(v, pat[1:])
		case strings.HasSuffix(pat, "*"):
			return strings.HasPrefix(v, pat[:len(pat)-1])
		}
		return v == pat
	}
	anyOf := func(pats []string, v string, trim bool) bool {
		for _, p := range pats {
			if trim {
				p = strings.TrimPrefix(p, "spiffe://")
			}
			if one(p, v) {
				return true
			}
		}
		return false
	}
	inBlock := func(blocks []string) bool {
		ip := src.IP.Unmap()
		for _, b := range blocks {
			pr, err := netip.ParsePrefix(b)
			if err != nil {
				a := netip.MustParseAddr(b)
				pr = netip.PrefixFrom(a, a.BitLen())
			}
			// A v4-mapped CIDR means the IPv4 one (sources are unmapped).
			if pr.Addr().Is4In6() && pr.Bits() >= 96 {
				pr = netip.PrefixFrom(pr.Addr().Unmap(), pr.Bits()-96)
			}
			if ip.IsValid() && pr.Contains(ip) {
				return true
			}
		}
		return false
	}
	peerOK := func(f Peer) bool {
		return (len(f.Principals) == 0 || anyOf(f.Principals, principal, true)) && !anyOf(f.NotPrincipals, principal, true) &&
			(len(f.Namespaces) == 0 || anyOf(f.Namespaces, ns, false)) && !anyOf(f.NotNamespaces, ns, false) &&
			(len(f.IPBlocks) == 0 || inBlock(f.IPBlocks)) && !inBlock(f.NotIPBlocks)
	}
	ruleOK := func(r Rule) bool {
		from := len(r.From) == 0
		for _, f := range r.From {
			from = from || peerOK(f)
		}
		to := len(r.To) == 0
		for _, o := range r.To {
			to = to || ((len(o.Ports) == 0 || slices.Contains(o.Ports, port)) && !slices.Contains(o.NotPorts, port))
		}
		return from && to
	}
	matches := func(p Policy) bool {
		return slices.ContainsFunc(p.Rules, ruleOK)
	}
	for _, p := range ps {
		if p.Action == Deny && applies(p) && matches(p) {
			return Verdict{Policy: p.Key(), Reason: ReasonDenied}
		}
	}
	selected := false
	for _, p := range ps {
		if p.Action == Allow && applies(p) {
			if matches(p) {
				return Verdict{Allow: true, Policy: p.Key()}
			}
			selected = true
		}
	}
	if selected {
		return Verdict{Reason: ReasonNotAllowed}
	}
	return Verdict{Allow: true}
}

// TestAgainstReference decides random connections under random valid
// policy sets, small (Decide scans the selectors) and large (it goes
// through the label index), both ways.
func TestAgainstReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(25, 1))
	pick := func(vs ...string) string { return vs[rng.IntN(len(vs))] }
	some := func(n int, gen func() string) []string {
		var out []string
		for range rng.IntN(n + 1) {
			out = append(out, gen())
		}
		return out
	}
	namespaces := []string{"prod", "dev", "istio-system", ""}
	principal := func() string {
		return pick("cluster.local/ns/prod/sa/sleep", "spiffe://cluster.local/ns/dev/sa/sleep", "cluster.local/ns/prod/*", "*/sa/web", "*", "smesh.local/node/b/*")
	}
	nsPat := func() string { return pick("prod", "dev", "d*", "*od", "*") }
	block := func() string {
		return pick("10.0.0.0/8", "10.1.0.5", "fd00::/8", "fd00:5e::5", "198.18.0.0/15", "::ffff:10.2.0.0/112")
	}
	ports := func() []uint16 {
		var out []uint16
		for range rng.IntN(3) {
			out = append(out, []uint16{80, 443, 22, 8080}[rng.IntN(4)])
		}
		return out
	}
	labels := func() map[string]string {
		m := map[string]string{}
		for range rng.IntN(3) {
			m[pick("app", "tier", "version")] = pick("web", "db", "v1")
		}
		return m
	}
	srcs := []Source{sleep, devSleep, admin, unit, anon, nothing, mapped}
	var dsts []Workload
	for range 20 {
		ns := pick(namespaces[:3]...)
		dsts = append(dsts, Workload{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/" + ns + "/sa/" + pick("web", "db")), Namespace: ns, Labels: labels()})
	}
	dsts = append(dsts, unitWeb, unitDB)

	seen := map[string]int{}
	for round := range 300 {
		n := 1 + rng.IntN(4)
		if round%3 == 0 {
			n = 30 + rng.IntN(40)
		}
		var ps []Policy
		for i := range n {
			p := Policy{Name: fmt.Sprint("p", i), Namespace: pick(namespaces...), Action: Action(pick("ALLOW", "DENY", "DENY", "ALLOW", "ALLOW"))}
			if rng.IntN(4) > 0 {
				p.Selector = labels()
			}
			if p.Namespace == "" && rng.IntN(2) == 0 {
				p.Workloads = []spiffeid.ID{pick2(rng, unitWeb.ID, unitDB.ID, web.ID)}
			}
			for range rng.IntN(3) {
				var r Rule
				for range rng.IntN(3) {
					r.From = append(r.From, Peer{
						Principals: some(1, principal), NotPrincipals: some(1, principal),
						Namespaces: some(1, nsPat), NotNamespaces: some(1, nsPat),
						IPBlocks: some(1, block), NotIPBlocks: some(1, block),
					})
				}
				for range rng.IntN(2) {
					r.To = append(r.To, Operation{Ports: ports(), NotPorts: ports()})
				}
				p.Rules = append(p.Rules, r)
			}
			ps = append(ps, p)
		}
		s := NewSet(ps, DefaultRootNamespace)
		if probs := s.Problems(); len(probs) > 0 {
			t.Fatalf("generated invalid policies: %+v", probs)
		}
		for _, dst := range dsts {
			for _, src := range srcs {
				for _, port := range []uint16{0, 22, 80, 443, 8080, 9} {
					got, want := s.Decide(src, dst, port), reference(ps, DefaultRootNamespace, src, dst, port)
					seen[fmt.Sprintf("%v %v %s", got.Allow, got.Policy != "", got.Reason)]++
					if got != want {
						t.Fatalf("round %d: Decide(%v %v, %v %v, %d) = %+v, reference %+v\npolicies: %+v", round, src.ID, src.IP, dst.ID, dst.Labels, port, got, want, ps)
					}
				}
			}
		}
	}
	// Every kind of verdict came up, each more than rarely.
	for _, k := range []string{"true false ", "true true ", "false true denied_by_policy", "false false not_allowed"} {
		if seen[k] < 100 {
			t.Errorf("verdict %q seen %d times: %v", k, seen[k], seen)
		}
	}
	t.Logf("verdicts: %v", seen)
}

func pick2(rng *rand.Rand, ids ...spiffeid.ID) spiffeid.ID { return ids[rng.IntN(len(ids))] }
