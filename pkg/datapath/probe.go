package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/bpf/skmsg"
	"github.com/smesh-dev/smesh/pkg/cgroups"
)

// Feature is one kernel capability smesh relies on and whether this kernel
// has it, or one privilege smeshd needs and whether it has it.
type Feature struct {
	Name string
	// NeededFor says which mode cannot work without it.
	NeededFor string
	// Privilege: a capability of smeshd's, not a feature of the kernel.
	// Without it the kernel's features cannot be probed either (they
	// fail with EPERM).
	Privilege bool
	Err       error
}

// privileges are the capabilities the data path needs; deploy/smeshd.service
// explains each. CAP_SYS_ADMIN stands in for both, as it does in the kernel
// (bpf_capable(), bpf_net_capable()).
var privileges = []struct {
	capability int
	name, why  string
}{
	{unix.CAP_BPF, "CAP_BPF", "to load BPF programs and create their maps"},
	{unix.CAP_NET_ADMIN, "CAP_NET_ADMIN", "to load connect4, sockopt, sock_ops and sk_msg programs and create the sockhash"},
}

// probePrivileges checks this process's effective capabilities.
func probePrivileges() []Feature {
	var fs []Feature
	has, err := effectiveCaps()
	for _, p := range privileges {
		f := Feature{Name: fmt.Sprintf("%s (%s)", p.name, p.why), NeededFor: "capture", Privilege: true}
		switch {
		case err != nil:
			f.Err = err
		case !has(p.capability) && !has(unix.CAP_SYS_ADMIN):
			f.Err = fmt.Errorf("missing capability %s", p.name)
		}
		fs = append(fs, f)
	}
	return fs
}

// effectiveCaps reads this process's effective capability set.
func effectiveCaps() (func(capability int) bool, error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return nil, fmt.Errorf("reading smeshd's capabilities: %w", err)
	}
	return func(c int) bool { return data[c/32].Effective&(1<<(uint(c)%32)) != 0 }, nil
}

// MissingPrivileges returns an error naming each capability smeshd lacks
// (Probe's privileges), or nil.
func MissingPrivileges(fs []Feature) error {
	var errs []error
	for _, f := range fs {
		if f.Privilege && f.Err != nil {
			errs = append(errs, f.Err)
		}
	}
	return errors.Join(errs...)
}

// Probe checks smeshd's privileges and the kernel for everything the
// data path uses (smeshd check). Program and map types say whether the
// kernel has a hook at all; smesh's own programs are then loaded as smeshd loads them, with small
// maps of their own, since what a program calls and reads is checked by the
// verifier only then: the hooks are older than what smesh does in them
// (bpf_get_netns_cookie reached sock_ops, sk_msg and cgroup/getsockopt in
// Linux 5.15, the kfuncs of the bounded sk_msg program in 6.2).
func Probe() []Feature {
	return probe(true)
}

// ProbeModes is what smeshd probes at start to choose its data path: the
// kinds of programs and maps, and whether the bounded sk_msg program loads.
// The other programs are loaded for real right after, and a kernel that
// refuses one stops smeshd with the verifier's reason (explainLoadError).
func ProbeModes() []Feature {
	return probe(false)
}

func probe(programs bool) []Feature {
	fs := probePrivileges()
	add := func(name, neededFor string, err error) {
		fs = append(fs, Feature{Name: name, NeededFor: neededFor, Err: err})
	}
	_, err := btf.LoadKernelSpec()
	add("BTF (/sys/kernel/btf/vmlinux)", "capture", err)
	_, err = cgroups.Mount()
	add("cgroup v2 mount", "capture", err)
	add("cgroup sock_addr programs (connect4)", "capture", features.HaveProgramType(ebpf.CGroupSockAddr))
	add("cgroup sockopt programs (SO_ORIGINAL_DST)", "capture", features.HaveProgramType(ebpf.CGroupSockopt))
	add("sock_ops programs", "capture", features.HaveProgramType(ebpf.SockOps))
	add("hash maps", "capture", features.HaveMapType(ebpf.Hash))
	add("LPM trie maps", "capture", features.HaveMapType(ebpf.LPMTrie))
	add("socket-local storage", "capture", features.HaveMapType(ebpf.SkStorage))
	add("sockhash maps (CONFIG_BPF_STREAM_PARSER)", "splice", features.HaveMapType(ebpf.SockHash))
	add("sk_msg programs (CONFIG_NET_SOCK_MSG)", "splice", features.HaveProgramType(ebpf.SkMsg))

	if programs {
		// smesh's programs, each loaded on its own so that each
		// failure is reported with the verifier's own reason.
		add("program smesh_sockops (sock_ops: fills the sockhash; Linux 5.15+)", "capture",
			probeSockops())
		cspec, specErr := connectSpec(probeOptions, 1)
		for _, p := range []struct{ name, what string }{
			{"smesh_connect4", "cgroup/connect4: capture"},
			{"smesh_connect6", "cgroup/connect6: capture of IPv6 and dual-stack sockets"},
			{"smesh_getpeername4", "cgroup/getpeername4: the app sees its destination; Linux 5.8+"},
			{"smesh_getpeername6", "cgroup/getpeername6: the same for IPv6 and dual-stack sockets"},
			{"smesh_getsockopt", "cgroup/getsockopt: SO_ORIGINAL_DST; Linux 5.15+"},
		} {
			err := specErr
			if err == nil {
				err = probeConnect(cspec, p.name)
			}
			add(fmt.Sprintf("program %s (%s)", p.name, p.what), "capture", err)
		}
		add("program smesh_skmsg_unbounded (sk_msg on a sockhash: splice)", "splice", probeSkmsg(0))
	}
	add("bpf_set_retval in cgroup/connect4 (Linux 5.18+): a connect() to a Service without backends fails "+
		"with ECONNREFUSED, as with kube-proxy; without it, with EPERM", "ECONNREFUSED for Services", HaveSetRetval())
	add("bounded splice (program smesh_skmsg: kfuncs bpf_cast_to_kern_ctx and bpf_rdonly_cast, Linux 6.2+, and CAP_PERFMON)",
		"bounded splice", probeSkmsg(1<<20))
	add("bounded splice: the queue at a spliced hop's reader is visible (psock->msg_tot_len, or redirected bytes in sk_rmem_alloc)",
		"bounded splice", probeQueueVisible())
	return fs
}

// KernelRelease is this kernel's release (uname -r), for messages: smesh
// decides by what the kernel loads, never by its version.
func KernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// probeMapSize is the size of the hash-like maps of a probe: the verifier
// does not care, and smeshd's own sizes would allocate megabytes.
const probeMapSize = 64

// shrinkMaps makes a probe's hash-like maps small. Arrays keep their sizes
// (programs index them with constants) and so does the ring buffer (its
// size must be a power-of-two number of pages).
func shrinkMaps(spec *ebpf.CollectionSpec) {
	for _, m := range spec.Maps {
		switch m.Type {
		case ebpf.Hash, ebpf.LRUHash, ebpf.LPMTrie, ebpf.SockHash:
			m.MaxEntries = min(m.MaxEntries, probeMapSize)
		}
	}
}

// probeOptions are the options the probes load smesh's programs with: as
// smeshd loads them in splice mode with the shipped defaults (every hop
// spliced), but with small maps.
var probeOptions = Options{
	Mode:            ModeSplice,
	SpliceProxyHops: true,
	MapSize:         probeMapSize,
	ProxyAddr:       netip.MustParseAddrPort("127.0.0.1:18000"),
	ProxyAddr6:      netip.MustParseAddrPort("[::1]:18000"),
}

// probeSockops loads smesh_sockops as Load does, with maps of its own.
func probeSockops() error {
	spec, err := sockopsSpec(probeOptions)
	if err != nil {
		return err
	}
	shrinkMaps(spec)
	var objs struct {
		Prog *ebpf.Program `ebpf:"smesh_sockops"`
	}
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		return explainLoadError(err)
	}
	return objs.Prog.Close()
}

// probeConnect loads one program of the connect object (connect4,
// getpeername4 or getsockopt) with maps of its own.
func probeConnect(cspec *ebpf.CollectionSpec, name string) error {
	spec := onlyProgram(cspec, name)
	shrinkMaps(spec)
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{})
	if err != nil {
		return explainLoadError(err)
	}
	coll.Close()
	return nil
}

// onlyProgram is spec with program name alone. Every map of the object is
// still created, as Load creates them all.
func onlyProgram(spec *ebpf.CollectionSpec, name string) *ebpf.CollectionSpec {
	out := spec.Copy()
	for p := range out.Programs {
		if p != name {
			delete(out.Programs, p)
		}
	}
	return out
}

// probeSkmsg loads the sk_msg program loadSkmsg would load for limit
// (bounded, or unbounded when 0) and attaches it to a sockhash of its own,
// as Load does to the real one.
func probeSkmsg(limit uint32) error {
	spec, err := skmsg.LoadSkmsg()
	if err != nil {
		return fmt.Errorf("loading skmsg spec: %w", err)
	}
	shrinkMaps(spec)
	hash, err := ebpf.NewMap(spec.Maps["smesh_sockhash"])
	if err != nil {
		return fmt.Errorf("creating a sockhash: %w", err)
	}
	defer hash.Close()
	prog, err := loadSkmsg(limit, false, map[string]*ebpf.Map{"smesh_sockhash": hash})
	if err != nil {
		return explainLoadError(err)
	}
	defer prog.Close()
	attach := link.RawAttachProgramOptions{Target: hash.FD(), Program: prog, Attach: ebpf.AttachSkMsgVerdict}
	if err := link.RawAttachProgram(attach); err != nil {
		return fmt.Errorf("attaching sk_msg to a sockhash: %w", err)
	}
	if err := link.RawDetachProgram(link.RawDetachProgramOptions(attach)); err != nil {
		return fmt.Errorf("detaching sk_msg from a sockhash: %w", err)
	}
	return nil
}

// ErrBelowFloor explains the one feature whose lack puts a kernel below
// smesh's floor.
var ErrBelowFloor = errors.New("smesh needs Linux 5.15 or later: every connection is keyed by its " +
	"network namespace, and bpf_get_netns_cookie reached sock_ops, sk_msg and cgroup/getsockopt programs in 5.15")

// explainLoadError shortens a verifier error to its reason (the full log
// is for developers: make generate and a kernel at hand) and says what a
// missing helper means for smesh.
func explainLoadError(err error) error {
	var ve *ebpf.VerifierError
	// What a kernel says of a helper its program type does not have:
	// "unknown func bpf_get_netns_cookie#122". The name alone is not
	// enough: every verifier log of these programs mentions the call.
	if errors.As(err, &ve) && strings.Contains(strings.Join(ve.Log, "\n"), "unknown func bpf_get_netns_cookie") {
		return fmt.Errorf("%w: %w", ErrBelowFloor, err)
	}
	return err
}

// Missing returns an error listing the features needed for neededFor
// ("capture", "splice" or "bounded splice", each needing the ones before)
// that this kernel lacks, or nil.
func Missing(fs []Feature, neededFor string) error {
	levels := map[string]int{"capture": 0, "splice": 1, "bounded splice": 2}
	var errs []error
	for _, f := range fs {
		// Features of no level (ECONNREFUSED for Services) only change
		// how something works, never whether it does.
		level, ok := levels[f.NeededFor]
		if f.Err != nil && ok && level <= levels[neededFor] {
			errs = append(errs, fmt.Errorf("%s: %w", f.Name, f.Err))
		}
	}
	return errors.Join(errs...)
}
