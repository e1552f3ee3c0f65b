package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/bpf/connect"
	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// predecessorCommit is the smeshd that TestHandoverFromOlderBinary
// upgrades from and back to when SMESH_TEST_PREDECESSOR names no binary:
// main as it landed before per-map adoption, the heartbeat map and the
// systemd master (2026-12-05). Move it forward with each release whose
// maps or hand-over changed.
const predecessorCommit = "e485f50"

// predecessorBinary is SMESH_TEST_PREDECESSOR, or smeshd built from
// predecessorCommit of this repository's history (git archive, go build).
// Without a Go toolchain (the kernel-test guest) or that commit (a shallow
// clone) the test is skipped, saying which.
func predecessorBinary(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("SMESH_TEST_PREDECESSOR"); p != "" {
		return p
	}
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("no Go toolchain to build smeshd %s with (set SMESH_TEST_PREDECESSOR to a binary)", predecessorCommit)
	}
	dir := t.TempDir()
	archive := exec.Command("bash", "-c", `set -o pipefail; git -C "$(git rev-parse --show-toplevel)" archive "$0" | tar -x -C "$1"`, predecessorCommit, dir)
	if out, err := archive.CombinedOutput(); err != nil {
		t.Skipf("taking smeshd %s out of git failed (a shallow clone?; set SMESH_TEST_PREDECESSOR to a binary): %v: %s", predecessorCommit, err, out)
	}
	exe := filepath.Join(dir, "smeshd-"+predecessorCommit)
	build := exec.Command(gobin, "build", "-o", exe, "./cmd/smeshd")
	build.Dir = dir
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building smeshd %s: %v: %s", predecessorCommit, err, out)
	}
	return exe
}

// TestHandoverFromOlderBinary: an upgrade from another build of smeshd
// (predecessorBinary): that binary runs first, this one takes over from a
// new cgroup (as a new pod's smeshd) while echoes go through the mesh
// without pause, the old one exits 0, and this one serves with its
// heartbeat written (a map the predecessor may not have had), in both
// on_failure modes; and back ("down": that build takes over from this one,
// left with maps it does not know).
func TestHandoverFromOlderBinary(t *testing.T) {
	testenv.RequirePrivileged(t)
	old := predecessorBinary(t)
	for _, c := range []struct {
		name, onFailure string
		down            bool
	}{{"up/open", "open", false}, {"up/closed", "closed", false}, {"down/open", "open", true}, {"down/closed", "closed", true}} {
		onFailure := c.onFailure
		t.Run(c.name, func(t *testing.T) {
			w := newSmeshdWorld(t)
			from, to := old, w.exe
			if c.down {
				from, to = w.exe, old
			}
			path := w.path
			if onFailure == "closed" {
				bpffs := t.TempDir()
				if err := unix.Mount("bpf", bpffs, "bpf", 0, "mode=0700"); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { unix.Unmount(bpffs, unix.MNT_DETACH) })
				pins := filepath.Join(bpffs, "smesh")
				t.Cleanup(func() { datapath.RemovePins(pins) })
				conf := strings.Replace(w.conf, "[capture]\n", fmt.Sprintf("[capture]\non_failure = \"closed\"\npin_dir = %q\n", pins), 1)
				path = filepath.Join(t.TempDir(), "smesh.toml")
				if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			first := testenv.StartProcess(t, w.smeshCg, w.node.Name, from, "-c", path)
			waitStderr(t, first, "smeshd ready", 1)
			stopLoop := w.echoLoop(t, w.echoServer(t))
			time.Sleep(300 * time.Millisecond)
			second := testenv.StartProcess(t, testenv.NewCgroup(t), w.node.Name, to, "-c", path)
			waitStderr(t, second, "smeshd ready", 1)
			if !strings.Contains(second.Stderr(), "took over") {
				t.Fatalf("the successor did not take over:\n%s", second.Stderr())
			}
			select {
			case <-first.Exited():
			case <-time.After(40 * time.Second):
				t.Fatalf("the predecessor did not exit after the hand-over:\n%s", first.Stderr())
			}
			if err := first.Wait(); err != nil {
				t.Errorf("the predecessor exited with %v", err)
			}
			time.Sleep(300 * time.Millisecond)
			stopLoop()
			if status := readyzIn(t, w.node); !strings.Contains(status, " 200 ") {
				t.Errorf("/readyz after the hand-over: %q", status)
			}
			if beat := freshHeartbeats(t); beat == 0 && !c.down {
				t.Error("no smesh_heartbeat map with a fresh beat after the hand-over")
			}
			if err := second.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			if err := second.Wait(); err != nil {
				t.Errorf("the successor exited with %v:\n%s", err, second.Stderr())
			}
		})
	}
}

// freshHeartbeats counts the smesh_heartbeat maps on this machine whose
// beat is at most 3s old and whose hold is the default 10s.
func freshHeartbeats(t *testing.T) int {
	t.Helper()
	now, err := datapath.MonotonicNow()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for id := ebpf.MapID(0); ; {
		next, err := ebpf.MapGetNextID(id)
		if err != nil {
			return n
		}
		id = next
		m, err := ebpf.NewMapFromID(id)
		if err != nil {
			continue
		}
		info, err := m.Info()
		if err == nil && info.Name == "smesh_heartbeat" {
			var v connect.ConnectHeartbeat
			if m.Lookup(uint32(0), &v) == nil && v.HoldNs == uint64(10*time.Second) && now-v.BeatNs < uint64(3*time.Second) {
				n++
			}
		}
		m.Close()
	}
}
