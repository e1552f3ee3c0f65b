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
	"maps"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

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
	// ProxyAddr is where captured IPv4 connections (and v4-mapped ones of
	// dual-stack sockets) are sent ([outbound] listen); ProxyAddr6 where
	// IPv6 ones are ([outbound] listen6).
	ProxyAddr, ProxyAddr6 netip.AddrPort
	// ProxyCgroup is smeshd's own cgroup: its sockets are hop ends too, and
	// they are never captured.
	ProxyCgroup string
	// IncludeCIDRs, ExcludeCIDRs and ExcludePorts are what tests hand to
	// SetCapture; Load does not read them.
	IncludeCIDRs []netip.Prefix
	ExcludeCIDRs []netip.Prefix
	ExcludePorts []uint16
	// MapSize bounds the sockhash, the original-destination map,
	// smesh_src_ids (beside it) and smesh_dirs (one entry per socket in
	// the sockhash).
	MapSize uint32
	// ServiceMapSize bounds smesh_services (service ports), BackendMapSize
	// smesh_backends and smesh_svc_members (their backends, with room
	// for the revisions being replaced: ServiceTable). 0: the sizes in
	// service.h.
	ServiceMapSize, BackendMapSize uint32
	// SpliceProxyHops splices the hops with smeshd at one end too (see
	// splice_proxy_hops in sockops.c).
	SpliceProxyHops bool
	// SpliceQueueLimit bounds the bytes a spliced hop may queue at its
	// peer before its direction is demoted to TCP (skmsg.c). 0 splices
	// without a bound, for kernels that cannot bound (Probe's "bounded
	// splice"): a reader that stalls can then make its writer queue until
	// the node's TCP memory runs out.
	SpliceQueueLimit uint32
	// resplice loads the bounded sk_msg program with issue 27's naive
	// re-splice (skmsg.c, docs/resplice.md): an experiment, set only by
	// tests, never by configuration.
	resplice bool
	// PinDir, when set, pins the capture there (on bpffs) so that it
	// outlives smeshd: [capture] on_failure = "closed". Empty: everything
	// is detached when smeshd stops or dies.
	PinDir string
	// FailClosed refuses the connections connect4 would capture in a
	// network namespace where smeshd has no listener (yet); false lets them
	// through uncaptured. [capture] on_failure.
	FailClosed bool
	// Adopt are the kernel objects a predecessor handed over (its
	// Handover, received with pkg/handover), by name. Load and SetCapture
	// take the ones they use out of the map (and own them from then on):
	// maps are used as they are (those of another layout, e.g. another
	// MapSize, are made anew and filled from the old: migrate.go),
	// attachments get the new programs (BPF_LINK_UPDATE), nothing is
	// detached meanwhile. The caller closes what is left.
	Adopt  map[string]*os.File
	Logger zerolog.Logger
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
	// proxyCgroup is smeshd's own cgroup, proxyCgroupID its id.
	proxyCgroup     string
	proxyCgroupID   uint64
	mode            Mode
	spliceProxyHops bool
	// msgAttached: the sk_msg program is attached to the sockhash.
	msgAttached bool
	// pins is the locked pin directory, nil unless Options.PinDir is set.
	pins   *pins
	ns     *nsMaps
	events *ringbuf.Reader // smesh_netns_events, once NetnsEvents opened it
	// rules are what SetCapture last wrote into the capture maps.
	rules    *captureRules
	services *ServiceTable
	closed   bool
	// ident serializes the writers of the identity and policy maps
	// (identity.go).
	ident identState

	// adopt is Options.Adopt: what is left of a predecessor's objects.
	adopt map[string]*os.File
	// mapNames are the maps of both objects (their specs' names), which
	// Handover hands over.
	mapNames []string
	// handedOver: the maps are a running predecessor's (by descriptor, or
	// by pin with its lock), so their contents are kept.
	handedOver bool
	// prevProgs are the programs the predecessor's links ran before this
	// Datapath swapped its own in, and prevMsg the sk_msg program its
	// sockhash had: Close gives them back should this start fail, so that
	// the predecessor, which keeps serving, keeps its own programs. Commit
	// forgets them.
	prevProgs map[attachment]ebpf.ProgramID
	prevMsg   ebpf.ProgramID
	// inherited are the attachments of the cgroups of predecessors
	// (inheritedAttachments), found in the first SetCapture.
	inherited map[attachment]*ebpf.Program
	// remade are the maps this load made anew because the predecessor's
	// (or the pinned ones) had another layout, with the old ones, kept
	// until Commit (migrate.go).
	remade map[string]*remade

	// enrolled are the cgroups of the last SetCapture, with their ids.
	enrolled map[string]uint64
	// strict is bpf/strict (strict.go), nil where the kernel cannot load
	// it (strictErr says why); strictWant the last SetStrict, strictLinks
	// its attachments.
	strict      *strictObjects
	strictErr   error
	strictWant  map[string]StrictOptions
	strictLinks map[attachment]link.Link
	// strictIDs are the ids, read at SetStrict, of strict cgroups below
	// an enrolled cgroup (not enrolled themselves).
	strictIDs map[string]uint64
	// strictPrev are the programs of a running predecessor's strict
	// links, given back by Close before Commit as prevProgs are.
	strictPrev map[attachment]ebpf.ProgramID
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
		return nil, fmt.Errorf("proxy address %s: want an IPv4 address", opts.ProxyAddr)
	}
	if !opts.ProxyAddr6.Addr().Is6() || opts.ProxyAddr6.Addr().Is4In6() || opts.ProxyAddr6.Port() == 0 {
		return nil, fmt.Errorf("IPv6 proxy address %q: want an IPv6 address and port", opts.ProxyAddr6)
	}
	proxyCgroupID, err := cgroups.ID(opts.ProxyCgroup)
	if err != nil {
		return nil, err
	}
	d.adopt = opts.Adopt
	if opts.PinDir != "" {
		if err := d.openPins(opts.PinDir); err != nil {
			return nil, err
		}
	}
	if err := d.load(opts, proxyCgroupID); err != nil {
		return nil, err
	}
	if opts.Mode == ModeSplice {
		// Attaching to a handed-over sockhash replaces the predecessor's
		// program (a sockhash has one sk_msg program); sockets already in
		// it keep the one they were added with.
		if d.handedOver {
			if d.prevMsg, err = skMsgProgram(d.sockops.SmeshSockhash); err != nil {
				return nil, err
			}
		}
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
	d.proxyCgroup, d.proxyCgroupID = opts.ProxyCgroup, proxyCgroupID
	d.mode, d.spliceProxyHops = opts.Mode, opts.SpliceProxyHops
	d.ns = &nsMaps{addrs: d.sockops.SmeshAddrs, nsAddrs: d.sockops.SmeshNsAddrs, ready: d.sockops.SmeshNetns}
	if d.handedOver {
		// The namespaces a running predecessor registered stay ready:
		// their listeners were handed over too. The caller reconciles
		// (SetNamespace, RemoveNamespace) once it has looked around.
		if err := d.ns.load(); err != nil {
			return nil, err
		}
	} else if err := d.ns.reset(); err != nil {
		// A pinned set adopted from an earlier run names that run's
		// namespaces; the caller registers the current ones.
		return nil, err
	}
	d.services, err = newServiceTable(serviceMaps{d.connect.SmeshServices, d.connect.SmeshBackends, d.connect.SmeshSvcMembers}, d.handedOver)
	if err != nil {
		return nil, err
	}
	return d, nil
}

// openPins locks the pin directory, or takes the lock a predecessor handed
// over.
func (d *Datapath) openPins(dir string) error {
	fd, err := takeFD(d.adopt, lockName)
	if err != nil {
		return err
	}
	if fd < 0 {
		d.pins, err = openPins(dir)
		return err
	}
	d.pins, err = adoptPins(dir, os.NewFile(uintptr(fd), dir))
	d.handedOver = err == nil
	return err
}

// skMsgProgram is the sk_msg program attached to a sockhash, 0 for none.
func skMsgProgram(sockhash *ebpf.Map) (ebpf.ProgramID, error) {
	res, err := link.QueryPrograms(link.QueryOptions{Target: sockhash.FD(), Attach: ebpf.AttachSkMsgVerdict})
	if err != nil {
		return 0, fmt.Errorf("querying the sk_msg program of the handed-over sockhash: %w", err)
	}
	if len(res.Programs) == 0 {
		return 0, nil
	}
	return res.Programs[0].ID, nil
}

func (d *Datapath) load(opts Options, proxyCgroupID uint64) error {
	// sock_ops is loaded first: its maps are the shared instances the other
	// objects reuse.
	spec, err := sockopsSpec(opts)
	if err != nil {
		return err
	}
	// Maps a predecessor handed over are used as they are: by
	// descriptor, or, when pinned, by their pins (checked to be the same).
	// Those of another layout are made anew (migrate.go).
	handed, other, err := takeMaps(spec, d.adopt)
	if err != nil {
		return err
	}
	defer closeMaps(handed)
	sopts := d.pinOptions(spec)
	if err := d.remakeOther(spec, other, nil); err != nil {
		return err
	}
	if d.pins == nil {
		sopts.MapReplacements = handed
	}
	if err := spec.LoadAndAssign(&d.sockops, sopts); err != nil {
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
		"smesh_dirs":     d.sockops.SmeshDirs,
		"smesh_src_sk":   d.sockops.SmeshSrcSk,
		"smesh_src_ids":  d.sockops.SmeshSrcIds,
	}

	cspec, err := connectSpec(opts, proxyCgroupID)
	if err != nil {
		return err
	}
	copts := d.pinOptions(cspec)
	copts.MapReplacements = sharedFor(cspec, shared)
	// The shared maps were taken (or not) with sockops'; these are
	// connect's own.
	chanded, cother, err := takeMaps(cspec, d.adopt)
	if err != nil {
		return err
	}
	defer closeMaps(chanded)
	if err := d.remakeOther(cspec, cother, copts.MapReplacements); err != nil {
		return err
	}
	if d.pins == nil {
		maps.Copy(copts.MapReplacements, chanded)
	}
	if err := cspec.LoadAndAssign(&d.connect, copts); err != nil {
		return fmt.Errorf("loading connect: %w", d.loadError(err))
	}
	if len(handed)+len(chanded)+len(other)+len(cother) > 0 {
		d.handedOver = true
		if d.pins != nil {
			if err := errors.Join(d.checkSameMaps(handed), d.checkSameMaps(chanded)); err != nil {
				return err
			}
		}
	}
	if err := d.migrateLoad(); err != nil {
		return err
	}
	d.mapNames = slices.Compact(slices.Sorted(slices.Values(slices.Concat(specMapNames(spec), specMapNames(cspec)))))
	if err := d.loadStrict(shared); err != nil {
		return err
	}
	if d.strict != nil {
		d.mapNames = slices.Compact(slices.Sorted(slices.Values(slices.Concat(d.mapNames, strictMapNames))))
	}

	// Copy mode attaches no sk_msg program, so none is loaded: where the
	// kernel cannot load the bounded one (Linux 6.1: no kfuncs), loading
	// it anyway would stop the copy data path too.
	if opts.Mode != ModeSplice {
		return nil
	}
	if d.msg, err = loadSkmsg(opts.SpliceQueueLimit, opts.resplice, shared); err != nil {
		return verifierError(explainLoadError(err))
	}
	return nil
}

// loadSkmsg loads the sk_msg program: bounded to limit bytes queued at a
// peer (smesh_skmsg), or without a bound when limit is 0
// (smesh_skmsg_unbounded, for kernels that cannot bound: see
// Options.SpliceQueueLimit); resplice sets Options.resplice's experiment
// (bounded only). shared are the maps to use; nil makes the
// program's own. Errors keep the verifier's log for the caller to show
// (verifierError) or to summarise (a probe).
func loadSkmsg(limit uint32, resplice bool, shared map[string]*ebpf.Map) (*ebpf.Program, error) {
	spec, err := skmsg.LoadSkmsg()
	if err != nil {
		return nil, fmt.Errorf("loading skmsg spec: %w", err)
	}
	if limit > 0 {
		if err := spec.Variables["splice_queue_limit"].Set(limit); err != nil {
			return nil, fmt.Errorf("setting skmsg splice_queue_limit: %w", err)
		}
		if err := spec.Variables["resplice"].Set(resplice); err != nil {
			return nil, fmt.Errorf("setting skmsg resplice: %w", err)
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

// SizedMaps are the maps [datapath] map_size sizes: a successor with
// another map_size makes each of them anew (migrate.go).
var SizedMaps = []string{"smesh_sockhash", "smesh_orig_dst", "smesh_dirs", "smesh_src_ids"}

// sockopsSpec is the sock_ops object as opts loads it: map sizes and
// load-time constants set (Load, and the probes with small maps).
func sockopsSpec(opts Options) (*ebpf.CollectionSpec, error) {
	spec, err := sockops.LoadSockops()
	if err != nil {
		return nil, fmt.Errorf("loading sockops spec: %w", err)
	}
	for _, name := range SizedMaps {
		spec.Maps[name].MaxEntries = opts.MapSize
	}
	if err := spec.Variables["splice"].Set(opts.Mode == ModeSplice); err != nil {
		return nil, fmt.Errorf("setting sockops splice: %w", err)
	}
	if err := spec.Variables["splice_proxy_hops"].Set(opts.SpliceProxyHops); err != nil {
		return nil, fmt.Errorf("setting sockops splice_proxy_hops: %w", err)
	}
	// The bounded sk_msg program closes the directions that spliced
	// (close_own in skmsg.c), the experiment's re-splice aside.
	peersClose := opts.Mode == ModeSplice && opts.SpliceQueueLimit > 0 && !opts.resplice
	if err := spec.Variables["peers_close"].Set(peersClose); err != nil {
		return nil, fmt.Errorf("setting sockops peers_close: %w", err)
	}
	return spec, nil
}

// connectSpec is the connect object (connect4/6, getpeername4/6,
// getsockopt) as opts loads it (Load, and the probes).
func connectSpec(opts Options, proxyCgroupID uint64) (*ebpf.CollectionSpec, error) {
	spec, err := connect.LoadConnect()
	if err != nil {
		return nil, fmt.Errorf("loading connect spec: %w", err)
	}
	if err := setConnectVars(spec, opts, proxyCgroupID); err != nil {
		return nil, err
	}
	if opts.ServiceMapSize > 0 {
		spec.Maps["smesh_services"].MaxEntries = opts.ServiceMapSize
	}
	if opts.BackendMapSize > 0 {
		spec.Maps["smesh_backends"].MaxEntries = opts.BackendMapSize
		spec.Maps["smesh_svc_members"].MaxEntries = opts.BackendMapSize
	}
	if err := spec.Variables["fail_closed"].Set(opts.FailClosed); err != nil {
		return nil, fmt.Errorf("setting connect fail_closed: %w", err)
	}
	if err := spec.Variables["have_set_retval"].Set(HaveSetRetval() == nil); err != nil {
		return nil, fmt.Errorf("setting connect have_set_retval: %w", err)
	}
	return spec, nil
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
		{"proxy_ip6", proxyIP6(opts.ProxyAddr6)},
		{"proxy_port6", opts.ProxyAddr6.Port()},
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
		return fmt.Errorf("the maps pinned in %s were made with other settings (datapath.map_size?) or by another version of smeshd; "+
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

// attachOrder is the order attachments are made in: sock_ops and
// getsockopt before connect4 and connect6, so that a cgroup is captured
// only once its sockets are seen. Detaching goes the other way.
var attachOrder = []ebpf.AttachType{
	ebpf.AttachCGroupSockOps, ebpf.AttachCGroupGetsockopt,
	ebpf.AttachCgroupInet4GetPeername, ebpf.AttachCgroupInet6GetPeername,
	ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect,
}

// proxyIP6 is [outbound] listen6's address as connect6 compares it
// (network byte order); zero when IPv6 capture is off.
func proxyIP6(a netip.AddrPort) [4]uint32 {
	if !a.IsValid() {
		return [4]uint32{}
	}
	return bpfAddr(a.Addr()).Ip
}

// attachment is one program type attached to one cgroup. The cgroup is
// known by its id as well as its path: a cgroup removed and made again
// under the same path (systemd stops and starts a slice) is a new cgroup,
// which needs new attachments, while the old ones went with the old cgroup.
type attachment struct {
	cgroup string
	id     uint64
	typ    ebpf.AttachType
}

// captureRules are the destination rules the maps hold, as last set.
type captureRules struct {
	include, exclude []netip.Prefix
	ports            []uint16
}

// SetCapture changes what is captured: the enrolled cgroups and the
// destination rules. It applies all of it or none of it: the attachments it
// needs are made first, and should one fail, those just made are detached
// again and the rules are not touched; then the rules are written (and the
// previous ones written back should that fail); only then does what is no
// longer wanted go. Open connections are not touched. Every cgroup must
// exist; one that was removed and made again since the last call is
// attached anew.
func (d *Datapath) SetCapture(cgroupPaths []string, include, exclude []netip.Prefix, ports []uint16) error {
	ids := make([]uint64, len(cgroupPaths))
	for i, cg := range cgroupPaths {
		id, err := cgroups.ID(cg)
		if err != nil {
			return fmt.Errorf("enrolled cgroup: %w", err)
		}
		ids[i] = id
	}
	// smeshd's own cgroup: getsockopt answers SO_ORIGINAL_DST; sock_ops
	// only when its sockets are to be spliced.
	want := map[attachment]*ebpf.Program{
		{d.proxyCgroup, d.proxyCgroupID, ebpf.AttachCGroupGetsockopt}: d.connect.SmeshGetsockopt,
	}
	if d.spliceProxyHops {
		want[attachment{d.proxyCgroup, d.proxyCgroupID, ebpf.AttachCGroupSockOps}] = d.sockops.SmeshSockops
	}
	for a, prog := range d.inheritedAttachments() {
		want[a] = prog
	}
	for i, cg := range cgroupPaths {
		want[attachment{cg, ids[i], ebpf.AttachCGroupSockOps}] = d.sockops.SmeshSockops
	}
	// connect4 last: a cgroup is captured only once its sockets are seen
	// by sock_ops.
	for i, cg := range cgroupPaths {
		want[attachment{cg, ids[i], ebpf.AttachCgroupInet4GetPeername}] = d.connect.SmeshGetpeername4
		want[attachment{cg, ids[i], ebpf.AttachCgroupInet6GetPeername}] = d.connect.SmeshGetpeername6
		want[attachment{cg, ids[i], ebpf.AttachCGroupInet4Connect}] = d.connect.SmeshConnect4
		want[attachment{cg, ids[i], ebpf.AttachCGroupInet6Connect}] = d.connect.SmeshConnect6
	}
	capture := captureMaps{d.connect.SmeshInclude, d.connect.SmeshExclude, d.connect.SmeshExcludePorts}
	if d.remadeAny("smesh_include", "smesh_exclude", "smesh_exclude_ports") {
		// Made anew and not filled by a copy (another entry layout):
		// an empty include list lets connections out uncaptured, so the
		// rules go in before any connect4 reads these maps.
		if err := capture.sync(include, exclude, ports); err != nil {
			return err
		}
	}
	if d.links == nil {
		d.links = make(map[attachment]link.Link)
	}
	var added []attachment
	undo := func() {
		for i := len(added) - 1; i >= 0; i-- {
			a := added[i]
			if err := d.detach(a, d.links[a]); err != nil {
				d.log.Error().Err(err).Msg("undoing an attachment of a capture change that failed")
			}
			delete(d.links, a)
		}
	}
	for _, typ := range attachOrder {
		for a, prog := range want {
			if a.typ != typ || d.links[a] != nil {
				continue
			}
			l, adopted, err := d.attach(a, prog)
			if err != nil {
				undo()
				return err
			}
			d.links[a] = l
			if !adopted {
				added = append(added, a)
			}
		}
		if typ == ebpf.AttachCGroupSockOps {
			// A remade smesh_orig_dst gets what the old sock_ops
			// wrote until now, before getsockopt reads the new one.
			d.afterSockops()
		}
	}
	d.afterSwitch()

	if err := capture.sync(include, exclude, ports); err != nil {
		if prev := d.rules; prev != nil {
			if rerr := capture.sync(prev.include, prev.exclude, prev.ports); rerr != nil {
				d.log.Error().Err(rerr).Msg("writing back the previous capture rules")
			}
		}
		undo()
		return err
	}
	d.rules = &captureRules{slices.Clone(include), slices.Clone(exclude), slices.Clone(ports)}
	d.enrolled = make(map[string]uint64, len(cgroupPaths))
	for i, cg := range cgroupPaths {
		d.enrolled[cg] = ids[i]
	}
	// The strict recorders follow the enrolled cgroups; a cgroup no
	// longer enrolled is no longer strict. Failing here leaves mesh SYNs
	// of a newly enrolled cgroup unrecorded (dropped at a strict peer:
	// closed, not open). Not before the first SetStrict: a successor's
	// adopted smesh_strict serves the predecessor's programs until then.
	if d.strictWant != nil {
		if err := d.syncStrict(d.strictWant); err != nil {
			d.log.Error().Err(err).Msg("keeping strict inbound in line with the enrolled cgroups")
		}
	}

	// The new capture is in force. Detaching what it no longer needs does
	// not fail short of a kernel error; should it, the attachment stays
	// until smeshd stops, and the log says so. Handed-over attachments
	// not wanted go once the predecessor releases its copies.
	d.closeLeftLinks()
	for a, l := range d.links {
		if _, ok := want[a]; !ok {
			if err := d.detach(a, l); err != nil {
				d.log.Error().Err(err).Msg("detaching what the capture no longer needs")
			}
			delete(d.links, a)
		}
	}
	if d.pins != nil {
		keep := make(map[string]bool)
		for a := range d.links {
			keep[d.pins.linkPath(a.typ, a.id)] = true
		}
		if err := d.pins.pruneLinks(keep); err != nil {
			d.log.Error().Err(err).Msg("removing pinned attachments the capture no longer needs")
		}
	}
	return nil
}

// attach attaches prog as a. adopted: a pinned link of an earlier run or a
// link a predecessor handed over took prog, which undoing a failed change
// must leave in place.
func (d *Datapath) attach(a attachment, prog *ebpf.Program) (l link.Link, adopted bool, err error) {
	fd, err := takeFD(d.adopt, linkHandoverName(a.typ, a.id))
	if err != nil {
		return nil, false, err
	}
	var prev ebpf.ProgramID
	defer func() {
		// Only a running predecessor's programs are given back on a
		// failed start; an earlier run's pinned links keep the new ones.
		if adopted && d.handedOver && prev != 0 {
			if d.prevProgs == nil {
				d.prevProgs = make(map[attachment]ebpf.ProgramID)
			}
			d.prevProgs[a] = prev
		}
	}()
	if d.pins != nil {
		// The pin is the same link as the handed-over descriptor.
		if fd >= 0 {
			unix.Close(fd)
		}
		return d.pins.attach(d.pins.linkPath(a.typ, a.id), a.cgroup, a.typ, prog, &prev)
	}
	if fd >= 0 {
		if l, prev, err = d.adoptLink(fd, a, prog); err != nil || l != nil {
			return l, l != nil, err
		}
	}
	l, err = link.AttachCgroup(link.CgroupOptions{Path: a.cgroup, Attach: a.typ, Program: prog})
	if err != nil {
		return nil, false, fmt.Errorf("attaching %s to %s: %w", a.typ, a.cgroup, err)
	}
	return l, false, nil
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
		if a.typ == ebpf.AttachCGroupInet4Connect || a.typ == ebpf.AttachCGroupInet6Connect {
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
// capture there (Options.FailClosed decides): ready4 for [outbound] listen
// (IPv4 and v4-mapped destinations), ready6 for listen6 (IPv6 ones). It
// replaces what an earlier call said about the namespace.
func (d *Datapath) SetNamespace(cookie uint64, addrs []netip.Addr, ready4, ready6 bool) error {
	return d.ns.set(cookie, addrs, ready4, ready6)
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
	// Demotions counts spliced directions sk_msg moved to TCP.
	Demotions uint64
	// Released counts sockets sockops took out of the sockhash once their
	// sends went by TCP and their peer could no longer splice into them:
	// they are plain TCP sockets from then on (release() in sockops.c).
	Released uint64
	// SplicedConns counts same-node hops whose both ends sockops put in
	// the sockhash: connections spliced from their first byte on.
	SplicedConns uint64
	// Raced counts sockets whose first send took TCP because their peer's
	// end was not established yet, found to belong to a spliced hop: the
	// hop runs as plain TCP, its bytes counted as demoted.
	Raced uint64
	// Service connections connect4/6 sent to a backend: on this node
	// (spliced; relayed in copy mode), elsewhere and captured (through the
	// tunnel), elsewhere and not captured ([capture] rules); and those
	// refused because the Service had no backend.
	SvcLocal, SvcTunnel, SvcDirect, SvcNoBackend uint64
}

// Counters sums the per-CPU event counters.
func (d *Datapath) Counters() (Counters, error) {
	return countersFrom(d.sockops.SmeshCounters)
}

// countersFrom sums smesh_counters (slots: enum counter_slot in smesh.h).
func countersFrom(m *ebpf.Map) (Counters, error) {
	read := func(slot uint32) (uint64, error) {
		var perCPU []uint64
		if err := m.Lookup(slot, &perCPU); err != nil {
			return 0, fmt.Errorf("reading counter %d: %w", slot, err)
		}
		var sum uint64
		for _, v := range perCPU {
			sum += v
		}
		return sum, nil
	}
	var c Counters
	var errs [10]error
	c.UnreadyOpen, errs[0] = read(0)
	c.UnreadyClosed, errs[1] = read(1)
	c.Demotions, errs[2] = read(2)
	c.Released, errs[3] = read(3)
	c.SplicedConns, errs[4] = read(4)
	c.Raced, errs[5] = read(5)
	c.SvcLocal, errs[6] = read(6)
	c.SvcTunnel, errs[7] = read(7)
	c.SvcDirect, errs[8] = read(8)
	c.SvcNoBackend, errs[9] = read(9)
	return c, errors.Join(errs[:]...)
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

// Stats are the spliced bytes and messages counted in BPF since load, and
// the bytes demoted directions sent by TCP.
type Stats struct {
	ClientToServer sockops.SockopsSpliceStats
	ServerToClient sockops.SockopsSpliceStats
	// DemotedClientToServer and DemotedServerToClient are bytes.
	DemotedClientToServer, DemotedServerToClient uint64
}

// Bytes is what was spliced, both directions.
func (s Stats) Bytes() uint64 { return s.ClientToServer.Bytes + s.ServerToClient.Bytes }

// Msgs is how many messages were spliced, both directions.
func (s Stats) Msgs() uint64 { return s.ClientToServer.Msgs + s.ServerToClient.Msgs }

// Demoted is what demoted directions sent by TCP, both directions.
func (s Stats) Demoted() uint64 { return s.DemotedClientToServer + s.DemotedServerToClient }

// Stats sums the per-CPU splice counters.
func (d *Datapath) Stats() (Stats, error) {
	return statsFrom(d.sockops.SmeshStats)
}

// statsFrom sums smesh_stats (slots: enum stat_slot in smesh.h).
func statsFrom(m *ebpf.Map) (Stats, error) {
	var s Stats
	var demoted [2]sockops.SockopsSpliceStats
	for slot, dst := range []*sockops.SockopsSpliceStats{&s.ClientToServer, &s.ServerToClient, &demoted[0], &demoted[1]} {
		var perCPU []sockops.SockopsSpliceStats
		if err := m.Lookup(uint32(slot), &perCPU); err != nil {
			return Stats{}, fmt.Errorf("reading splice counters: %w", err)
		}
		for _, c := range perCPU {
			dst.Bytes += c.Bytes
			dst.Msgs += c.Msgs
		}
	}
	s.DemotedClientToServer, s.DemotedServerToClient = demoted[0].Bytes, demoted[1].Bytes
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

// Commit says that smeshd started: from now on a pinned capture
// (Options.PinDir) outlives Close and the process. Before Commit, Close
// also removes every pin this Datapath made, so that a start that fails
// leaves nothing pinned behind (an earlier run's pins stay).
//
// It also makes an adopted capture this Datapath's for good: before
// Commit, Close gives the predecessor's programs back to the links and the
// sockhash it handed over.
func (d *Datapath) Commit() {
	d.commitRemade()
	d.pins.commit()
	d.prevProgs, d.prevMsg = nil, 0
	d.strictPrev = nil
}

// Close detaches and unloads everything, except a pinned capture after
// Commit, which stays attached for the next smeshd to adopt. It is safe to
// call more than once.
func (d *Datapath) Close() error {
	if d.closed {
		return nil
	}
	d.closed = true
	var errs []error
	errs = append(errs, d.giveBack())
	d.closeRemade()
	// The strict ingress programs first: without the recorders they
	// would drop the mesh's SYNs.
	errs = append(errs, d.giveBackStrict(), d.closeStrict())
	// connect4 and connect6 first, so nothing is captured once the rest
	// is gone.
	for _, typ := range slices.Backward(attachOrder) {
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
	if d.services != nil {
		d.services.stop()
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
	if err := d.pins.rollback(); err != nil {
		errs = append(errs, fmt.Errorf("removing the pins of a failed start from %s: %w", d.pins.dir, err))
	}
	d.pins.close()
	return errors.Join(errs...)
}

// updateFromID makes link l run the loaded program id again (a
// predecessor's, given back).
func updateFromID(l link.Link, id ebpf.ProgramID) error {
	prog, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return err
	}
	defer prog.Close()
	return l.Update(prog)
}

// giveBack gives the predecessor's programs back to the links and the
// sockhash it handed over, before Commit: a start that fails leaves the
// predecessor, which keeps serving, as it was. (The maps' contents this
// Datapath changed meanwhile are the predecessor's to write again.)
func (d *Datapath) giveBack() error {
	var errs []error
	// In attachOrder, with a remade smesh_orig_dst copied back before and
	// after the sock_ops links get the predecessor's program back, and
	// before its getsockopt reads its own map again.
	if len(d.prevProgs) > 0 {
		d.copyBack()
	}
	for _, typ := range attachOrder {
		for a, id := range d.prevProgs {
			l := d.links[a]
			if l == nil || a.typ != typ {
				continue
			}
			if err := updateFromID(l, id); err != nil {
				errs = append(errs, fmt.Errorf("giving the %s link of %s its program back: %w", a.typ, a.cgroup, err))
			}
		}
		if typ == ebpf.AttachCGroupSockOps && len(d.prevProgs) > 0 {
			d.copyBack()
		}
	}
	d.prevProgs = nil
	if d.prevMsg != 0 && d.msgAttached {
		prog, err := ebpf.NewProgramFromID(d.prevMsg)
		if err == nil {
			err = link.RawAttachProgram(link.RawAttachProgramOptions{
				Target:  d.sockops.SmeshSockhash.FD(),
				Program: prog,
				Attach:  ebpf.AttachSkMsgVerdict,
			})
			prog.Close()
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("giving the sockhash its sk_msg program back: %w", err))
		} else {
			// Replaced: ours is no longer attached to detach.
			d.msgAttached = false
		}
		d.prevMsg = 0
	}
	return errors.Join(errs...)
}
