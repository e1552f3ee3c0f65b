package handover

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// connector is the workload of TestPinnedLinkUpdateHasNoWindow: it connects
// to 127.0.0.1:PORT again and again for DURATION, reads the one byte the
// listener it reached writes, and prints how many connections reached each
// listener and how many failed (first error included).
func connector(args []string) int {
	port, _ := strconv.Atoi(args[0])
	d, _ := time.ParseDuration(args[1])
	seen := map[string]int{}
	failed, firstErr := 0, ""
	for end := time.Now().Add(d); time.Now().Before(end); {
		c, err := net.DialTimeout("tcp4", fmt.Sprintf("127.0.0.1:%d", port), 2*time.Second)
		if err == nil {
			c.SetDeadline(time.Now().Add(2 * time.Second))
			b := make([]byte, 1)
			if _, err = c.Read(b); err == nil {
				seen[string(b)]++
			}
			c.Close()
		}
		if err != nil {
			failed++
			if firstErr == "" {
				firstErr = err.Error()
			}
		}
	}
	fmt.Printf("A=%d B=%d failed=%d first=%q\n", seen["A"], seen["B"], failed, firstErr)
	return 0
}

// redirectProgram is a cgroup/connect4 program that sends every connect to
// 127.0.0.1:port, as smesh's connect4 sends captured ones to [outbound]
// listen.
func redirectProgram(t *testing.T, port uint16) *ebpf.Program {
	t.Helper()
	var be [2]byte
	binary.BigEndian.PutUint16(be[:], port)
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:       ebpf.CGroupSockAddr,
		AttachType: ebpf.AttachCGroupInet4Connect,
		Instructions: asm.Instructions{
			// struct bpf_sock_addr: user_ip4 at 4, user_port at 24 (both
			// network byte order, read as native-endian words).
			asm.Mov.Imm32(asm.R2, int32(binary.NativeEndian.Uint32([]byte{127, 0, 0, 1}))),
			asm.StoreMem(asm.R1, 4, asm.R2, asm.Word),
			asm.Mov.Imm32(asm.R2, int32(binary.NativeEndian.Uint16(be[:]))),
			asm.StoreMem(asm.R1, 24, asm.R2, asm.Word),
			asm.Mov.Imm(asm.R0, 1),
			asm.Return(),
		},
		License: "GPL",
	})
	if err != nil {
		t.Fatalf("loading a connect4 program: %v", err)
	}
	return prog
}

func answering(t *testing.T, b byte) uint16 {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte{b})
			c.Close()
		}
	}()
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

// TestPinnedLinkUpdateHasNoWindow is experiment (c) of docs/restart.md: a
// cgroup/connect4 bpf_link pinned on bpffs stays attached with no
// descriptor of it open in any process, and each "generation" (a new
// program loaded, the pin opened, link.Update: BPF_LINK_UPDATE, then every
// descriptor closed again) replaces the program atomically: a workload
// connecting without pause meanwhile reaches one program's destination or
// the other's, never its own (nothing listens there: refused) and never
// fails.
func TestPinnedLinkUpdateHasNoWindow(t *testing.T) {
	testenv.RequirePrivileged(t)
	cg := testenv.NewCgroup(t)
	bpffs := t.TempDir()
	if err := unix.Mount("bpf", bpffs, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mounting a bpffs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(bpffs, unix.MNT_DETACH) })
	pin := filepath.Join(bpffs, "link_connect4")

	portA, portB := answering(t, 'A'), answering(t, 'B')
	// Nothing listens on the workload's own destination.
	dead, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadPort := dead.Addr().(*net.TCPAddr).Port
	dead.Close()

	progA := redirectProgram(t, portA)
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cg, Attach: ebpf.AttachCGroupInet4Connect, Program: progA})
	progA.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		t.Fatal(err)
	}
	l.Close() // only the pin holds it now
	t.Cleanup(func() {
		if l, err := link.LoadPinnedLink(pin, nil); err == nil {
			l.Unpin()
			l.Close()
		}
	})
	if n := testenv.AttachedPrograms(t, cg, ebpf.AttachCGroupInet4Connect); n != 1 {
		t.Fatalf("%d programs attached with only the pin holding the link, want 1", n)
	}

	const generations = 40
	w := testenv.StartHelper(t, cg, "", "connector", strconv.Itoa(deadPort), "3s")
	time.Sleep(200 * time.Millisecond)
	for i := 0; i < generations; i++ {
		port := portB
		if i%2 == 1 {
			port = portA
		}
		prog := redirectProgram(t, port)
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Update(prog); err != nil {
			t.Fatal(err)
		}
		l.Close()
		prog.Close()
		time.Sleep(50 * time.Millisecond)
	}
	if err := w.Wait(); err != nil {
		t.Fatalf("connector: %v\n%s", err, w.Stderr())
	}
	out := strings.TrimSpace(w.Stdout())
	t.Logf("%d program updates of a pinned link while connecting without pause: %s", generations, out)
	var a, b, failed int
	var first string
	if _, err := fmt.Sscanf(out, "A=%d B=%d failed=%d first=%q", &a, &b, &failed, &first); err != nil {
		t.Fatalf("connector said %q: %v", out, err)
	}
	if failed != 0 || a == 0 || b == 0 {
		t.Errorf("A=%d B=%d failed=%d (%s): want both programs seen and no connection failed", a, b, failed, first)
	}
	if n := testenv.AttachedPrograms(t, cg, ebpf.AttachCGroupInet4Connect); n != 1 {
		t.Errorf("%d programs attached after the updates, want 1", n)
	}
}

// TestLinkHeldByAnotherProcess: an unpinned cgroup link (and its program's
// map) handed to another process over SCM_RIGHTS stays attached after the
// process that made it closed every descriptor, for as long as the holder
// keeps it; when the holder goes, the kernel detaches it. This is what
// on_failure = "open" needs: capture held across a restart by the
// successor (or systemd's store), and gone with the last holder.
func TestLinkHeldByAnotherProcess(t *testing.T) {
	testenv.RequirePrivileged(t)
	cg := testenv.NewCgroup(t)
	prog := redirectProgram(t, 1)
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cg, Attach: ebpf.AttachCGroupInet4Connect, Program: prog})
	prog.Close()
	if err != nil {
		t.Fatal(err)
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	linkFile, err := dupFile(l.(interface{ FD() int }).FD(), "link")
	if err != nil {
		t.Fatal(err)
	}
	mapFile, err := dupFile(m.FD(), "map")
	if err != nil {
		t.Fatal(err)
	}
	parent, child := socketpair(t)
	holder := exec.Command(os.Args[0], "-test.run=^$")
	holder.Env = append(os.Environ(), helperEnv+"=hold")
	holder.ExtraFiles = []*os.File{child}
	stdin, err := holder.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := holder.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	holder.Stderr = os.Stderr
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	child.Close()
	t.Cleanup(func() {
		if holder.ProcessState == nil {
			holder.Process.Kill() // by the PID we started
			holder.Wait()
		}
	})
	if err := Send(parent, map[string]*os.File{"link/connect4": linkFile, "map/test": mapFile}); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "held 2\n" {
		t.Fatalf("holder said %q, %v", line, err)
	}
	linkFile.Close()
	mapFile.Close()
	l.Close()
	m.Close()
	if n := testenv.AttachedPrograms(t, cg, ebpf.AttachCGroupInet4Connect); n != 1 {
		t.Fatalf("%d programs attached while only the other process holds the link, want 1", n)
	}
	stdin.Close()
	if err := holder.Wait(); err != nil {
		t.Fatalf("holder: %v", err)
	}
	if n := testenv.AttachedPrograms(t, cg, ebpf.AttachCGroupInet4Connect); n != 0 {
		t.Fatalf("%d programs attached after the holder exited, want 0", n)
	}
}

// dupFile is a descriptor of its own for fd (close-on-exec).
func dupFile(fd int, name string) (*os.File, error) {
	d, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(d), name), nil
}
