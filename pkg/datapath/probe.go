package datapath

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/features"
	"golang.org/x/sys/unix"

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

// Probe checks smeshd's privileges and the kernel for everything the data
// path uses.
func Probe() []Feature {
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
	add("bounded splice (smesh's sk_msg program: kfuncs bpf_cast_to_kern_ctx and bpf_rdonly_cast, Linux 6.2+, and CAP_PERFMON)",
		"bounded splice", probeBoundedSplice())
	return fs
}

// probeBoundedSplice loads the real bounded sk_msg program, with maps of
// its own: what it reads of the kernel's structures is checked by the
// verifier only then.
func probeBoundedSplice() error {
	prog, err := loadSkmsg(1<<20, nil)
	if err != nil {
		return err
	}
	return prog.Close()
}

// Missing returns an error listing the features needed for neededFor
// ("capture", "splice" or "bounded splice", each needing the ones before)
// that this kernel lacks, or nil.
func Missing(fs []Feature, neededFor string) error {
	levels := map[string]int{"capture": 0, "splice": 1, "bounded splice": 2}
	var errs []error
	for _, f := range fs {
		if f.Err != nil && levels[f.NeededFor] <= levels[neededFor] {
			errs = append(errs, fmt.Errorf("%s: %w", f.Name, f.Err))
		}
	}
	return errors.Join(errs...)
}
