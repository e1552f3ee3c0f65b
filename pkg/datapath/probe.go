package datapath

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/features"

	"github.com/smesh-dev/smesh/pkg/cgroups"
)

// Feature is one kernel capability smesh relies on and whether this kernel
// has it.
type Feature struct {
	Name string
	// NeededFor says which mode cannot work without it.
	NeededFor string
	Err       error
}

// Probe checks the kernel for everything the data path uses.
func Probe() []Feature {
	var fs []Feature
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
