package daemon

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/time/rate"

	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/metrics"
	"github.com/smesh-dev/smesh/pkg/policy"
	"github.com/smesh-dev/smesh/pkg/tunnel"
)

// policies enforces the authorization policies in force (docs/identity.md
// 4 and 5) on both paths: the tunnel server asks authorize for every
// tunnelled connection, and compile turns the set into connect4/6's
// same-node verdicts (datapath.SetPolicy) whenever the policies, the
// identities or the workloads' addresses change (runAddrIDs).
//
// Both read immutable snapshots through atomic pointers: a decision on
// the tunnel's path takes no lock and allocates nothing.
type policies struct {
	log zerolog.Logger
	set atomic.Pointer[policy.Set]
	// dsts are this node's workloads by address (smesh_addr_ids'
	// addresses): the destinations policy applies to.
	dsts atomic.Pointer[map[netip.Addr]policy.Workload]
	// dstPorts are this node's workloads by (address, port) in a
	// namespace shared by several ([[capture.workloads]] ports): the
	// destinations an address alone does not name.
	dstPorts atomic.Pointer[map[netip.AddrPort]policy.Workload]

	// compiled is closed once the first compile put its verdicts (or
	// tried to) and the tunnel's destinations in force.
	compiled     chan struct{}
	compiledOnce sync.Once

	// Denials logged at most this often (a burst of 5, then 1 a second):
	// a client retrying in a loop must not flood the journal.
	logLimit *rate.Limiter

	mu sync.Mutex
	// numbers give each (policy, reason) a uint16 for BPF's per-policy
	// counters; 0 is a policed destination no entry matched (none, as
	// compile writes an entry for every source). Kept across compiles so
	// that the counters keep their names.
	numbers map[denial]uint16
	names   []denial // by number
	tunnel  map[denial]uint64
	// Of the last compile, for /debug/policy.
	entries   int
	compileAt time.Time
	written   []datapath.PolicyEntry // in force in smesh_policy (compile's order)
	wrote     bool                   // written holds what is in force
	problems  []string
	compErr   string
}

// denial is a counter's labels.
type denial struct{ policy, reason string }

func newPolicies(cfg config.Config, log zerolog.Logger) *policies {
	p := &policies{log: log.With().Str("component", "policy").Logger(),
		logLimit: rate.NewLimiter(1, 5),
		numbers:  map[denial]uint16{}, names: []denial{{"", policy.ReasonNotAllowed}},
		tunnel: map[denial]uint64{}, compiled: make(chan struct{})}
	p.set.Store(setOf(cfg))
	empty := map[netip.Addr]policy.Workload{}
	p.dsts.Store(&empty)
	emptyPorts := map[netip.AddrPort]policy.Workload{}
	p.dstPorts.Store(&emptyPorts)
	return p
}

// setOf is the policy set of smesh.toml's [[policy]] tables.
func setOf(cfg config.Config) *policy.Set {
	return policy.NewSet(config.ToPolicies(cfg.Policies), cfg.Kubernetes.PolicyRootNamespace)
}

// authorize is the tunnel server's Authorize: the destination address
// names a workload of this node, or the address and port do (a
// [[capture.workloads]] port of a namespace shared by several, the node's
// own: a systemd unit), or no policy applies (Istio enforces on workloads
// in the mesh only: a destination that is no workload, such as a port of
// the node's own address no workload claims, is allowed).
func (p *policies) authorize(src tunnel.Source, dst netip.AddrPort) (string, bool) {
	set := p.set.Load()
	if set.Len() == 0 {
		return "", true
	}
	w, ok := (*p.dsts.Load())[dst.Addr().Unmap()]
	if !ok {
		w, ok = (*p.dstPorts.Load())[netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())]
	}
	if !ok {
		return "", true
	}
	v := set.Decide(policy.Source{ID: src.Workload, IP: src.Addr}, w, dst.Port())
	if v.Allow {
		return v.Policy, true
	}
	p.mu.Lock()
	p.tunnel[denial{v.Policy, v.Reason}]++
	p.mu.Unlock()
	if p.logLimit.Allow() {
		p.log.Warn().Str("path", metrics.PolicyPathTunnel).Str("source_node", src.Node.String()).
			Str("source", idString(src.Workload)).Str("source_addr", src.Addr.String()).
			Str("destination", w.ID.String()).Str("dst", dst.String()).
			Str("policy", v.Policy).Str("reason", v.Reason).Msg("connection denied by authorization policy")
	}
	return v.Policy, false
}

func idString(id spiffeid.ID) string {
	if id.IsZero() {
		return ""
	}
	return id.String()
}

// number is the counter number of (policy, reason); under p.mu.
func (p *policies) number(v policy.Verdict) uint16 {
	if v.Allow {
		return 0
	}
	d := denial{v.Policy, v.Reason}
	if n, ok := p.numbers[d]; ok {
		return n
	}
	if len(p.names) > 0xffff {
		return 0 // counted as "no entry": never wrong about allowing
	}
	n := uint16(len(p.names))
	p.numbers[d] = n
	p.names = append(p.names, d)
	return n
}

// localWorkload is a destination identity of this node as compile sees
// it: its workloads (one per distinct namespace and labels: in Kubernetes
// the pods of one service account may carry different labels) and the
// addresses of its own namespaces.
type localWorkload struct {
	num      uint32
	id       spiffeid.ID
	variants []policy.Workload
	addrs    []netip.Addr // of its own namespaces (smesh_addr_ids)
}

func sameWorkload(a, b policy.Workload) bool {
	return a.ID == b.ID && a.Namespace == b.Namespace && maps.Equal(a.Labels, b.Labels)
}

// compile computes the same-node verdicts of set for this node's
// identities (every number the daemon gave, and 0 for a caller no
// workload names) and destination workloads (addrs, smesh_addr_ids; wls
// says what each address's workload is to policy, for Kubernetes pods;
// otherwise just its identity), and the address -> workload map of the
// tunnel path.
//
// A destination is policed when any policy selects it; then every source
// and every port the policies name, and port 0 (any other port), get the
// verdict Decide gives. ipBlocks: a same-node connect comes from the
// source namespace's address, so each of that identity's namespace
// addresses is decided; when they disagree the entry denies and the
// problem is reported (/debug/policy). A source with no namespace of its
// own (the node's namespace, shared) is decided without an address.
//
// connect4/6 know a destination by its identity number only: pods of one
// identity whose labels the policies treat differently cannot be told
// apart there, so every connection to that identity on the same node is
// denied (fail closed, reported); the tunnel path decides per pod.
func (p *policies) compile(set *policy.Set, names map[uint32]spiffeid.ID, addrs map[netip.Addr]uint32, wls map[netip.Addr]policy.Workload) ([]datapath.PolicyEntry, map[netip.Addr]policy.Workload, []string) {
	entries, dsts, _, problems := p.compilePorts(set, names, addrs, nil, wls)
	return entries, dsts, problems
}

// compilePorts is compile with the destinations known by (address, port)
// too (ports, [[capture.workloads]] ports: smesh_port_ids by address): they
// are policed like the others (their identity's entries) and returned, by
// address and port, for the tunnel path. Such a workload's addresses are
// the node's, not its own: they are not its source addresses (ipBlocks).
func (p *policies) compilePorts(set *policy.Set, names map[uint32]spiffeid.ID, addrs map[netip.Addr]uint32, ports map[netip.AddrPort]uint32,
	wls map[netip.Addr]policy.Workload) ([]datapath.PolicyEntry, map[netip.Addr]policy.Workload, map[netip.AddrPort]policy.Workload, []string) {
	byNum := make(map[uint32]*localWorkload)
	for n, id := range names {
		byNum[n] = &localWorkload{num: n, id: id}
	}
	dstPorts := make(map[netip.AddrPort]policy.Workload, len(ports))
	for ap, n := range ports {
		lw := byNum[n]
		if lw == nil {
			continue
		}
		w := policy.Workload{ID: lw.id}
		if !slices.ContainsFunc(lw.variants, func(v policy.Workload) bool { return sameWorkload(v, w) }) {
			lw.variants = append(lw.variants, w)
		}
		dstPorts[ap] = w
	}
	dsts := make(map[netip.Addr]policy.Workload, len(addrs))
	for a, n := range addrs {
		lw := byNum[n]
		if lw == nil {
			continue // a number no longer named: no workload
		}
		w, ok := wls[a]
		if !ok || w.ID != lw.id {
			w = policy.Workload{ID: lw.id}
		}
		lw.addrs = append(lw.addrs, a)
		if !slices.ContainsFunc(lw.variants, func(v policy.Workload) bool { return sameWorkload(v, w) }) {
			lw.variants = append(lw.variants, w)
		}
		dsts[a] = w
	}
	nums := slices.Sorted(mapKeysU(byNum))
	sources := append([]uint32{datapath.UnknownIdentity}, nums...)
	var entries []datapath.PolicyEntry
	var problems []string
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, dn := range nums {
		dst := byNum[dn]
		policed := false
		ports := []uint16{0}
		for _, v := range dst.variants {
			if set.Selects(v) {
				policed = true
				ports = append(ports, set.Ports(v)...)
			}
		}
		if !policed {
			continue // not reachable by address here, or not policed
		}
		slices.Sort(ports)
		ports = slices.Compact(ports)
		var mine []datapath.PolicyEntry
		exact := true
		for _, sn := range sources {
			var src policy.Source
			var ips []netip.Addr
			if sn != datapath.UnknownIdentity {
				src.ID = byNum[sn].id
				ips = byNum[sn].addrs
			}
			for _, port := range ports {
				var first policy.Verdict
				for i, w := range dst.variants {
					v, ambiguous := decideAll(set, src, ips, w, port)
					if ambiguous {
						problems = append(problems, fmt.Sprintf("source %s to %s port %d: its addresses %v decide differently (ipBlocks): denied on the same node",
							src.ID, dst.id, port, ips))
					}
					if i == 0 {
						first = v
					} else if v.Allow != first.Allow {
						exact = false
					}
				}
				mine = append(mine, datapath.PolicyEntry{Dst: dn, Src: sn, Port: port, Allow: first.Allow, Policy: p.number(first)})
			}
		}
		if !exact {
			problems = append(problems, fmt.Sprintf("destination %s: its pods on this node carry labels the policies treat differently, "+
				"which connect4/6 cannot tell apart (they know the identity only): every same-node connection to it is denied", dst.id))
			for i := range mine {
				mine[i].Allow, mine[i].Policy = false, 0
			}
		}
		entries = append(entries, mine...)
	}
	return entries, dsts, dstPorts, problems
}

// noDestination reports the workloads of smesh.toml ([[capture.workloads]],
// [capture] cgroups) that a policy selects but that neither path can tell
// a connection is for: no namespace of their own (no address names them)
// and no ports claimed (the node's namespace, shared by every unit). Their
// policies protect nothing; said rather than left silent.
func noDestination(set *policy.Set, view []IdentityEntry, addrs map[netip.Addr]uint32, ports map[datapath.PortKey]uint32) []string {
	known := make(map[uint32]bool)
	for _, n := range addrs {
		known[n] = true
	}
	for _, n := range ports {
		known[n] = true
	}
	var out []string
	seen := make(map[uint32]bool)
	for _, e := range view {
		if e.From == "pod" || e.Number == 0 || known[e.Number] || seen[e.Number] {
			continue
		}
		id, err := spiffeid.FromString(e.Identity)
		if err != nil || !set.Selects(policy.Workload{ID: id}) {
			continue
		}
		seen[e.Number] = true
		out = append(out, fmt.Sprintf("%s (cgroup %s) is selected by a policy but is no destination on this node: no network namespace of its own "+
			"names it by address and it claims no ports (set [[capture.workloads]] ports to the TCP ports it serves), so its policies decide nothing", e.Identity, e.Cgroup))
	}
	return out
}

// decideAll decides for src at each of ips (none: no address). When they
// disagree, ambiguous is true and the verdict is the first denying one:
// the entry denies, under the policy that denies.
func decideAll(set *policy.Set, src policy.Source, ips []netip.Addr, dst policy.Workload, port uint16) (v policy.Verdict, ambiguous bool) {
	if len(ips) == 0 {
		return set.Decide(src, dst, port), false
	}
	var allowed, denied bool
	for _, ip := range ips {
		src.IP = ip
		w := set.Decide(src, dst, port)
		if w.Allow {
			if !allowed && !denied {
				v = w
			}
			allowed = true
		} else {
			if !denied {
				v = w
			}
			denied = true
		}
	}
	return v, allowed && denied
}

func mapKeysU[V any](m map[uint32]V) func(func(uint32) bool) {
	return func(yield func(uint32) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// apply compiles and puts the result in force: the BPF verdicts first,
// then the tunnel's destinations. On a BPF error the old verdicts stay
// (logged) and the tunnel follows the new set all the same.
func (d *daemon) applyPolicy() {
	p := d.pol
	d.idents.mu.Lock()
	names := make(map[uint32]spiffeid.ID)
	for _, e := range d.idents.view {
		if id, ok := d.idents.numbers.Name(e.Number); ok && e.Number != 0 {
			names[e.Number] = id
		}
	}
	addrs, addrCgroups := d.idents.addrs, d.idents.addrCgroups
	ports, portProblems := d.idents.portAddrs, d.idents.portProblems
	nsPorts := d.idents.ports
	view := slices.Clone(d.idents.view)
	d.idents.mu.Unlock()
	var wls map[netip.Addr]policy.Workload
	if ps, ok := d.pods.(PolicySource); ok {
		pods := ps.Workloads()
		wls = make(map[netip.Addr]policy.Workload, len(addrCgroups))
		for a, cg := range addrCgroups {
			if w, ok := pods[cg]; ok {
				wls[a] = w
			}
		}
	}
	set := p.set.Load()
	entries, dsts, dstPorts, problems := p.compilePorts(set, names, addrs, ports, wls)
	problems = append(problems, portProblems...)
	problems = append(problems, noDestination(set, view, addrs, nsPorts)...)
	p.mu.Lock()
	same := p.wrote && slices.Equal(p.written, entries)
	p.mu.Unlock()
	var err error
	if !same { // a poke that changed no verdict flips no generation
		err = d.dp.SetPolicy(entries)
	}
	p.dsts.Store(&dsts)
	p.dstPorts.Store(&dstPorts)
	p.mu.Lock()
	if err == nil {
		p.written, p.wrote = entries, true
	}
	p.entries, p.compileAt, p.problems, p.compErr = len(entries), time.Now(), problems, ""
	if err != nil {
		p.compErr = err.Error()
	}
	p.mu.Unlock()
	p.compiledOnce.Do(func() { close(p.compiled) })
	for _, pr := range problems {
		d.log.Error().Str("component", "policy").Str("problem", pr).Msg("same-node policy cannot be exact")
	}
	if err != nil {
		d.log.Error().Err(err).Int("entries", len(entries)).Msg("writing same-node policy (smesh_policy): the previous verdicts stay in force")
		return
	}
	d.log.Debug().Int("entries", len(entries)).Int("workloads", len(dsts)).Int("policies", set.Len()).Msg("policy compiled")
}

// policyCounts is the PolicyCollector's source.
func (d *daemon) policyCounts() (metrics.PolicyCounts, error) {
	p := d.pol
	var pc metrics.PolicyCounts
	for _, pr := range p.set.Load().Problems() {
		if !slices.Contains(pc.Invalid, pr.Policy) {
			pc.Invalid = append(pc.Invalid, pr.Policy)
		}
	}
	denied, err := d.dp.PolicyDenied()
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, n := range p.tunnel {
		pc.Denied = append(pc.Denied, metrics.PolicyDenials{Path: metrics.PolicyPathTunnel, Policy: k.policy, Reason: k.reason, Count: n})
	}
	if err != nil {
		return pc, err
	}
	for num, n := range denied {
		lbl := denial{"", policy.ReasonNotAllowed}
		if int(num) < len(p.names) {
			lbl = p.names[num]
		}
		pc.Denied = append(pc.Denied, metrics.PolicyDenials{Path: metrics.PolicyPathSameNode, Policy: lbl.policy, Reason: lbl.reason, Count: n})
	}
	return pc, nil
}

// PolicyWorkload is one local workload as /debug/policy shows it.
type PolicyWorkload struct {
	Cgroup   string `json:"cgroup"`
	Identity string `json:"identity"`
	Number   uint32 `json:"number"`
	Strict   bool   `json:"strict,omitempty"`
	// Namespace and Labels: a pod's, as policy selectors see them.
	Namespace string            `json:"namespace,omitempty"`
	Labels    map[string]string `json:"labels,omitempty"`
	// Addrs: of its own namespaces, by which both paths know it (same
	// identity number: every workload of that identity's addresses).
	Addrs []string `json:"addresses,omitempty"`
	// Ports: a [[capture.workloads]]'s ports, by which both paths know it
	// in its namespace (the node's own for a systemd unit); PortAddrs:
	// them on that namespace's addresses, as the tunnel path knows them.
	Ports     []uint16 `json:"ports,omitempty"`
	PortAddrs []string `json:"portAddresses,omitempty"`
	Policies  any      `json:"policies"`
}

// debugPolicy is /debug/policy: per local workload, the policies that
// select it; the invalid policies and why; what the last compile wrote.
func (d *daemon) debugPolicy() any {
	p := d.pol
	set := p.set.Load()
	d.idents.mu.Lock()
	view := slices.Clone(d.idents.view)
	byNum := map[uint32][]string{}
	for a, n := range d.idents.addrs {
		byNum[n] = append(byNum[n], a.String())
	}
	portsByNum := map[uint32][]string{}
	for a, n := range d.idents.portAddrs {
		portsByNum[n] = append(portsByNum[n], a.String())
	}
	d.idents.mu.Unlock()
	sort.Slice(view, func(i, j int) bool { return view[i].Cgroup < view[j].Cgroup })
	var pods map[string]policy.Workload // with [kubernetes]: namespace and labels
	if ps, ok := d.pods.(PolicySource); ok {
		pods = ps.Workloads()
	}
	var ws []PolicyWorkload
	for _, e := range view {
		id, err := spiffeid.FromString(e.Identity)
		if err != nil {
			continue
		}
		w, ok := pods[e.Cgroup]
		if !ok {
			w = policy.Workload{ID: id}
		}
		addrs := byNum[e.Number]
		slices.Sort(addrs)
		var portAddrs []string
		if len(e.Ports) > 0 {
			portAddrs = portsByNum[e.Number]
			slices.Sort(portAddrs)
		}
		ws = append(ws, PolicyWorkload{Cgroup: e.Cgroup, Identity: e.Identity, Number: e.Number, Strict: e.Strict,
			Namespace: w.Namespace, Labels: w.Labels, Addrs: addrs, Ports: e.Ports, PortAddrs: portAddrs, Policies: set.Describe(w)})
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return struct {
		Policies  int              `json:"policies"`
		Workloads []PolicyWorkload `json:"workloads"`
		Problems  []policy.Problem `json:"problems"`
		// SameNode is what the last compile wrote into smesh_policy.
		SameNode struct {
			Entries  int       `json:"entries"`
			At       time.Time `json:"at"`
			Problems []string  `json:"problems,omitempty"`
			Error    string    `json:"error,omitempty"`
		} `json:"sameNode"`
		Enforced string `json:"enforced"`
	}{Policies: set.Len(), Workloads: ws, Problems: set.Problems(),
		SameNode: struct {
			Entries  int       `json:"entries"`
			At       time.Time `json:"at"`
			Problems []string  `json:"problems,omitempty"`
			Error    string    `json:"error,omitempty"`
		}{p.entries, p.compileAt, p.problems, p.compErr},
		Enforced: strings.Join([]string{"tunnel: destinations that are workload addresses of this node, or workload ports ([[capture.workloads]] ports) on its namespaces' addresses",
			"same_node: connect4/6 to workload addresses of this node, or to workload ports on loopback and the addresses of their namespace"}, "; ")}
}

// sameNodeLogInterval is how often same-node denials are summed up in the
// log: connect4/6 count them per policy but send no event per denial.
const sameNodeLogInterval = 10 * time.Second

// logSameNodeDenials logs, every sameNodeLogInterval, how many same-node
// connections each (policy, reason) denied since the last time, until ctx
// is done.
func (d *daemon) logSameNodeDenials(ctx context.Context) {
	t := time.NewTicker(sameNodeLogInterval)
	defer t.Stop()
	last := map[uint16]uint64{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if d.released.Load() {
			return
		}
		now, err := d.dp.PolicyDenied()
		if err != nil {
			continue
		}
		p := d.pol
		for num, n := range now {
			if n <= last[num] {
				continue
			}
			lbl := denial{"", policy.ReasonNotAllowed}
			p.mu.Lock()
			if int(num) < len(p.names) {
				lbl = p.names[num]
			}
			p.mu.Unlock()
			p.log.Warn().Str("path", metrics.PolicyPathSameNode).Str("policy", lbl.policy).Str("reason", lbl.reason).
				Uint64("denied", n-last[num]).Dur("within", sameNodeLogInterval).
				Msg("same-node connections denied by authorization policy (connect() refused; /debug/policy says what selects whom)")
		}
		last = now
	}
}

// firstCompileWait bounds how long start waits for the first compile.
const firstCompileWait = 5 * time.Second

// waitCompiled waits until the first compile is in force, so that smeshd
// says it is ready (and its own tunnel listener serves) with the policies
// enforced on both paths. The tunnel listeners of the enrolled namespaces
// serve from their namespace's first moment: a connection to one before
// the first compile (milliseconds into a start without a predecessor; a
// successor accepts nothing before it is ready) is decided without
// destinations, so allowed.
func (d *daemon) waitCompiled() {
	select {
	case <-d.pol.compiled:
	case <-time.After(firstCompileWait):
		d.log.Warn().Dur("waited", firstCompileWait).Msg("the authorization policies are not compiled yet (smesh_addr_ids not written?): serving anyway")
	}
}
