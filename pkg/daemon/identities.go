package daemon

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"

	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/smesh-dev/smesh/pkg/cgroups"
	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/enrol"
	"github.com/smesh-dev/smesh/pkg/identity"
)

// identities keeps the workload identities of this node's cgroups and their
// numbers (docs/identity.md 2) and writes them into smesh_identity.
type identities struct {
	numbers *identity.Numbers
	node    string // this node's name, for default identities

	poke chan struct{} // pokeAddrIDs -> runAddrIDs

	mu      sync.Mutex
	adopted bool // the predecessor's numbers were taken over
	view    []IdentityEntry
	addrs   map[netip.Addr]uint32 // what runAddrIDs last wrote
	// addrCgroups: the identity entry's cgroup (a pod's) of each of addrs.
	addrCgroups map[netip.Addr]string
	// ports: what runAddrIDs last wrote into smesh_port_ids
	// ([[capture.workloads]] ports, by namespace); portAddrs: the same
	// by the namespaces' non-loopback addresses, for the tunnel path;
	// portProblems: ports two workloads of one namespace claim.
	ports        map[datapath.PortKey]uint32
	portAddrs    map[netip.AddrPort]uint32
	portProblems []string
	// warned: [capture] cgroups already logged as having no default
	// identity (warnOnce).
	warned map[string]bool
}

// IdentityEntry is one cgroup's identity as /debug/identities shows it.
type IdentityEntry struct {
	Cgroup   string `json:"cgroup"`
	CgroupID uint64 `json:"cgroupID"`
	Identity string `json:"identity"`
	Number   uint32 `json:"number"`
	// From is where the identity comes from: "capture" (the default of a
	// [capture] cgroup), "workload" ([[capture.workloads]]), "pod".
	From   string `json:"from"`
	Strict bool   `json:"strict,omitempty"`
	// Ports: the TCP ports a [[capture.workloads]] serves in its
	// namespace, by which policy knows it there.
	Ports []uint16 `json:"ports,omitempty"`
}

// nodeName is the name this node goes by in default identities: the pod's
// node with [kubernetes], else the NAME of its tunnel certificate
// (spiffe://TD/node/NAME), else the host name.
func (d *daemon) nodeName() string {
	if d.cfg.Kubernetes.Enabled {
		if n := os.Getenv(d.cfg.Kubernetes.NodeNameEnv); n != "" {
			return n
		}
	}
	if d.tun != nil && d.tun.Credentials != nil {
		if id, err := spiffeid.FromString(d.tun.Credentials.Identity()); err == nil {
			if name, ok := strings.CutPrefix(id.Path(), "/node/"); ok && name != "" && !strings.Contains(name, "/") {
				return name
			}
		}
	}
	h, _ := os.Hostname()
	return h
}

// warnOnce says, once per cgroup, that a [capture] cgroup has no default
// identity, and why.
func (ids *identities) warnOnce(log zerolog.Logger, cg string, err error) {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	if ids.warned == nil {
		ids.warned = make(map[string]bool)
	}
	if ids.warned[cg] {
		return
	}
	ids.warned[cg] = true
	log.Warn().Err(err).Str("cgroup", cg).Msg("no workload identity for this [capture] cgroup: its connections speak as the node (add a [[capture.workloads]] entry with an identity to give it one)")
}

// newIdentities numbers identities for this node.
func (d *daemon) newIdentities() *identities {
	node := d.nodeName()
	var nodeID spiffeid.ID
	if td, err := spiffeid.TrustDomainFromString(d.cfg.Tunnel.TLS.TrustDomain); err == nil && node != "" {
		nodeID, _ = spiffeid.FromSegments(td, "node", node)
	}
	return &identities{numbers: identity.NewNumbers(nodeID), node: node, poke: make(chan struct{}, 1)}
}

// source names the workload a source number stands for (proxy
// Options.Source).
func (ids *identities) source(n uint32) (spiffeid.ID, bool) {
	return ids.numbers.Name(n)
}

// wantedIdentities is the identity of every cgroup in the mesh: each
// [capture] cgroup's default, each [[capture.workloads]]'s, each enrolled
// pod's.
func (d *daemon) wantedIdentities(c config.Capture) ([]IdentityEntry, map[string]spiffeid.ID, error) {
	cfg := d.cfg
	cfg.Capture = c
	static, err := cfg.CgroupPaths(d.mount)
	if err != nil {
		return nil, nil, err
	}
	workloads, err := cfg.Workloads(d.mount, d.idents.node)
	if err != nil {
		return nil, nil, err
	}
	var out []IdentityEntry
	names := make(map[string]spiffeid.ID)
	add := func(cg string, id spiffeid.ID, from string, strict bool, ports []uint16) {
		if _, dup := names[cg]; dup {
			// A workload's cgroup that is a [capture] cgroup itself:
			// the workload's identity wins (added first).
			return
		}
		names[cg] = id
		out = append(out, IdentityEntry{Cgroup: cg, Identity: id.String(), From: from, Strict: strict, Ports: ports})
	}
	for _, w := range workloads {
		add(w.Cgroup, w.Identity, "workload", w.Strict, w.Ports)
	}
	for _, cg := range static {
		id, err := cfg.DefaultIdentity(cg, d.idents.node)
		if err != nil {
			// Nobody asked for this identity: a node name no SPIFFE ID
			// can hold (a host named "(none)") must not stop the mesh.
			// The cgroup is captured as before and speaks as its node.
			d.idents.warnOnce(d.log, cg, err)
			continue
		}
		add(cg, id, "capture", false, nil)
	}
	if d.pods != nil {
		pods := d.pods.Identities()
		var strict map[string][]uint16
		if sp, ok := d.pods.(strictPods); ok {
			strict = sp.Strict()
		}
		for _, cg := range slices.Sorted(mapKeys(pods)) {
			_, isStrict := strict[cg]
			add(cg, pods[cg], "pod", isStrict, nil)
		}
	}
	return out, names, nil
}

func mapKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// syncIdentities writes the identity of every cgroup in the mesh (with the
// capture rules c) into smesh_identity: connect4/6 name each caller by the
// nearest of them. Before the capture is attached to a new cgroup, so that
// its first connection has its source. The first time after a hand-over,
// the names whose cgroups the predecessor had numbered keep their numbers
// (identity.Numbers says why).
func (d *daemon) syncIdentities(c config.Capture) error {
	entries, names, err := d.wantedIdentities(c)
	if err != nil {
		return err
	}
	d.idents.mu.Lock()
	defer d.idents.mu.Unlock()
	byID := make(map[uint64]int)
	for i := range entries {
		id, err := cgroups.ID(entries[i].Cgroup)
		if err != nil {
			continue // missing (yet): numbered, not written
		}
		entries[i].CgroupID = id
		byID[id] = i
	}
	if !d.idents.adopted {
		d.idents.adopted = true
		if d.from != nil {
			d.adoptNumbers(entries, names, byID)
		}
	}
	ids := make(map[uint64]uint32)
	keep := make(map[spiffeid.ID]bool)
	for i := range entries {
		name := names[entries[i].Cgroup]
		keep[name] = true
		entries[i].Number = d.idents.numbers.Number(name)
		if entries[i].CgroupID != 0 {
			ids[entries[i].CgroupID] = entries[i].Number
		}
	}
	if err := d.dp.SetIdentities(ids); err != nil {
		return err
	}
	d.idents.numbers.Keep(keep)
	d.idents.view = entries
	d.pokeAddrIDs()
	return nil
}

// adoptNumbers gives the names of cgroups the predecessor had numbered
// (its smesh_identity, handed over) the numbers it gave them.
func (d *daemon) adoptNumbers(entries []IdentityEntry, names map[string]spiffeid.ID, byID map[uint64]int) {
	old, err := d.dp.Identities()
	if err != nil {
		d.log.Warn().Err(err).Msg("reading the predecessor's identity numbers: numbering anew")
		return
	}
	n := 0
	for cgID, num := range old {
		i, ok := byID[cgID]
		if !ok {
			continue
		}
		if d.idents.numbers.Adopt(names[entries[i].Cgroup], num) {
			n++
		}
	}
	d.log.Info().Int("adopted", n).Int("predecessor", len(old)).Msg("identity numbers taken over from the predecessor")
}

// debugIdentities is /debug/identities: cgroup -> identity -> number.
func (d *daemon) debugIdentities() any {
	d.idents.mu.Lock()
	defer d.idents.mu.Unlock()
	out := slices.Clone(d.idents.view)
	slices.SortFunc(out, func(a, b IdentityEntry) int { return strings.Compare(a.Cgroup, b.Cgroup) })
	addrs := make(map[string]uint32, len(d.idents.addrs))
	for a, n := range d.idents.addrs {
		addrs[a.String()] = n
	}
	ports := make(map[string]uint32, len(d.idents.ports))
	for k, n := range d.idents.ports {
		ports[fmt.Sprintf("netns %d port %d", k.Netns, k.Port)] = n
	}
	portAddrs := make(map[string]uint32, len(d.idents.portAddrs))
	for a, n := range d.idents.portAddrs {
		portAddrs[a.String()] = n
	}
	return struct {
		Node       string          `json:"node"`
		Identities []IdentityEntry `json:"identities"`
		// Addresses are the workload addresses same-node policy
		// knows, with their identity numbers.
		Addresses map[string]uint32 `json:"addresses"`
		// Ports are the ports of namespaces shared by several
		// workloads that same-node policy knows ([[capture.workloads]]
		// ports, smesh_port_ids), with their owners' numbers;
		// PortAddresses the same by address, as the tunnel path knows
		// them; PortProblems the ports two workloads claim.
		Ports         map[string]uint32 `json:"ports"`
		PortAddresses map[string]uint32 `json:"portAddresses"`
		PortProblems  []string          `json:"portProblems,omitempty"`
	}{d.idents.node, out, addrs, ports, portAddrs, d.idents.portProblems}
}

// addrIDs are the addresses of this node's workloads with their identity
// numbers, for same-node policy (smesh_addr_ids): every address of a
// network namespace other than smeshd's own whose processes all belong to
// one identity (a pod's namespace; a workload in a namespace of its own).
// A namespace shared by workloads of several identities (the node's own,
// where systemd units run) names no workload by address, and loopback and
// link-local addresses, which every namespace has, never do.
func addrIDs(nss []enrol.Info, entries []IdentityEntry) map[netip.Addr]uint32 {
	out, _ := addrOwners(nss, entries)
	return out
}

// addrOwners is addrIDs, with the cgroup of the identity entry each
// address belongs to (a pod's cgroup; one per namespace with one entry,
// "" when several entries of one identity share the namespace).
func addrOwners(nss []enrol.Info, entries []IdentityEntry) (map[netip.Addr]uint32, map[netip.Addr]string) {
	out := make(map[netip.Addr]uint32)
	cgs := make(map[netip.Addr]string)
	for _, ns := range nss {
		if ns.Own || len(ns.Cgroups) == 0 {
			continue
		}
		var num uint32
		one := true
		owner := ""
		for i, cg := range ns.Cgroups {
			n, e, ok := nearestEntry(cg, entries)
			if !ok || (num != 0 && n != num) {
				one = false
				break
			}
			if i == 0 {
				owner = e
			} else if e != owner {
				owner = ""
			}
			num = n
		}
		if !one || num == 0 {
			continue
		}
		for _, s := range ns.Addrs {
			a, err := netip.ParseAddr(s)
			if err != nil || a.IsLoopback() || a.IsLinkLocalUnicast() || a.IsUnspecified() {
				continue
			}
			out[a.Unmap()] = num
			cgs[a.Unmap()] = owner
		}
	}
	return out, cgs
}

// portOwners are the [[capture.workloads]] ports of this node by namespace
// (smesh_port_ids) and by the namespaces' addresses (the tunnel path): a
// workload's ports apply in every namespace one of its processes runs in
// (the node's own for a systemd unit that has none; its own namespace
// otherwise), on the namespace's own addresses and loopback. A port two
// workloads of different identities claim in one namespace names neither
// (problems says which).
func portOwners(nss []enrol.Info, entries []IdentityEntry) (map[datapath.PortKey]uint32, map[netip.AddrPort]uint32, []string) {
	ids := make(map[datapath.PortKey]uint32)
	byAddr := make(map[netip.AddrPort]uint32)
	var problems []string
	for _, ns := range nss {
		owner := make(map[uint16]int) // port -> index in entries
		clash := make(map[uint16]bool)
		for _, cg := range ns.Cgroups {
			_, at, ok := nearestEntry(cg, entries)
			if !ok {
				continue
			}
			i := slices.IndexFunc(entries, func(e IdentityEntry) bool { return e.Cgroup == at })
			if i < 0 {
				continue
			}
			for _, port := range entries[i].Ports {
				j, taken := owner[port]
				switch {
				case !taken:
					owner[port] = i
				case j == i || entries[j].Number == entries[i].Number:
				case !clash[port]:
					clash[port] = true
					problems = append(problems, fmt.Sprintf("port %d of network namespace %d is claimed by both %s (%s) and %s (%s): "+
						"policy knows neither there (give it to one of them in [[capture.workloads]] ports)",
						port, ns.Cookie, entries[j].Cgroup, entries[j].Identity, entries[i].Cgroup, entries[i].Identity))
				}
			}
		}
		for port, i := range owner {
			num := entries[i].Number
			if clash[port] || num == 0 {
				continue
			}
			ids[datapath.PortKey{Netns: ns.Cookie, Port: port}] = num
			for _, s := range ns.Addrs {
				a, err := netip.ParseAddr(s)
				if err != nil || a.IsLoopback() || a.IsUnspecified() {
					continue
				}
				byAddr[netip.AddrPortFrom(a.Unmap(), port)] = num
			}
		}
	}
	slices.Sort(problems)
	return ids, byAddr, problems
}

// nearestEntry is the number of the nearest entry at or above cgroup cg,
// as connect4/6 find it.
func nearestEntry(cg string, entries []IdentityEntry) (uint32, string, bool) {
	best, num, at := -1, uint32(0), ""
	for _, e := range entries {
		if (cg == e.Cgroup || strings.HasPrefix(cg, e.Cgroup+"/")) && len(e.Cgroup) > best {
			best, num, at = len(e.Cgroup), e.Number, e.Cgroup
		}
	}
	return num, at, best >= 0
}

// pokeAddrIDs asks runAddrIDs to write smesh_addr_ids again (a namespace's
// addresses or the identities changed); it never blocks, so the namespace
// tracker may call it under its locks.
func (d *daemon) pokeAddrIDs() {
	if d.idents == nil {
		return
	}
	select {
	case d.idents.poke <- struct{}{}:
	default:
	}
}

// runAddrIDs keeps smesh_addr_ids and smesh_port_ids in line with the
// namespaces and the identities until ctx is done.
func (d *daemon) runAddrIDs(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.idents.poke:
		}
		if d.released.Load() || d.members == nil {
			continue
		}
		d.idents.mu.Lock()
		entries := slices.Clone(d.idents.view)
		d.idents.mu.Unlock()
		nss := d.members.Namespaces()
		addrs, owners := addrOwners(nss, entries)
		if err := d.dp.SetAddrIDs(addrs); err != nil {
			d.log.Error().Err(err).Msg("writing the workload addresses for same-node policy (smesh_addr_ids)")
			continue
		}
		ports, portAddrs, problems := portOwners(nss, entries)
		if err := d.dp.SetPortIDs(ports); err != nil {
			d.log.Error().Err(err).Msg("writing the workload ports for same-node policy (smesh_port_ids)")
			continue
		}
		d.idents.mu.Lock()
		if !slices.Equal(problems, d.idents.portProblems) {
			for _, pr := range problems {
				d.log.Error().Str("problem", pr).Msg("[[capture.workloads]] ports")
			}
		}
		d.idents.addrs, d.idents.addrCgroups = addrs, owners
		d.idents.ports, d.idents.portAddrs, d.idents.portProblems = ports, portAddrs, problems
		d.idents.mu.Unlock()
		// Identities, addresses or policies changed: the verdicts
		// follow (a burst of pokes is one compile).
		d.applyPolicy()
	}
}
