package handover

import (
	"errors"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

func passProgram(t *testing.T) *ebpf.Program {
	t.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SkMsg,
		AttachType:   ebpf.AttachSkMsgVerdict,
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()}, // SK_PASS
		License:      "GPL",
	})
	if err != nil {
		t.Fatalf("loading an sk_msg program: %v", err)
	}
	t.Cleanup(func() { prog.Close() })
	return prog
}

// TestSkMsgOnPinnedSockhash is experiment (c) for sk_msg: smesh attaches
// its sk_msg program to the sockhash with BPF_PROG_ATTACH (the map holds
// the program; no link), the only way on its 5.15 floor. So the attachment
// lives exactly as long as the map: pinning the map keeps it with no
// descriptor open, and a new process attaching its own program to the
// adopted map replaces the old one (no error, no detach first; sockets
// already in the map keep the program they were added with:
// net/core/sock_map.c sock_map_link copies the map's programs into each
// psock). Since 6.10 a bpf_link can hold it instead (BPF_LINK_CREATE on the
// map, BPF_LINK_TYPE_SOCKMAP); cilium/ebpf v0.22 has no wrapper, but
// link.AttachRawLink reaches it. The test reports which this kernel has.
func TestSkMsgOnPinnedSockhash(t *testing.T) {
	testenv.RequirePrivileged(t)
	bpffs := t.TempDir()
	if err := unix.Mount("bpf", bpffs, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mounting a bpffs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(bpffs, unix.MNT_DETACH) })

	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.SockHash, KeySize: 4, ValueSize: 8, MaxEntries: 16})
	if err != nil {
		t.Fatal(err)
	}
	pin := filepath.Join(bpffs, "sockhash")
	if err := m.Pin(pin); err != nil {
		t.Fatal(err)
	}
	attach := func(m *ebpf.Map, p *ebpf.Program) error {
		return link.RawAttachProgram(link.RawAttachProgramOptions{Target: m.FD(), Program: p, Attach: ebpf.AttachSkMsgVerdict})
	}
	old := passProgram(t)
	if err := attach(m, old); err != nil {
		t.Fatal(err)
	}
	m.Close()
	// The "new process": the pinned map, a program of its own.
	m, err = ebpf.LoadPinnedMap(pin, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	next := passProgram(t)
	if err := attach(m, next); err != nil {
		t.Fatalf("attaching a second sk_msg program to the adopted sockhash: %v", err)
	}
	// Detaching the old one fails: it was replaced.
	err = link.RawDetachProgram(link.RawDetachProgramOptions{Target: m.FD(), Program: old, Attach: ebpf.AttachSkMsgVerdict})
	t.Logf("detaching the replaced program: %v", err)
	if err == nil {
		t.Error("the replaced program was still attached")
	}
	if err := link.RawDetachProgram(link.RawDetachProgramOptions{Target: m.FD(), Program: next, Attach: ebpf.AttachSkMsgVerdict}); err != nil {
		t.Fatalf("detaching the new program: %v", err)
	}

	l, err := link.AttachRawLink(link.RawLinkOptions{Target: m.FD(), Program: next, Attach: ebpf.AttachSkMsgVerdict})
	if err != nil {
		t.Logf("no sockmap bpf_link on this kernel (6.10+): %v", err)
		return
	}
	defer l.Close()
	if err := l.Pin(filepath.Join(bpffs, "link_skmsg")); err != nil {
		t.Fatalf("pinning a sockmap link: %v", err)
	}
	defer l.Unpin()
	if err := l.Update(old); err != nil {
		t.Errorf("updating a sockmap link: %v", err)
	}
	err = attach(m, next)
	t.Logf("sockmap bpf_link works here (pinned, updated); BPF_PROG_ATTACH beside it: %v", err)
	if !errors.Is(err, unix.EBUSY) {
		t.Errorf("BPF_PROG_ATTACH beside a sockmap link: %v, want EBUSY (one or the other, never both)", err)
	}
}
