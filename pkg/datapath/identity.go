package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"

	"github.com/cilium/ebpf"

	"github.com/smesh-dev/smesh/bpf/connect"
)

// Identity numbers as the BPF programs know them (bpf/connect/identity.h):
// smeshd numbers each identity name of this node (pkg/identity.Numbers).
const (
	// UnknownIdentity is a caller no workload cgroup names, and in a
	// PolicyEntry's Src, any source no entry of the destination names.
	UnknownIdentity uint32 = 0
	// NodeIdentity is the node itself (smeshd's own connections).
	NodeIdentity uint32 = 1
)

// Versions of the values of the identity maps (identity.h, smesh.h).
const (
	identCfgVersion      = 1
	policyVerdictVersion = 1
	portIDVersion        = 1
)

// Kinds of smesh_policy keys (identity.h).
const (
	policyKeyRule    = 0
	policyKeyPoliced = 1
)

// identState serializes the writers of the identity and policy maps.
type identState struct {
	mu sync.Mutex
}

// SetIdentities makes smesh_identity hold exactly ids: cgroup id -> identity
// number, for every workload cgroup (pods, [[capture.workloads]], enrolled
// [capture] cgroups). connect4/6 name a caller by the nearest of its
// cgroup's ancestors (itself included, 8 levels at most) that has an entry.
// New entries go in before stale ones go out.
func (d *Datapath) SetIdentities(ids map[uint64]uint32) error {
	d.ident.mu.Lock()
	defer d.ident.mu.Unlock()
	return syncMap(d.connect.SmeshIdentity, ids, "smesh_identity")
}

// Identities reads smesh_identity back: cgroup id -> identity number.
func (d *Datapath) Identities() (map[uint64]uint32, error) {
	return readMap[uint64, uint32](d.connect.SmeshIdentity, "smesh_identity")
}

// SetAddrIDs makes smesh_addr_ids hold exactly ids: the addresses of this
// node's workloads (pods, enrolled namespaces) -> the identity number of the
// workload that has it. Same-node policy finds a connect()'s destination
// there; an address without an entry is under no policy.
func (d *Datapath) SetAddrIDs(ids map[netip.Addr]uint32) error {
	want := make(map[connect.ConnectAddr]uint32, len(ids))
	for a, id := range ids {
		want[bpfAddr(a)] = id
	}
	d.ident.mu.Lock()
	defer d.ident.mu.Unlock()
	return syncMap(d.connect.SmeshAddrIds, want, "smesh_addr_ids")
}

// PortKey is a TCP port served on the addresses of one network namespace
// (netns cookie), loopback included.
type PortKey struct {
	Netns uint64
	Port  uint16
}

// SetPortIDs makes smesh_port_ids hold exactly ids: {namespace, port} -> the
// identity number of the workload serving that port there
// ([[capture.workloads]] ports). Same-node policy names a connect()'s
// destination by it when smesh_addr_ids does not name its address: the
// port in the namespace the address belongs to (the caller's own for
// loopback and its own addresses; the node's for a node address).
func (d *Datapath) SetPortIDs(ids map[PortKey]uint32) error {
	want := make(map[connect.ConnectPortKey]connect.ConnectPortId, len(ids))
	for k, id := range ids {
		if id == UnknownIdentity || k.Port == 0 {
			return fmt.Errorf("port entry %+v -> %d: no port or no identity", k, id)
		}
		want[connect.ConnectPortKey{Netns: k.Netns, Port: k.Port}] = connect.ConnectPortId{Version: portIDVersion, Id: id}
	}
	d.ident.mu.Lock()
	defer d.ident.mu.Unlock()
	return syncMap(d.connect.SmeshPortIds, want, "smesh_port_ids")
}

// PortIDs reads smesh_port_ids back.
func (d *Datapath) PortIDs() (map[PortKey]uint32, error) {
	m, err := readMap[connect.ConnectPortKey, connect.ConnectPortId](d.connect.SmeshPortIds, "smesh_port_ids")
	if err != nil {
		return nil, err
	}
	out := make(map[PortKey]uint32, len(m))
	for k, v := range m {
		out[PortKey{Netns: k.Netns, Port: k.Port}] = v.Id
	}
	return out, nil
}

// PolicyEntry is one verdict of same-node policy: a connect() from identity
// Src to port Port of identity Dst is allowed or denied. Src
// UnknownIdentity: any source without an entry of its own for Dst; Port 0:
// any port without an entry of its own. A destination named by any entry
// is policed: a connect() to it that no entry matches is denied (counted
// under policy 0). Policy is the number PolicyDenied counts denials under.
type PolicyEntry struct {
	Dst, Src uint32
	Port     uint16
	Allow    bool
	Policy   uint16
}

// SetPolicy replaces the whole same-node policy with entries, atomically for
// connect4/6: the entries are written under a new generation, then the
// generation the programs read (smesh_ident_cfg) is flipped, and once every
// program that may have read the old one has finished, the old entries are
// deleted. A connect() sees the old policy or the new one, never a mix.
// Open connections are left alone. On error the old policy stays in force.
func (d *Datapath) SetPolicy(entries []PolicyEntry) error {
	d.ident.mu.Lock()
	defer d.ident.mu.Unlock()
	var cfg connect.ConnectIdentCfg
	if err := d.connect.SmeshIdentCfg.Lookup(uint32(0), &cfg); err != nil {
		return fmt.Errorf("reading smesh_ident_cfg: %w", err)
	}
	gen := cfg.PolicyGen + 1
	want := make(map[connect.ConnectPolicyKey]connect.ConnectPolicyVerdict, len(entries)*2)
	for _, e := range entries {
		if e.Dst == UnknownIdentity {
			return fmt.Errorf("policy entry %+v: no destination identity", e)
		}
		k := connect.ConnectPolicyKey{Gen: gen, Dst: e.Dst, Src: e.Src, Port: e.Port, Kind: policyKeyRule}
		if _, dup := want[k]; dup {
			return fmt.Errorf("policy entry %+v: a second verdict for the same destination, source and port", e)
		}
		v := connect.ConnectPolicyVerdict{Version: policyVerdictVersion, Policy: e.Policy}
		if e.Allow {
			v.Allow = 1
		}
		want[k] = v
		want[connect.ConnectPolicyKey{Gen: gen, Dst: e.Dst, Kind: policyKeyPoliced}] = connect.ConnectPolicyVerdict{Version: policyVerdictVersion, Allow: 1}
	}
	written := make([]connect.ConnectPolicyKey, 0, len(want))
	for k, v := range want {
		if err := d.connect.SmeshPolicy.Put(k, v); err != nil {
			for _, k := range written {
				d.connect.SmeshPolicy.Delete(k)
			}
			return fmt.Errorf("writing smesh_policy (%d entries, the old policy stays): %w", len(want), err)
		}
		written = append(written, k)
	}
	cfg.Version = identCfgVersion
	cfg.PolicyGen = gen
	if err := d.connect.SmeshIdentCfg.Put(uint32(0), cfg); err != nil {
		for _, k := range written {
			d.connect.SmeshPolicy.Delete(k)
		}
		return fmt.Errorf("switching smesh_ident_cfg to policy generation %d: %w", gen, err)
	}
	// A program that read the old generation may still be looking its
	// entries up: let it finish before they go.
	if err := waitForPrograms(); err != nil {
		return fmt.Errorf("waiting for the programs that read the old policy: %w", err)
	}
	var k connect.ConnectPolicyKey
	var v connect.ConnectPolicyVerdict
	var stale []connect.ConnectPolicyKey
	it := d.connect.SmeshPolicy.Iterate()
	for it.Next(&k, &v) {
		if k.Gen != gen {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading smesh_policy: %w", err)
	}
	var errs []error
	for _, k := range stale {
		if err := d.connect.SmeshPolicy.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("deleting the old policy's entries: %w", err)
	}
	return nil
}

// PolicyDenied is how many connects same-node policy denied, by policy
// number (0: a policed destination that no entry matched), summed over
// CPUs, since the maps were made (a successor adopts them).
func (d *Datapath) PolicyDenied() (map[uint16]uint64, error) {
	out := make(map[uint16]uint64)
	var k uint32
	var per []uint64
	it := d.connect.SmeshPolicyDenied.Iterate()
	for it.Next(&k, &per) {
		var sum uint64
		for _, n := range per {
			sum += n
		}
		out[uint16(k)] += sum
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("reading smesh_policy_denied: %w", err)
	}
	return out, nil
}

// syncMap makes m hold exactly want: new and changed entries first, then
// the stale ones deleted.
func syncMap[K, V comparable](m *ebpf.Map, want map[K]V, what string) error {
	var k K
	var v V
	cur := make(map[K]V)
	it := m.Iterate()
	for it.Next(&k, &v) {
		cur[k] = v
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading %s: %w", what, err)
	}
	for k, v := range want {
		if old, ok := cur[k]; ok && old == v {
			continue
		}
		if err := m.Put(k, v); err != nil {
			return fmt.Errorf("writing %s: %w", what, err)
		}
	}
	for k := range cur {
		if _, ok := want[k]; ok {
			continue
		}
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("deleting from %s: %w", what, err)
		}
	}
	return nil
}

func readMap[K comparable, V any](m *ebpf.Map, what string) (map[K]V, error) {
	out := make(map[K]V)
	var k K
	var v V
	it := m.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("reading %s: %w", what, err)
	}
	return out, nil
}
