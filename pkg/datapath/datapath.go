// Package datapath owns smesh's kernel data path: it loads the BPF programs,
// attaches them to the enrolled cgroups, keeps their maps filled and detaches
// everything in Close.
//
// Every attachment is a bpf_link (or, for sk_msg, an attachment to a map this
// process owns), so a smeshd that dies leaves nothing attached behind.
package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/rs/zerolog"

	"github.com/smesh-dev/smesh/bpf/connect"
	"github.com/smesh-dev/smesh/bpf/skmsg"
	"github.com/smesh-dev/smesh/bpf/sockops"
	"github.com/smesh-dev/smesh/pkg/cgroups"
)

// Mode is how same-node hops move bytes.
type Mode string

const (
	// ModeSplice hands each send straight to the peer socket in the kernel.
	ModeSplice Mode = "splice"
	// ModeCopy captures every connection, same-node ones included, and lets
	// smeshd relay it through its own buffers.
	ModeCopy Mode = "copy"
)

// Options configure a Datapath.
type Options struct {
	Mode Mode
	// ProxyAddr is where captured connections are sent ([outbound] listen).
	ProxyAddr netip.AddrPort
	// ProxyCgroup is smeshd's own cgroup: its sockets are hop ends too, and
	// they are never captured.
	ProxyCgroup string
	// Cgroups are the enrolled cgroup directories.
	Cgroups      []string
	IncludeCIDRs []netip.Prefix
	ExcludeCIDRs []netip.Prefix
	ExcludePorts []uint16
	// MapSize bounds the sockhash and the original-destination map.
	MapSize uint32
	// SpliceProxyHops splices the hops with smeshd at one end too (see
	// splice_proxy_hops in sockops.c).
	SpliceProxyHops bool
	// SpliceQueueLimit bounds the bytes a spliced hop may queue at its
	// peer before its direction is demoted to TCP (skmsg.c). 0 splices
	// without a bound, for kernels that cannot bound (Probe's "bounded
	// splice"): a reader that stalls can then make its writer queue until
	// the node's TCP memory runs out.
	SpliceQueueLimit uint32
	// PinDir, when set, pins the capture there (on bpffs) so that it
	// outlives smeshd: [capture] on_failure = "closed". Empty: everything
	// is detached when smeshd stops or dies.
	PinDir string
	// FailClosed refuses the connections connect4 would capture in a
	// network namespace where smeshd has no listener (yet); false lets them
	// through uncaptured. [capture] on_failure.
	FailClosed bool
	Logger     zerolog.Logger
}

// Datapath is the loaded and attached set of programs and maps.
type Datapath struct {
	log     zerolog.Logger
	connect connect.ConnectObjects
	sockops sockops.SockopsObjects
	// msg is the sk_msg program: smesh_skmsg, or smesh_skmsg_unbounded
	// where the kernel cannot bound spliced queues (see skmsg.c).
	msg *ebpf.Program
	// links are the cgroup attachments, by cgroup and type.
	links map[attachment]link.Link
	// proxyCgroup is smeshd's own cgroup.
	proxyCgroup     string
	mode            Mode
	spliceProxyHops bool
	// msgAttached: the sk_msg program is attached to the sockhash.
	msgAttached bool
	// pins is the locked pin directory, nil unless Options.PinDir is set.
	pins   *pins
	ns     *nsMaps
	events *ringbuf.Reader // smesh_netns_events, once NetnsEvents opened it
	closed bool
}

// New loads the data path (Load) and attaches it to opts.Cgroups
// (SetCapture). Until namespaces are registered with SetNamespace, connect4
// captures nothing: see Options.FailClosed.
func New(opts Options) (*Datapath, error) {
	d, err := Load(opts)
	if err != nil {
		return nil, err
	}
	if err := d.SetCapture(opts.Cgroups, opts.IncludeCIDRs, opts.ExcludeCIDRs, opts.ExcludePorts); err != nil {
		d.Close()
		return nil, err
	}
	d.log.Info().Str("mode", string(opts.Mode)).Strs("cgroups", opts.Cgroups).
		Str("proxy_cgroup", opts.ProxyCgroup).Msg("data path attached")
	return d, nil
}

// Load loads the programs and attaches sk_msg to the sockhash, but attaches
// nothing to a cgroup yet: the caller registers the namespaces it serves
// (SetNamespace) and then calls SetCapture, so that no connection meets
// connect4 before smeshd can take it. On error, everything already made is
// undone.
func Load(opts Options) (_ *Datapath, err error) {
	d := &Datapath{log: opts.Logger.With().Str("component", "datapath").Logger()}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	if !opts.ProxyAddr.Addr().Is4() {
		return nil, fmt.Errorf("proxy address %s: only IPv4 is supported", opts.ProxyAddr)
	}
	proxyCgroupID, err := cgroups.ID(opts.ProxyCgroup)
	if err != nil {
		return nil, err
	}
	if opts.PinDir != "" {
		if d.pins, err = openPins(opts.PinDir); err != nil {
			return nil, err
		}
	}
	if err := d.load(opts, proxyCgroupID); err != nil {
		return nil, err
	}
	if opts.Mode == ModeSplice {
		err := link.RawAttachProgram(link.RawAttachProgramOptions{
			Target:  d.sockops.SmeshSockhash.FD(),
			Program: d.msg,
			Attach:  ebpf.AttachSkMsgVerdict,
		})
		if err != nil {
			return nil, fmt.Errorf("attaching sk_msg to the sockhash: %w", err)
		}
		d.msgAttached = true
	}
	// smeshd's own cgroup gets sock_ops (its sockets are hop ends) and
	// getsockopt (SO_ORIGINAL_DST), never connect4.
	d.proxyCgroup, d.mode, d.spliceProxyHops = opts.ProxyCgroup, opts.Mode, opts.SpliceProxyHops
	d.ns = &nsMaps{addrs: d.sockops.SmeshAddrs, nsAddrs: d.sockops.SmeshNsAddrs, ready: d.sockops.SmeshNetns}
	// A pinned set adopted from an earlier run names that run's
	// namespaces; the caller registers the current ones.
	if err := d.ns.reset(); err != nil {
		return nil, err
	}
	return d, nil
}

func (d *Datapath) load(opts Options, proxyCgroupID uint64) error {
	// sock_ops is loaded first: its maps are the shared instances the other
	// objects reuse.
	spec, err := sockops.LoadSockops()
	if err != nil {
		return fmt.Errorf("loading sockops spec: %w", err)
	}
	spec.Maps["smesh_sockhash"].MaxEntries = opts.MapSize
	spec.Maps["smesh_orig_dst"].MaxEntries = opts.MapSize
	if err := spec.Variables["splice"].Set(opts.Mode == ModeSplice); err != nil {
		return fmt.Errorf("setting sockops splice: %w", err)
	}
	if err := spec.Variables["splice_proxy_hops"].Set(opts.SpliceProxyHops); err != nil {
		return fmt.Errorf("setting sockops splice_proxy_hops: %w", err)
	}
	if err := spec.LoadAndAssign(&d.sockops, d.pinOptions(spec)); err != nil {
		return fmt.Errorf("loading sockops: %w", d.loadError(err))
	}
	shared := map[string]*ebpf.Map{
		"smesh_sockhash": d.sockops.SmeshSockhash,
		"smesh_orig_dst": d.sockops.SmeshOrigDst,
		"smesh_sk_state": d.sockops.SmeshSkState,
		"smesh_addrs":    d.sockops.SmeshAddrs,
		"smesh_ns_addrs": d.sockops.SmeshNsAddrs,
		"smesh_stats":    d.sockops.SmeshStats,
		"smesh_counters": d.sockops.SmeshCounters,
		"smesh_netns":    d.sockops.SmeshNetns,
	}

	cspec, err := connect.LoadConnect()
	if err != nil {
		return fmt.Errorf("loading connect spec: %w", err)
	}
	if err := setConnectVars(cspec, opts, proxyCgroupID); err != nil {
		return err
	}
	if err := cspec.Variables["fail_closed"].Set(opts.FailClosed); err != nil {
		return fmt.Errorf("setting connect fail_closed: %w", err)
	}
	copts := d.pinOptions(cspec)
	copts.MapReplacements = sharedFor(cspec, shared)
	if err := cspec.LoadAndAssign(&d.connect, copts); err != nil {
		return fmt.Errorf("loading connect: %w", d.loadError(err))
	}

	// Copy mode attaches no sk_msg program, so none is loaded: where the
	// kernel cannot load the bounded one (Linux 6.1: no kfuncs), loading
	// it anyway would stop the copy data path too.
	if opts.Mode != ModeSplice {
		return nil
	}
	if d.msg, err = loadSkmsg(opts.SpliceQueueLimit, shared); err != nil {
		return verifierError(explainLoadError(err))
	}
	return nil
}

// loadSkmsg loads the sk_msg program: bounded to limit bytes queued at a
// peer (smesh_skmsg), or without a bound when limit is 0
// (smesh_skmsg_unbounded, for kernels that cannot bound: see
// Options.SpliceQueueLimit). shared are the maps to use; nil makes the
// program's own. Errors keep the verifier's log for the caller to show
// (verifierError) or to summarise (a probe).
func loadSkmsg(limit uint32, shared map[string]*ebpf.Map) (*ebpf.Program, error) {
	spec, err := skmsg.LoadSkmsg()
	if err != nil {
		return nil, fmt.Errorf("loading skmsg spec: %w", err)
	}
	if limit > 0 {
		if err := spec.Variables["splice_queue_limit"].Set(limit); err != nil {
			return nil, fmt.Errorf("setting skmsg splice_queue_limit: %w", err)
		}
		var objs struct {
			Prog *ebpf.Program `ebpf:"smesh_skmsg"`
		}
		if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: sharedFor(spec, shared)}); err != nil {
			return nil, fmt.Errorf("loading sk_msg (bounded): %w", err)
		}
		return objs.Prog, nil
	}
	var objs struct {
		Prog *ebpf.Program `ebpf:"smesh_skmsg_unbounded"`
	}
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: sharedFor(spec, shared)}); err != nil {
		return nil, fmt.Errorf("loading sk_msg: %w", err)
	}
	return objs.Prog, nil
}

// setConnectVars sets the load-time constants of the capture decision
// (capture.h), in connect4 and in the test harness alike.
func setConnectVars(spec *ebpf.CollectionSpec, opts Options, proxyCgroupID uint64) error {
	vars := []struct {
		name  string
		value any
	}{
		{"proxy_ip4", opts.ProxyAddr.Addr().As4()},
		{"proxy_port", opts.ProxyAddr.Port()},
		{"proxy_cgroup", proxyCgroupID},
		{"capture_local", opts.Mode == ModeCopy},
	}
	for _, v := range vars {
		if err := spec.Variables[v.name].Set(v.value); err != nil {
			return fmt.Errorf("setting connect %s: %w", v.name, err)
		}
	}
	return nil
}

// sharedFor picks the shared maps a spec declares (replacements must exist
// in the spec) and sizes the spec's declarations like the real maps, which
// cilium/ebpf checks before replacing.
func sharedFor(spec *ebpf.CollectionSpec, shared map[string]*ebpf.Map) map[string]*ebpf.Map {
	out := make(map[string]*ebpf.Map)
	for name, m := range shared {
		if ms, ok := spec.Maps[name]; ok {
			ms.MaxEntries = m.MaxEntries()
			out[name] = m
		}
	}
	return out
}

// pinOptions pins (or adopts) every map of spec when the capture is pinned.
func (d *Datapath) pinOptions(spec *ebpf.CollectionSpec) *ebpf.CollectionOptions {
	if d.pins == nil {
		return &ebpf.CollectionOptions{}
	}
	for name, m := range spec.Maps {
		// .rodata and friends hold this load's constants: never shared.
		if !strings.HasPrefix(name, ".") {
			m.Pinning = ebpf.PinByName
		}
	}
	return &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: d.pins.dir}}
}

func (d *Datapath) loadError(err error) error {
	if d.pins != nil && errors.Is(err, ebpf.ErrMapIncompatible) {
		return fmt.Errorf("the maps pinned in %s were made with other settings (datapath.map_size?); "+
			"`smeshd cleanup` removes them (and with them the splice of open same-node connections): %w", d.pins.dir, err)
	}
	return verifierError(explainLoadError(err))
}

// verifierError makes err carry the verifier's whole log, which says why
// a program was refused, when there is one.
func verifierError(err error) error {
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		return fmt.Errorf("%w\nverifier log:\n%+v", err, ve)
	}
	return err
}

// captureMaps are the maps connect4's decision reads, filled from
// [capture]; the test harness fills its own copies the same way.
type captureMaps struct {
	include, exclude, excludePorts *ebpf.Map
}

// sync makes the maps hold exactly what opts asks for. New entries go in
// before stale ones go out, so a pinned capture being adopted never sees an
// empty include list (which would let connections out uncaptured).
func (m captureMaps) sync(includeCIDRs, excludeCIDRs []netip.Prefix, excludePorts []uint16) error {
	include := make(map[connect.ConnectLpmKey]bool)
	for _, p := range includeCIDRs {
		include[lpmKey(p)] = true
	}
	exclude := make(map[connect.ConnectLpmKey]bool)
	for _, p := range excludeCIDRs {
		exclude[lpmKey(p)] = true
	}
	ports := make(map[uint32]bool)
	for _, port := range excludePorts {
		ports[uint32(port)] = true
	}
	return errors.Join(
		syncSet(m.include, include, "capture.include_cidrs"),
		syncSet(m.exclude, exclude, "capture.exclude_cidrs"),
		syncSet(m.excludePorts, ports, "capture.exclude_ports"),
	)
}

// syncSet makes a set-like map (value 1 for members) hold exactly want.
func syncSet[K comparable](m *ebpf.Map, want map[K]bool, what string) error {
	for k := range want {
		if err := m.Put(k, uint8(1)); err != nil {
			return fmt.Errorf("adding to %s: %w", what, err)
		}
	}
	var k K
	var v uint8
	var stale []K
	it := m.Iterate()
	for it.Next(&k, &v) {
		if !want[k] {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading %s: %w", what, err)
	}
	for _, k := range stale {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("removing from %s: %w", what, err)
		}
	}
	return nil
}

// lpmKey is the trie key of a prefix; IPv4 prefixes are stored v4-mapped
// (capture.h).
func lpmKey(p netip.Prefix) connect.ConnectLpmKey {
	bits := p.Bits()
	if p.Addr().Is4() {
		bits += 96
	}
	return connect.ConnectLpmKey{Prefixlen: uint32(bits), Ip: bpfAddr(p.Masked().Addr())}
}

// ip4 turns an IPv4 address into the __u32 the programs compare against:
// network byte order, read as a little-endian integer by the map's encoding.
func ip4(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}

// attachment is one program type attached to one cgroup.
type attachment struct {
	cgroup string
	typ    ebpf.AttachType
}

// SetCapture changes what is captured: the enrolled cgroups and the
// destination rules. New attachments and rules are in place before old ones
// go, and open connections are not touched.
func (d *Datapath) SetCapture(cgroups []string, include, exclude []netip.Prefix, ports []uint16) error {
	capture := captureMaps{d.connect.SmeshInclude, d.connect.SmeshExclude, d.connect.SmeshExcludePorts}
	if err := capture.sync(include, exclude, ports); err != nil {
		return err
	}
	// smeshd's own cgroup: getsockopt answers SO_ORIGINAL_DST; sock_ops
	// only when its sockets are to be spliced.
	want := map[attachment]*ebpf.Program{
		{d.proxyCgroup, ebpf.AttachCGroupGetsockopt}: d.connect.SmeshGetsockopt,
	}
	if d.spliceProxyHops {
		want[attachment{d.proxyCgroup, ebpf.AttachCGroupSockOps}] = d.sockops.SmeshSockops
	}
	for _, cg := range cgroups {
		want[attachment{cg, ebpf.AttachCGroupSockOps}] = d.sockops.SmeshSockops
	}
	// connect4 last: a cgroup is captured only once its sockets are seen
	// by sock_ops.
	for _, cg := range cgroups {
		want[attachment{cg, ebpf.AttachCgroupInet4GetPeername}] = d.connect.SmeshGetpeername4
		want[attachment{cg, ebpf.AttachCGroupInet4Connect}] = d.connect.SmeshConnect4
	}
	if d.links == nil {
		d.links = make(map[attachment]link.Link)
	}
	for _, typ := range []ebpf.AttachType{ebpf.AttachCGroupSockOps, ebpf.AttachCGroupGetsockopt, ebpf.AttachCgroupInet4GetPeername, ebpf.AttachCGroupInet4Connect} {
		for a, prog := range want {
			if a.typ != typ || d.links[a] != nil {
				continue
			}
			l, err := d.attach(a, prog)
			if err != nil {
				return err
			}
			d.links[a] = l
		}
	}
	var errs []error
	for a, l := range d.links {
		if _, ok := want[a]; !ok {
			errs = append(errs, d.detach(a, l))
			delete(d.links, a)
		}
	}
	if d.pins != nil {
		keep := make(map[string]bool)
		for a := range d.links {
			keep[d.pins.linkPath(a.typ, a.cgroup)] = true
		}
		errs = append(errs, d.pins.pruneLinks(keep))
	}
	return errors.Join(errs...)
}

func (d *Datapath) attach(a attachment, prog *ebpf.Program) (link.Link, error) {
	if d.pins != nil {
		return d.pins.attach(d.pins.linkPath(a.typ, a.cgroup), a.cgroup, a.typ, prog)
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: a.cgroup, Attach: a.typ, Program: prog})
	if err != nil {
		return nil, fmt.Errorf("attaching %s to %s: %w", a.typ, a.cgroup, err)
	}
	return l, nil
}

// detach removes one attachment for good, pinned or not.
func (d *Datapath) detach(a attachment, l link.Link) error {
	if d.pins != nil {
		if err := l.Unpin(); err != nil {
			l.Close()
			return fmt.Errorf("unpinning %s of %s: %w", a.typ, a.cgroup, err)
		}
	}
	if err := l.Close(); err != nil {
		return fmt.Errorf("detaching %s from %s: %w", a.typ, a.cgroup, err)
	}
	return nil
}

// StopCapture detaches connect4 from every enrolled cgroup, so that new
// connections go out directly while smeshd drains the ones it relays. A
// pinned capture (on_failure = "closed") stays: there, new connections are
// to be refused while smeshd is away.
func (d *Datapath) StopCapture() error {
	if d.pins != nil {
		return nil
	}
	var errs []error
	for a, l := range d.links {
		if a.typ == ebpf.AttachCGroupInet4Connect {
			errs = append(errs, d.detach(a, l))
			delete(d.links, a)
		}
	}
	return errors.Join(errs...)
}

// Mode is the data path's mode.
func (d *Datapath) Mode() Mode { return d.mode }

// SetNamespace tells the programs about a network namespace smeshd serves
// (by netns cookie): its addresses, which make destinations on this node
// known as such and name the namespace of a spliced hop's peer, and whether
// smeshd's listeners in it are up (ready), without which connect4 does not
// capture there (Options.FailClosed decides). It replaces what an earlier
// call said about the namespace.
func (d *Datapath) SetNamespace(cookie uint64, addrs []netip.Addr, ready bool) error {
	return d.ns.set(cookie, addrs, ready)
}

// RemoveNamespace forgets a namespace: capture stops there, and its
// addresses are no longer on this node.
func (d *Datapath) RemoveNamespace(cookie uint64) error {
	return d.ns.remove(cookie)
}

// Counters are the events the programs count, since load.
type Counters struct {
	// UnreadyOpen and UnreadyClosed count connections connect4 would have
	// captured in a namespace without a ready listener, let through
	// (on_failure = "open") or refused ("closed").
	UnreadyOpen, UnreadyClosed uint64
}

// Counters sums the per-CPU event counters.
func (d *Datapath) Counters() (Counters, error) {
	read := func(slot uint32) (uint64, error) {
		var perCPU []uint64
		if err := d.sockops.SmeshCounters.Lookup(slot, &perCPU); err != nil {
			return 0, fmt.Errorf("reading counter %d: %w", slot, err)
		}
		var sum uint64
		for _, v := range perCPU {
			sum += v
		}
		return sum, nil
	}
	var c Counters
	var err1, err2 error
	c.UnreadyOpen, err1 = read(0)
	c.UnreadyClosed, err2 = read(1)
	return c, errors.Join(err1, err2)
}

// NetnsEvent says that a process connected from a network namespace where
// connect4 would capture but smeshd has no listener.
type NetnsEvent struct {
	Cookie uint64
	PID    int
}

// NetnsEvents delivers connect4's NetnsEvents until the data path is
// closed. It may be called once.
func (d *Datapath) NetnsEvents() (<-chan NetnsEvent, error) {
	if d.events != nil {
		return nil, errors.New("NetnsEvents called twice")
	}
	r, err := ringbuf.NewReader(d.connect.SmeshNetnsEvents)
	if err != nil {
		return nil, fmt.Errorf("reading namespace events: %w", err)
	}
	d.events = r
	ch := make(chan NetnsEvent, 16)
	go func() {
		defer close(ch)
		var ev connect.ConnectNetnsEvent
		for {
			rec, err := r.Read()
			if err != nil {
				// Closed; any other error would repeat.
				return
			}
			if _, err := binary.Decode(rec.RawSample, binary.NativeEndian, &ev); err != nil {
				continue
			}
			ch <- NetnsEvent{Cookie: ev.Netns, PID: int(ev.Pid)}
		}
	}()
	return ch, nil
}

// Stats are the spliced bytes and messages counted in BPF since load.
type Stats struct {
	ClientToServer sockops.SockopsSpliceStats
	ServerToClient sockops.SockopsSpliceStats
}

// Stats sums the per-CPU splice counters.
func (d *Datapath) Stats() (Stats, error) {
	var s Stats
	for slot, dst := range []*sockops.SockopsSpliceStats{&s.ClientToServer, &s.ServerToClient} {
		var perCPU []sockops.SockopsSpliceStats
		if err := d.sockops.SmeshStats.Lookup(uint32(slot), &perCPU); err != nil {
			return Stats{}, fmt.Errorf("reading splice counters: %w", err)
		}
		for _, c := range perCPU {
			dst.Bytes += c.Bytes
			dst.Msgs += c.Msgs
		}
	}
	return s, nil
}

// SplicedSockets counts the sockets in the sockhash: both ends of every
// spliced hop. It walks the map, one syscall per entry, so it is for
// scrapes, not the data path.
func (d *Datapath) SplicedSockets() (int, error) {
	var key sockops.SockopsSockKey
	var cookie uint64
	n := 0
	it := d.sockops.SmeshSockhash.Iterate()
	for it.Next(&key, &cookie) {
		n++
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("walking sockhash: %w", err)
	}
	return n, nil
}

// Close detaches and unloads everything, except a pinned capture, which
// stays attached for the next smeshd to adopt. It is safe to call more than
// once.
func (d *Datapath) Close() error {
	if d.closed {
		return nil
	}
	d.closed = true
	var errs []error
	// connect4 first, so nothing is captured once the rest is gone.
	for _, typ := range []ebpf.AttachType{ebpf.AttachCGroupInet4Connect, ebpf.AttachCgroupInet4GetPeername, ebpf.AttachCGroupGetsockopt, ebpf.AttachCGroupSockOps} {
		for a, l := range d.links {
			if a.typ == typ {
				// Closing a pinned link leaves it attached, by design.
				if err := l.Close(); err != nil {
					errs = append(errs, fmt.Errorf("detaching %s from %s: %w", a.typ, a.cgroup, err))
				}
			}
		}
	}
	d.links = nil
	if d.events != nil {
		d.events.Close()
	}
	if d.msgAttached && d.pins == nil {
		err := link.RawDetachProgram(link.RawDetachProgramOptions{
			Target:  d.sockops.SmeshSockhash.FD(),
			Program: d.msg,
			Attach:  ebpf.AttachSkMsgVerdict,
		})
		if err != nil {
			errs = append(errs, fmt.Errorf("detaching sk_msg: %w", err))
		}
		d.msgAttached = false
	}
	if d.msg != nil {
		errs = append(errs, d.msg.Close())
	}
	for _, c := range []interface{ Close() error }{&d.connect, &d.sockops} {
		if err := c.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	d.pins.close()
	return errors.Join(errs...)
}
