package testenv

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/smesh-dev/smesh/pkg/cgroups"
)

// cgroupRemoveTimeout bounds how long cleanup waits for the processes in a
// test cgroup to die and for the kernel to let go of the directory.
const cgroupRemoveTimeout = 5 * time.Second

// NewCgroup creates an empty cgroup named smesh-test-<random> directly below
// the cgroup v2 mount and returns its path. Cleanup kills every process left
// in it or in cgroups below it (they can only be processes the test started),
// waits for them to go, and removes the directories; a cgroup that cannot be
// removed fails the test.
func NewCgroup(t testing.TB) string {
	t.Helper()
	mount, err := cgroups.Mount()
	if err != nil {
		t.Fatalf("creating a test cgroup: %v", err)
	}
	path := filepath.Join(mount, Unique("smesh-test"))
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatalf("creating a test cgroup: %v", err)
	}
	t.Cleanup(func() {
		if err := cgroups.Remove(path, cgroupRemoveTimeout); err != nil {
			t.Errorf("removing test cgroup: %v", err)
		}
	})
	return path
}

// maxCgroupPrograms is how many programs of one type the kernel attaches to
// one cgroup (BPF_CGROUP_MAX_PROGS).
const maxCgroupPrograms = 64

// FillCgroup attaches to cgroup, which the test created, as many trivial
// cgroup/connect4 programs (they allow every connect) as the kernel takes,
// so that attaching one more fails: for tests of what an attach that fails
// leaves behind. Cleanup detaches them.
func FillCgroup(t testing.TB, cgroup string) {
	t.Helper()
	for range maxCgroupPrograms {
		prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Type:         ebpf.CGroupSockAddr,
			AttachType:   ebpf.AttachCGroupInet4Connect,
			Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()},
			License:      "GPL",
		})
		if err != nil {
			t.Fatalf("loading a test program: %v", err)
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: ebpf.AttachCGroupInet4Connect, Program: prog})
		prog.Close()
		if err != nil {
			t.Fatalf("attaching a test program to %s: %v", cgroup, err)
		}
		t.Cleanup(func() { l.Close() })
	}
}

// AttachedPrograms counts the BPF programs of type typ attached to cgroup.
func AttachedPrograms(t testing.TB, cgroup string, typ ebpf.AttachType) int {
	t.Helper()
	f, err := os.Open(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: typ})
	if err != nil {
		t.Fatalf("querying %s programs of %s: %v", typ, cgroup, err)
	}
	return len(res.Programs)
}
