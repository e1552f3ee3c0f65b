package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultRootNamespace is Istio's default root namespace: its policies
// apply to the workloads of every namespace.
const DefaultRootNamespace = "istio-system"

// Set is a compiled, immutable set of policies. It is safe for concurrent
// use; a change of policies makes a new Set.
type Set struct {
	// meshWide holds the policies of the root namespace and those without
	// a namespace (smesh.toml); byNamespace the others. Decide looks at
	// both for a destination, so that a namespace's policies cost
	// nothing to the workloads of other namespaces.
	meshWide    bucket
	byNamespace map[string]*bucket
	problems    []Problem
}

// bucket is the policies of one namespace, arranged for Decide.
type bucket struct {
	all     []*compiled // in the order given to NewSet
	invalid []*compiled // checked first: they deny whatever else matches
	// Valid policies: those without selector labels apply to every
	// workload (of the namespace, or listed in workloads); those with
	// are also indexed by their first label, so that a namespace of
	// many policies costs a destination a lookup per label it carries
	// instead of a selector match per policy.
	unlabelled []*compiled
	labelled   []*compiled
	byLabel    map[label][]*compiled
}

func (b *bucket) add(c *compiled) {
	b.all = append(b.all, c)
	switch {
	case c.invalid:
		b.invalid = append(b.invalid, c)
	case len(c.selector) == 0:
		b.unlabelled = append(b.unlabelled, c)
	default:
		b.labelled = append(b.labelled, c)
		if b.byLabel == nil {
			b.byLabel = make(map[label][]*compiled)
		}
		b.byLabel[c.selector[0]] = append(b.byLabel[c.selector[0]], c)
	}
}

type compiled struct {
	order     int    // in the list given to NewSet: the first matching policy decides
	key       string // "namespace/name", or "name"
	src       *Policy
	selector  []label // sorted by key: iterating a map costs more than the whole match
	workloads []spiffeid.ID
	meshWide  bool
	action    Action
	invalid   bool
	rules     []rule
}

type label struct{ key, value string }

type rule struct {
	from []peer
	to   []operation
}

type peer struct {
	principals, notPrincipals []pattern
	namespaces, notNamespaces []pattern
	ipBlocks, notIPBlocks     []netip.Prefix
}

type operation struct {
	ports, notPorts []uint16
}

type patternKind uint8

const (
	exact patternKind = iota
	prefix
	suffix
	present
)

// pattern is one of Istio's string matches.
type pattern struct {
	kind patternKind
	s    string
}

func newPattern(v string) pattern {
	switch {
	case v == "*":
		return pattern{kind: present}
	case strings.HasPrefix(v, "*"):
		return pattern{kind: suffix, s: v[1:]}
	case strings.HasSuffix(v, "*"):
		return pattern{kind: prefix, s: v[:len(v)-1]}
	}
	return pattern{kind: exact, s: v}
}

// match reports whether v, a source's principal or namespace, matches; ""
// (a source without one) matches nothing, not even "*".
func (p pattern) match(v string) bool {
	if v == "" {
		return false
	}
	switch p.kind {
	case present:
		return true
	case prefix:
		return strings.HasPrefix(v, p.s)
	case suffix:
		return strings.HasSuffix(v, p.s)
	}
	return v == p.s
}

func matchAny(ps []pattern, v string) bool {
	for _, p := range ps {
		if p.match(v) {
			return true
		}
	}
	return false
}

// NewSet compiles ps, which it keeps for Describe: ps must not change
// afterwards. It never fails: a policy it cannot enforce as written
// denies everything to the workloads it selects and is listed by Problems.
// rootNamespace is Istio's root namespace ("" for none); its policies apply
// to every workload.
func NewSet(ps []Policy, rootNamespace string) *Set {
	s := &Set{byNamespace: make(map[string]*bucket)}
	for i := range ps {
		p := &ps[i]
		c := compile(p)
		c.order = i
		c.meshWide = p.Namespace == "" || p.Namespace == rootNamespace
		if c.invalid {
			s.problems = append(s.problems, Problem{Policy: c.key, Reason: c.src.Invalid})
		}
		b := &s.meshWide
		if !c.meshWide {
			if b = s.byNamespace[p.Namespace]; b == nil {
				b = &bucket{}
				s.byNamespace[p.Namespace] = b
			}
		}
		b.add(c)
	}
	return s
}

// Key names p as verdicts and metrics do: "namespace/name", or "name" when
// it has no namespace.
func (p *Policy) Key() string {
	if p.Namespace == "" {
		return p.Name
	}
	return p.Namespace + "/" + p.Name
}

func compile(p *Policy) *compiled {
	c := &compiled{key: p.Key(), workloads: p.Workloads, action: p.Action}
	for k, v := range p.Selector {
		c.selector = append(c.selector, label{k, v})
	}
	slices.SortFunc(c.selector, func(a, b label) int { return strings.Compare(a.key, b.key) })
	var why []string
	if p.Invalid != "" {
		why = append(why, p.Invalid)
	}
	switch p.Action {
	case Allow, Deny:
	default:
		why = append(why, fmt.Sprintf("action %q is not supported (want ALLOW or DENY)", string(p.Action)))
	}
	for i, id := range p.Workloads {
		if id.IsZero() {
			why = append(why, fmt.Sprintf("workloads[%d] is not a SPIFFE ID", i))
			// What it meant to select is unknown: deny to every workload.
			c.workloads = nil
		}
	}
	for i, r := range p.Rules {
		var cr rule
		for j, f := range r.From {
			at := fmt.Sprintf("rules[%d].from[%d]", i, j)
			var cp peer
			cp.principals = principals(f.Principals)
			cp.notPrincipals = principals(f.NotPrincipals)
			cp.namespaces = patterns(f.Namespaces)
			cp.notNamespaces = patterns(f.NotNamespaces)
			for _, l := range [][]string{f.Principals, f.NotPrincipals, f.Namespaces, f.NotNamespaces} {
				if slices.Contains(l, "") {
					why = append(why, at+": an empty principal or namespace")
					break
				}
			}
			var bad []string
			cp.ipBlocks, bad = blocks(f.IPBlocks)
			nb, bad2 := blocks(f.NotIPBlocks)
			cp.notIPBlocks = nb
			for _, b := range append(bad, bad2...) {
				why = append(why, fmt.Sprintf("%s: %q is not an IP address or CIDR", at, b))
			}
			cr.from = append(cr.from, cp)
		}
		for j, t := range r.To {
			if slices.Contains(t.Ports, 0) || slices.Contains(t.NotPorts, 0) {
				why = append(why, fmt.Sprintf("rules[%d].to[%d]: port 0 (want 1 to 65535)", i, j))
			}
			cr.to = append(cr.to, operation{ports: t.Ports, notPorts: t.NotPorts})
		}
		c.rules = append(c.rules, cr)
	}
	cp := *p
	c.src = &cp
	if len(why) > 0 {
		c.invalid = true
		c.rules = nil
		cp.Invalid = strings.Join(why, "; ")
	}
	return c
}

func patterns(vs []string) []pattern {
	var ps []pattern
	for _, v := range vs {
		ps = append(ps, newPattern(v))
	}
	return ps
}

// principals accepts Istio's form and the full spiffe:// one.
func principals(vs []string) []pattern {
	var ps []pattern
	for _, v := range vs {
		ps = append(ps, newPattern(strings.TrimPrefix(v, "spiffe://")))
	}
	return ps
}

func blocks(vs []string) (ps []netip.Prefix, bad []string) {
	for _, v := range vs {
		if p, err := netip.ParsePrefix(v); err == nil && p.Addr().Zone() == "" {
			ps = append(ps, unmapPrefix(p).Masked())
		} else if a, err := netip.ParseAddr(v); err == nil && a.Zone() == "" {
			a = a.Unmap()
			ps = append(ps, netip.PrefixFrom(a, a.BitLen()))
		} else {
			bad = append(bad, v)
		}
	}
	return ps, bad
}

// unmapPrefix makes ::ffff:a.b.c.d/N (N >= 96) the IPv4 prefix it means, as
// sources are matched by their unmapped address.
func unmapPrefix(p netip.Prefix) netip.Prefix {
	if p.Addr().Is4In6() && p.Bits() >= 96 {
		return netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	return p
}

func (c *compiled) selects(dst *Workload) bool { return c.selectsFrom(dst, 0) }

// selectsFrom is selects knowing that dst carries the first known labels
// of the selector (found through the index).
func (c *compiled) selectsFrom(dst *Workload, known int) bool {
	for _, l := range c.selector[known:] {
		if got, ok := dst.Labels[l.key]; !ok || got != l.value {
			return false
		}
	}
	if len(c.workloads) > 0 && !slices.Contains(c.workloads, dst.ID) {
		return false
	}
	return true
}

// principal and namespace are what a source's identity matches.
func principalOf(id spiffeid.ID) string {
	return strings.TrimPrefix(id.String(), "spiffe://")
}

func namespaceOf(id spiffeid.ID) string {
	rest, ok := strings.CutPrefix(id.Path(), "/ns/")
	if !ok {
		return ""
	}
	ns, _, _ := strings.Cut(rest, "/")
	return ns
}

type request struct {
	principal, namespace string
	ip                   netip.Addr
	port                 uint16
}

func (c *compiled) matches(r *request) bool {
	for i := range c.rules {
		if c.rules[i].matches(r) {
			return true
		}
	}
	return false
}

func (ru *rule) matches(r *request) bool {
	// The port first: comparing numbers is cheaper than matching strings.
	if len(ru.to) > 0 {
		ok := false
		for i := range ru.to {
			if ru.to[i].matches(r.port) {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	if len(ru.from) == 0 {
		return true
	}
	for i := range ru.from {
		if ru.from[i].matches(r) {
			return true
		}
	}
	return false
}

func (p *peer) matches(r *request) bool {
	if len(p.principals) > 0 && !matchAny(p.principals, r.principal) {
		return false
	}
	if matchAny(p.notPrincipals, r.principal) {
		return false
	}
	if len(p.namespaces) > 0 && !matchAny(p.namespaces, r.namespace) {
		return false
	}
	if matchAny(p.notNamespaces, r.namespace) {
		return false
	}
	if len(p.ipBlocks) > 0 && !inBlocks(p.ipBlocks, r.ip) {
		return false
	}
	if inBlocks(p.notIPBlocks, r.ip) {
		return false
	}
	return true
}

func inBlocks(bs []netip.Prefix, ip netip.Addr) bool {
	if !ip.IsValid() {
		return false
	}
	for _, b := range bs {
		if b.Contains(ip) {
			return true
		}
	}
	return false
}

func (o *operation) matches(port uint16) bool {
	if len(o.ports) > 0 && !slices.Contains(o.ports, port) {
		return false
	}
	return !slices.Contains(o.notPorts, port)
}

// Decide says whether src may connect to port of dst, as Istio would: an
// invalid policy selecting dst denies; then any matching DENY policy
// denies; then, if ALLOW policies select dst, one of them must match;
// otherwise the connection is allowed. Port 0 stands for every port that
// no rule names (rules never name port 0), so that a compiler can
// enumerate Ports(dst) and port 0. It does not allocate.
func (s *Set) Decide(src Source, dst Workload, port uint16) Verdict {
	r := request{
		principal: principalOf(src.ID),
		namespace: namespaceOf(src.ID),
		ip:        src.IP.Unmap(),
		port:      port,
	}
	var local *bucket
	if dst.Namespace != "" { // only mesh-wide policies apply to systemd workloads
		local = s.byNamespace[dst.Namespace]
	}
	buckets := [2]*bucket{&s.meshWide, local}
	// Invalid policies first, so that the reason does not depend on the
	// order of the policies.
	for _, b := range buckets {
		if b == nil {
			continue
		}
		for _, c := range b.invalid {
			if c.selects(&dst) {
				return Verdict{Policy: c.key, Reason: ReasonInvalid}
			}
		}
	}
	d := decision{r: &r, dst: &dst}
	for _, b := range buckets {
		if b == nil {
			continue
		}
		for _, c := range b.unlabelled {
			d.consider(c, 0)
		}
		if len(b.labelled) <= len(dst.Labels) {
			for _, c := range b.labelled {
				d.consider(c, 0)
			}
			continue
		}
		for k, v := range dst.Labels {
			for _, c := range b.byLabel[label{k, v}] {
				d.consider(c, 1)
			}
		}
	}
	switch {
	case d.denied != nil:
		return Verdict{Policy: d.denied.key, Reason: ReasonDenied}
	case d.allowed != nil:
		return Verdict{Allow: true, Policy: d.allowed.key}
	case d.selected:
		return Verdict{Reason: ReasonNotAllowed}
	}
	return Verdict{Allow: true}
}

// decision gathers, over the policies that may apply, the first (in the
// order given to NewSet) matching DENY and ALLOW policies, whatever order
// the index visits them in.
type decision struct {
	r               *request
	dst             *Workload
	denied, allowed *compiled
	selected        bool // an ALLOW policy applies
}

// consider looks at c, whose first known selector labels dst carries.
func (d *decision) consider(c *compiled, known int) {
	if !c.selectsFrom(d.dst, known) {
		return
	}
	if c.action == Deny {
		if (d.denied == nil || c.order < d.denied.order) && c.matches(d.r) {
			d.denied = c
		}
		return
	}
	d.selected = true
	if (d.allowed == nil || c.order < d.allowed.order) && c.matches(d.r) {
		d.allowed = c
	}
}

// selecting lists the policies that apply to dst: mesh-wide ones first,
// otherwise in the order given to NewSet.
func (s *Set) selecting(dst *Workload) []*compiled {
	var out []*compiled
	lists := [2][]*compiled{s.meshWide.all}
	if b := s.byNamespace[dst.Namespace]; b != nil && dst.Namespace != "" {
		lists[1] = b.all
	}
	for _, l := range lists {
		for _, c := range l {
			if c.selects(dst) {
				out = append(out, c)
			}
		}
	}
	return out
}

// Selects reports whether any policy, invalid ones included, applies to
// dst.
func (s *Set) Selects(dst Workload) bool {
	return len(s.selecting(&dst)) > 0
}

// Ports lists, sorted, the ports named by ports or notPorts of the
// policies that apply to dst. Every other port decides as port 0.
func (s *Set) Ports(dst Workload) []uint16 {
	var ports []uint16
	for _, c := range s.selecting(&dst) {
		for _, r := range c.rules {
			for _, o := range r.to {
				ports = append(ports, o.ports...)
				ports = append(ports, o.notPorts...)
			}
		}
	}
	slices.Sort(ports)
	return slices.Compact(ports)
}

// Problems lists the invalid policies and why, in the order given to
// NewSet.
func (s *Set) Problems() []Problem {
	return slices.Clone(s.problems)
}

// Described is one policy applying to a workload, as /debug/policy shows
// it.
type Described struct {
	Name string `json:"policy"`
	// MeshWide: from the root namespace or smesh.toml.
	MeshWide bool    `json:"meshWide,omitempty"`
	Spec     *Policy `json:"spec"`
}

// Describe returns the policies that apply to dst ([]Described), for
// /debug/policy.
func (s *Set) Describe(dst Workload) any {
	out := []Described{}
	for _, c := range s.selecting(&dst) {
		out = append(out, Described{Name: c.key, MeshWide: c.meshWide, Spec: c.src})
	}
	return out
}

// Len is the number of policies in the set.
func (s *Set) Len() int {
	n := len(s.meshWide.all)
	for _, b := range s.byNamespace {
		n += len(b.all)
	}
	return n
}
