package datapath

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/bpf/strict"
	"github.com/smesh-dev/smesh/pkg/cgroups"
)

// Strict inbound (docs/identity.md 5.3): a strict workload accepts TCP only
// through the mesh. bpf/strict/strict.c has the mechanism: a cgroup_skb
// ingress program on each strict cgroup drops every SYN that no mesh socket
// sent, and a sock_ops program on smeshd's own cgroup and on every enrolled
// cgroup records the SYNs mesh sockets send (smesh_mesh_syn).
//
// The strict object is loaded beside the others and shares smesh_addrs and
// smesh_ns_addrs with them (the recorder names the receiver's namespace as
// sock_ops does). Its own maps and links are handed to a successor like the
// others: maps as "map/NAME", links as "strict/ingress/CGROUPID" and
// "strict/sockops/CGROUPID" (a name of their own: the recorder is a second
// sock_ops attachment beside the capture's on the same cgroups). With
// on_failure = "closed" they are pinned as the capture is (maps by name,
// links as link_strict_ingress_ID and link_strict_sockops_ID), so that a
// strict workload stays strict while no smeshd runs.

// strictLinkPrefix begins the hand-over names of the strict attachments.
const strictLinkPrefix = "strict/"

// strictLinkName names a strict attachment in a hand-over:
// "strict/ingress/CGROUPID" or "strict/sockops/CGROUPID". (Not
// AttachType.String: cgroup_skb ingress is attach type 0, which cilium/ebpf
// calls "None".)
func strictLinkName(typ ebpf.AttachType, cgroupID uint64) string {
	kind := "sockops"
	if typ == ebpf.AttachCGroupInetIngress {
		kind = "ingress"
	}
	return strictLinkPrefix + kind + "/" + strconv.FormatUint(cgroupID, 10)
}

// strictMapNames are the maps the strict object adds to the shared ones.
var strictMapNames = []string{"smesh_mesh_syn", "smesh_strict", "smesh_strict_counters"}

// strictObjects are the programs and own maps of bpf/strict. (bpf2go's
// StrictObjects would also hold every map smesh.h declares, which the
// strict object only borrows.)
type strictObjects struct {
	Ingress  *ebpf.Program `ebpf:"smesh_strict_ingress"`
	Sockops  *ebpf.Program `ebpf:"smesh_strict_sockops"`
	Strict   *ebpf.Map     `ebpf:"smesh_strict"`
	MeshSyn  *ebpf.Map     `ebpf:"smesh_mesh_syn"`
	Counters *ebpf.Map     `ebpf:"smesh_strict_counters"`
}

func (o *strictObjects) Close() error {
	var errs []error
	for _, p := range []*ebpf.Program{o.Ingress, o.Sockops} {
		if p != nil {
			errs = append(errs, p.Close())
		}
	}
	for _, m := range []*ebpf.Map{o.Strict, o.MeshSyn, o.Counters} {
		if m != nil {
			errs = append(errs, m.Close())
		}
	}
	return errors.Join(errs...)
}

// StrictOptions are the settings of one strict workload.
type StrictOptions struct {
	// ExemptPorts accept plaintext SYNs from anywhere (kubelet health
	// probes come from the node, outside the mesh). 0 is not a port.
	ExemptPorts []uint16
}

// loadStrict loads bpf/strict, adopting the maps a predecessor handed over
// (one without them, an older smeshd, hands none: they are made new). A
// kernel that cannot load it leaves strict inbound unavailable (SetStrict
// says why) rather than failing the data path.
func (d *Datapath) loadStrict(shared map[string]*ebpf.Map) error {
	spec, err := strict.LoadStrict()
	if err != nil {
		return fmt.Errorf("loading strict spec: %w", err)
	}
	cookie, err := currentNetnsCookie()
	if err != nil {
		return err
	}
	if err := spec.Variables["node_netns"].Set(cookie); err != nil {
		return fmt.Errorf("setting strict node_netns: %w", err)
	}
	repl := sharedFor(spec, shared)
	opts := d.pinOptions(spec)
	for _, name := range strictMapNames {
		fd, err := takeFD(d.adopt, mapHandoverName(name))
		if err != nil {
			return err
		}
		if fd < 0 {
			continue
		}
		m, err := ebpf.NewMapFromFD(fd)
		if err != nil {
			return fmt.Errorf("taking over map %s: %w", name, err)
		}
		if err := spec.Maps[name].Compatible(m); err != nil {
			// A layout this build does not know: made anew, empty.
			// (Handshakes under way of connections to strict
			// workloads then time out.)
			d.log.Warn().Str("map", name).Err(err).Msg("the predecessor's strict map has another layout; made anew")
			m.Close()
			continue
		}
		defer m.Close()
		if d.pins == nil {
			// Pinned, the pin is the same map.
			repl[name] = m
		}
	}
	opts.MapReplacements = repl
	var objs strictObjects
	if err := spec.LoadAndAssign(&objs, opts); err != nil {
		d.strictErr = fmt.Errorf("strict inbound is unavailable on this kernel: loading bpf/strict: %w", verifierError(err))
		d.log.Warn().Err(d.strictErr).Msg("strict inbound unavailable")
		return nil
	}
	d.strict = &objs
	return nil
}

// currentNetnsCookie is the cookie of the calling thread's network namespace
// (SO_NETNS_COOKIE, Linux 5.14).
func currentNetnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("reading own netns cookie: %w", err)
	}
	defer unix.Close(fd)
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("reading own netns cookie: %w", err)
	}
	return c, nil
}

// SetStrict makes exactly the cgroups given strict (each must be enrolled
// by the last SetCapture, or lie below an enrolled cgroup: a workload's
// cgroup; it must exist), with their options; an empty map makes none
// strict. The maps are written before the attachments are made: the
// recorder (sock_ops) on smeshd's own cgroup and on every enrolled cgroup
// first, so that no mesh SYN goes unrecorded, then the ingress programs.
// Should an attachment fail, those just made are detached again. Open
// connections are not touched. A later SetCapture keeps the strict set in
// line with the enrolled cgroups: a cgroup no longer enrolled is no longer
// strict.
//
// Attachments a predecessor handed over (Options.Adopt, "strict/...") are
// taken here: call SetStrict before closing what is left of Adopt.
func (d *Datapath) SetStrict(cgroupPaths map[string]StrictOptions) error {
	if d.closed {
		return errors.New("setting strict workloads: the data path is closed")
	}
	if len(cgroupPaths) > 0 && d.strict == nil {
		return d.strictErr
	}
	below := make(map[string]uint64)
	for path, o := range cgroupPaths {
		id, ok := d.enrolled[path]
		if !ok {
			if !d.belowEnrolled(path) {
				return fmt.Errorf("strict cgroup %s: not enrolled, nor below an enrolled cgroup", path)
			}
			now, err := cgroups.ID(path)
			if err != nil {
				return fmt.Errorf("strict cgroup %s: %w", path, err)
			}
			below[path] = now
		} else if now, err := cgroups.ID(path); err != nil || now != id {
			return fmt.Errorf("strict cgroup %s: not the cgroup enrolled (made again since?): %v", path, err)
		}
		if slices.Contains(o.ExemptPorts, 0) {
			return fmt.Errorf("strict cgroup %s: exempt port 0", path)
		}
	}
	want := make(map[string]StrictOptions, len(cgroupPaths))
	for p, o := range cgroupPaths {
		want[p] = StrictOptions{ExemptPorts: slices.Clone(o.ExemptPorts)}
	}
	prevIDs := d.strictIDs
	d.strictIDs = below
	if err := d.syncStrict(want); err != nil {
		d.strictIDs = prevIDs
		return err
	}
	d.strictWant = want
	// What a predecessor handed over and nothing took: its cgroups are
	// strict no longer. The predecessor's own copies go at its release.
	for name, f := range d.adopt {
		if strings.HasPrefix(name, strictLinkPrefix) {
			delete(d.adopt, name)
			f.Close()
		}
	}
	return nil
}

// belowEnrolled reports whether path lies below a cgroup of the last
// SetCapture.
func (d *Datapath) belowEnrolled(path string) bool {
	for e := range d.enrolled {
		if path != e && cgroups.Within(path, e) {
			return true
		}
	}
	return false
}

// strictCgroupID is the id of a strict cgroup that is enrolled, or below an
// enrolled cgroup (its id as SetStrict read it); false for one no longer in
// the capture.
func (d *Datapath) strictCgroupID(path string) (uint64, bool) {
	if id, ok := d.enrolled[path]; ok {
		return id, true
	}
	if id, ok := d.strictIDs[path]; ok && d.belowEnrolled(path) {
		return id, true
	}
	return 0, false
}

// syncStrict makes the strict maps and attachments what want (with the
// enrolled cgroups) asks for.
func (d *Datapath) syncStrict(want map[string]StrictOptions) error {
	if d.strict == nil {
		return nil
	}
	wantLinks := make(map[attachment]*ebpf.Program)
	entries := make(map[strict.StrictStrictKey]bool)
	for path, o := range want {
		id, ok := d.strictCgroupID(path)
		if !ok {
			continue
		}
		wantLinks[attachment{path, id, ebpf.AttachCGroupInetIngress}] = d.strict.Ingress
		entries[strict.StrictStrictKey{Cgroup: id}] = true
		for _, p := range o.ExemptPorts {
			entries[strict.StrictStrictKey{Cgroup: id, Port: p}] = true
		}
	}
	if len(wantLinks) > 0 {
		wantLinks[attachment{d.proxyCgroup, d.proxyCgroupID, ebpf.AttachCGroupSockOps}] = d.strict.Sockops
		for path, id := range d.enrolled {
			wantLinks[attachment{path, id, ebpf.AttachCGroupSockOps}] = d.strict.Sockops
		}
	}
	opts := strict.StrictStrictOpts{Version: 1}
	for k := range entries {
		if err := d.strict.Strict.Put(k, opts); err != nil {
			return fmt.Errorf("writing smesh_strict: %w", err)
		}
	}
	if d.strictLinks == nil {
		d.strictLinks = make(map[attachment]link.Link)
	}
	var added []attachment
	for _, typ := range []ebpf.AttachType{ebpf.AttachCGroupSockOps, ebpf.AttachCGroupInetIngress} {
		for _, a := range slices.SortedFunc(maps.Keys(wantLinks), cmpAttachment) {
			if a.typ != typ || d.strictLinks[a] != nil {
				continue
			}
			l, adopted, err := d.attachStrict(a, wantLinks[a])
			if err != nil {
				for _, a := range slices.Backward(added) {
					if err := d.detachStrict(d.strictLinks[a]); err != nil {
						d.log.Error().Err(err).Msg("undoing a strict attachment")
					}
					delete(d.strictLinks, a)
				}
				d.pruneStrictEntries(d.strictEntries())
				return err
			}
			d.strictLinks[a] = l
			if !adopted {
				added = append(added, a)
			}
		}
	}
	// Ingress before the recorders: never a strict cgroup whose mesh
	// SYNs go unrecorded.
	for _, typ := range []ebpf.AttachType{ebpf.AttachCGroupInetIngress, ebpf.AttachCGroupSockOps} {
		for a, l := range d.strictLinks {
			if _, ok := wantLinks[a]; ok || a.typ != typ {
				continue
			}
			if err := d.detachStrict(l); err != nil {
				d.log.Error().Err(err).Str("cgroup", a.cgroup).Stringer("type", a.typ).Msg("detaching a strict attachment no longer wanted")
			}
			delete(d.strictLinks, a)
		}
	}
	d.pruneStrictEntries(entries)
	if d.pins != nil {
		// An earlier run's, for cgroups strict no longer.
		keep := make(map[string]bool)
		for a := range d.strictLinks {
			keep[d.pins.strictLinkPath(a.typ, a.id)] = true
		}
		if err := d.pins.pruneStrictLinks(keep); err != nil {
			d.log.Error().Err(err).Msg("removing pinned strict attachments no longer wanted")
		}
	}
	return nil
}

// detachStrict removes a strict attachment for good, pinned or not.
func (d *Datapath) detachStrict(l link.Link) error {
	if d.pins != nil {
		if err := l.Unpin(); err != nil {
			l.Close()
			return err
		}
	}
	return l.Close()
}

func cmpAttachment(a, b attachment) int {
	if c := strings.Compare(a.cgroup, b.cgroup); c != 0 {
		return c
	}
	return int(a.typ) - int(b.typ)
}

// strictEntries are the smesh_strict entries the attached ingress
// programs need (after a failed change: those of the current set).
func (d *Datapath) strictEntries() map[strict.StrictStrictKey]bool {
	out := make(map[strict.StrictStrictKey]bool)
	for path, o := range d.strictWant {
		id, ok := d.strictCgroupID(path)
		if !ok {
			continue
		}
		out[strict.StrictStrictKey{Cgroup: id}] = true
		for _, p := range o.ExemptPorts {
			out[strict.StrictStrictKey{Cgroup: id, Port: p}] = true
		}
	}
	return out
}

// pruneStrictEntries removes the smesh_strict entries not in keep.
func (d *Datapath) pruneStrictEntries(keep map[strict.StrictStrictKey]bool) {
	var k strict.StrictStrictKey
	var v strict.StrictStrictOpts
	var stale []strict.StrictStrictKey
	it := d.strict.Strict.Iterate()
	for it.Next(&k, &v) {
		if !keep[k] {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		d.log.Error().Err(err).Msg("reading smesh_strict")
	}
	for _, k := range stale {
		if err := d.strict.Strict.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			d.log.Error().Err(err).Msg("removing from smesh_strict")
		}
	}
}

// attachStrict attaches prog as a, or takes the attachment over (swapping
// prog in) from a predecessor's hand-over or, pinned, from its pin
// (adopted: a failed change leaves it).
func (d *Datapath) attachStrict(a attachment, prog *ebpf.Program) (l link.Link, adopted bool, err error) {
	fd, err := takeFD(d.adopt, strictLinkName(a.typ, a.id))
	if err != nil {
		return nil, false, err
	}
	if d.pins != nil {
		// The pin is the same link as the handed-over descriptor.
		if fd >= 0 {
			unix.Close(fd)
		}
		var prev ebpf.ProgramID
		l, adopted, err = d.pins.attach(d.pins.strictLinkPath(a.typ, a.id), a.cgroup, a.typ, prog, &prev)
		d.keepStrictPrev(a, adopted, prev)
		return l, adopted, err
	}
	if fd >= 0 {
		l, prev, err := d.adoptLink(fd, a, prog)
		if err != nil || l != nil {
			d.keepStrictPrev(a, l != nil, prev)
			return l, l != nil, err
		}
	}
	l, err = link.AttachCgroup(link.CgroupOptions{Path: a.cgroup, Attach: a.typ, Program: prog})
	if err != nil {
		return nil, false, fmt.Errorf("attaching strict %s to %s: %w", a.typ, a.cgroup, err)
	}
	return l, false, nil
}

// keepStrictPrev remembers the program a running predecessor's strict link
// ran, for giveBackStrict.
func (d *Datapath) keepStrictPrev(a attachment, adopted bool, prev ebpf.ProgramID) {
	if !adopted || !d.handedOver || prev == 0 {
		return
	}
	if d.strictPrev == nil {
		d.strictPrev = make(map[attachment]ebpf.ProgramID)
	}
	d.strictPrev[a] = prev
}

// giveBackStrict gives the predecessor's programs back to the strict links
// it handed over, before Commit (see giveBack): recorders first.
func (d *Datapath) giveBackStrict() error {
	var errs []error
	for _, typ := range []ebpf.AttachType{ebpf.AttachCGroupSockOps, ebpf.AttachCGroupInetIngress} {
		for a, id := range d.strictPrev {
			l := d.strictLinks[a]
			if l == nil || a.typ != typ {
				continue
			}
			if err := updateFromID(l, id); err != nil {
				errs = append(errs, fmt.Errorf("giving the strict %s link of %s its program back: %w", a.typ, a.cgroup, err))
			}
		}
	}
	d.strictPrev = nil
	return errors.Join(errs...)
}

// closeStrict closes the strict attachments (detaching them unless a
// successor holds copies, or they are pinned) and objects.
func (d *Datapath) closeStrict() error {
	var errs []error
	for _, typ := range []ebpf.AttachType{ebpf.AttachCGroupInetIngress, ebpf.AttachCGroupSockOps} {
		for a, l := range d.strictLinks {
			if a.typ == typ {
				if err := l.Close(); err != nil {
					errs = append(errs, fmt.Errorf("closing the strict %s link of %s: %w", a.typ, a.cgroup, err))
				}
			}
		}
	}
	d.strictLinks = nil
	if d.strict != nil {
		errs = append(errs, d.strict.Close())
	}
	return errors.Join(errs...)
}

// handoverStrict adds the strict attachments to a hand-over.
func (d *Datapath) handoverStrict(out map[string]*os.File) error {
	for a, l := range d.strictLinks {
		name := strictLinkName(a.typ, a.id)
		fl, ok := l.(interface{ FD() int })
		if !ok {
			return fmt.Errorf("handing the data path over: strict %s of %s is not a bpf_link", a.typ, a.cgroup)
		}
		f, err := dupFile(fl.FD(), name)
		if err != nil {
			return err
		}
		out[name] = f
	}
	return nil
}

// StrictAvailable says why strict inbound cannot work with this kernel
// (bpf/strict did not load; the rest of the data path works), nil if it can:
// for `smeshd check` and for refusing a configuration that asks for it.
func (d *Datapath) StrictAvailable() error {
	if d.strict == nil && d.strictErr == nil {
		return errors.New("strict inbound: the data path is not loaded")
	}
	return d.strictErr
}

// StrictCounters are what the strict ingress programs counted, since the
// maps were made (carried across restarts).
type StrictCounters struct {
	// Dropped counts SYNs to strict workloads that no mesh socket sent
	// (smesh_strict_dropped_total).
	Dropped uint64
	// Mesh counts SYNs let in because a mesh socket sent them, Exempt
	// those to an exempt port, Loopback those over loopback inside a
	// workload's own network namespace.
	Mesh, Exempt, Loopback uint64
}

// StrictCounters sums the per-CPU strict counters.
func (d *Datapath) StrictCounters() (StrictCounters, error) {
	var c StrictCounters
	if d.strict == nil {
		return c, nil
	}
	read := func(slot uint32) (uint64, error) {
		var perCPU []uint64
		if err := d.strict.Counters.Lookup(slot, &perCPU); err != nil {
			return 0, fmt.Errorf("reading strict counter %d: %w", slot, err)
		}
		var sum uint64
		for _, v := range perCPU {
			sum += v
		}
		return sum, nil
	}
	var errs [4]error
	c.Dropped, errs[0] = read(0)
	c.Mesh, errs[1] = read(1)
	c.Exempt, errs[2] = read(2)
	c.Loopback, errs[3] = read(3)
	return c, errors.Join(errs[:]...)
}

// StrictDropped is how many SYNs to strict workloads the kernel dropped:
// smesh_strict_dropped_total.
func (d *Datapath) StrictDropped() (uint64, error) {
	c, err := d.StrictCounters()
	return c.Dropped, err
}
