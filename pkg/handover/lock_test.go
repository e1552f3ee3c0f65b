package handover

import (
	"errors"
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// TestFlockTravelsWithTheDescriptor: the pin directory's lock (an
// exclusive flock, pkg/datapath pins) belongs to the open file
// description, so handing its descriptor over hands the lock over: after
// the sender closed its copy, a third opener still cannot take it, and
// once the receiver closes, it can. (In one process: flock conflicts are
// between open file descriptions, not processes.)
func TestFlockTravelsWithTheDescriptor(t *testing.T) {
	dir := t.TempDir()
	lock := func() (*os.File, error) {
		f, err := os.Open(dir)
		if err != nil {
			return nil, err
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			return nil, err
		}
		return f, nil
	}
	held, err := lock()
	if err != nil {
		t.Fatal(err)
	}
	a, b := socketpair(t)
	done := make(chan map[string]*os.File, 1)
	go func() {
		files, err := receiveOn(b)
		if err != nil {
			t.Error(err)
		}
		done <- files
	}()
	if err := Send(a, map[string]*os.File{"pinlock": held}); err != nil {
		t.Fatal(err)
	}
	got := <-done
	held.Close()
	if f, err := lock(); !errors.Is(err, unix.EWOULDBLOCK) {
		if f != nil {
			f.Close()
		}
		t.Fatalf("locking after the sender closed its copy: %v, want EWOULDBLOCK (the receiver holds it)", err)
	}
	got["pinlock"].Close()
	f, err := lock()
	if err != nil {
		t.Fatalf("locking after the receiver closed: %v", err)
	}
	f.Close()
}

func receiveOn(f *os.File) (map[string]*os.File, error) {
	c, err := fileConn(f)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return Receive(c)
}

// TestHeartbeatHelperInConnect4 backs the heartbeat of docs/restart.md
// (3.2): a cgroup/connect4 program may call bpf_ktime_get_ns, and the
// clock it reads is CLOCK_MONOTONIC, which smeshd can write from Go.
func TestHeartbeatHelperInConnect4(t *testing.T) {
	testenv.RequirePrivileged(t)
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:       ebpf.CGroupSockAddr,
		AttachType: ebpf.AttachCGroupInet4Connect,
		Instructions: asm.Instructions{
			asm.FnKtimeGetNs.Call(),
			asm.Mov.Imm(asm.R0, 1),
			asm.Return(),
		},
		License: "GPL",
	})
	if err != nil {
		t.Fatalf("a connect4 program calling bpf_ktime_get_ns: %v", err)
	}
	prog.Close()
}
