package e2e

import (
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// TestKilledOpen: with on_failure = "open", a smeshd killed with SIGKILL
// leaves nothing attached, and new connections go out directly.
func TestKilledOpen(t *testing.T) {
	a, _, server := twoNodes(t, "splice", "")
	if !captured(a, a.enrolled, server) {
		t.Fatal("not captured while smeshd runs")
	}
	a.smeshd.Stop() // SIGKILL
	for _, typ := range []ebpf.AttachType{ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupSockOps} {
		if n := testenv.AttachedPrograms(t, a.enrolled, typ); n != 0 {
			t.Errorf("%d %s programs still attached after kill -9", n, typ)
		}
	}
	if captured(a, a.enrolled, server) {
		t.Errorf("after kill -9 a new connection was still captured")
	}
}

// TestKilledClosed: with on_failure = "closed", a smeshd killed with SIGKILL
// leaves the capture pinned: new captured connections are refused, never
// sent uncaptured; a spliced same-node connection keeps working; a restarted
// smeshd adopts the pins and captures again; removing the pins detaches all.
// testPinDir returns a pin directory for on_failure = "closed" on a bpffs
// of the test's own. Cleanup, after smeshd's (registered later, so run
// earlier), removes the pins and the mount.
func testPinDir(t *testing.T) string {
	t.Helper()
	bpffs := t.TempDir()
	if err := unix.Mount("bpf", bpffs, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mounting a bpffs for the test: %v", err)
	}
	pinDir := filepath.Join(bpffs, "smesh")
	t.Cleanup(func() {
		if _, err := datapath.RemovePins(pinDir); err != nil {
			t.Errorf("removing pins: %v", err)
		}
		unix.Unmount(bpffs, unix.MNT_DETACH)
	})
	return pinDir
}

func TestKilledClosed(t *testing.T) {
	testenv.RequirePrivileged(t)
	pinDir := testPinDir(t)
	a, _, server := twoNodes(t, "splice", "")
	a.smeshd.Stop()
	a.captureExtra = fmt.Sprintf("on_failure = \"closed\"\npin_dir = %q", pinDir)
	a.start("splice", "")
	a.server(a.enrolled, "127.0.0.1:9000")

	// A spliced same-node connection that lives through all of it: 1000
	// exchanges 10 ms apart, 10 s at least, to outlast the restart.
	before := a.stats()
	long := testenv.StartHelper(t, a.enrolled, a.ns.Name, "client", "paced", "127.0.0.1:9000", "1000")
	if line, err := long.ReadLine(5 * time.Second); err != nil || line != "connected" {
		t.Fatalf("long-lived client: %q %v %s", line, err, long.Stderr())
	}
	a.waitSpliced(before, 20)

	a.smeshd.Stop() // SIGKILL
	if n := testenv.AttachedPrograms(t, a.enrolled, ebpf.AttachCGroupInet4Connect); n != 1 {
		t.Fatalf("%d connect4 programs attached after kill -9, want the pinned one", n)
	}
	a.client(a.enrolled, "refused", server)

	a.start("splice", "")
	// Still spliced, counted in the adopted maps.
	a.waitSpliced(a.stats(), 20)
	if !captured(a, a.enrolled, server) {
		t.Error("restarted smeshd does not capture")
	}
	a.client(a.enrolled, "echo", server, "1000000")
	if n := testenv.AttachedPrograms(t, a.enrolled, ebpf.AttachCGroupInet4Connect); n != 1 {
		t.Errorf("%d connect4 programs attached after the restart, want 1 (adopted)", n)
	}

	if err := long.Wait(); err != nil {
		t.Errorf("spliced connection across kill -9 and restart: %v\n%s", err, long.Stderr())
	}
	a.stop()
	if _, err := datapath.RemovePins(pinDir); err != nil {
		t.Fatal(err)
	}
	for _, typ := range []ebpf.AttachType{ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupSockOps} {
		if n := testenv.AttachedPrograms(t, a.enrolled, typ); n != 0 {
			t.Errorf("%d %s programs attached after removing the pins", n, typ)
		}
	}
}
