package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/cgroups"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// testBPFFS mounts a bpffs of the test's own (each mount is a new
// instance) and returns a pin directory in it that does not exist yet.
func testBPFFS(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mounting a bpffs for the test: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	return filepath.Join(dir, "smesh")
}

// dottedCgroup creates a cgroup named like a systemd unit's,
// smesh-test-<random>.slice, below the cgroup v2 mount.
func dottedCgroup(t *testing.T) string {
	t.Helper()
	mount, err := cgroups.Mount()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(mount, testenv.Unique("smesh-test")+".slice")
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cgroups.Remove(path, 5*time.Second); err != nil {
			t.Errorf("removing test cgroup: %v", err)
		}
	})
	return path
}

func pinOpts(pinDir, own string) Options {
	return Options{
		Mode:         ModeCopy,
		ProxyAddr:    netip.MustParseAddrPort("127.0.0.1:18000"),
		ProxyAddr6:   netip.MustParseAddrPort("[::1]:18000"),
		ProxyCgroup:  own,
		IncludeCIDRs: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")},
		MapSize:      1024,
		PinDir:       pinDir,
		FailClosed:   true,
		Logger:       zerolog.Nop(),
	}
}

func names(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// TestPinsOfDottedCgroup: a pinned capture works for a cgroup named like a
// systemd unit (bpffs refuses dots in names, so pins are named by cgroup id),
// outlives Close once committed, and is adopted by the next run.
func TestPinsOfDottedCgroup(t *testing.T) {
	testenv.RequirePrivileged(t)
	pinDir := testBPFFS(t)
	own, slice := testenv.NewCgroup(t), dottedCgroup(t)
	t.Cleanup(func() { RemovePins(pinDir) })
	sliceID, err := cgroups.ID(slice)
	if err != nil {
		t.Fatal(err)
	}

	run := func() {
		t.Helper()
		opts := pinOpts(pinDir, own)
		d, err := Load(opts)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.SetCapture([]string{slice}, opts.IncludeCIDRs, nil, nil); err != nil {
			d.Close()
			t.Fatal(err)
		}
		d.Commit()
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
	}
	run()
	want := fmt.Sprintf("%s%d_%d", linkPrefix, ebpf.AttachCGroupInet4Connect, sliceID)
	if got := names(t, pinDir); !strings.Contains(strings.Join(got, " "), want) {
		t.Errorf("pins %v, want one named %s", got, want)
	}
	if n := testenv.AttachedPrograms(t, slice, ebpf.AttachCGroupInet4Connect); n != 1 {
		t.Fatalf("%d connect4 programs on %s after Close, want the pinned one", n, slice)
	}
	run() // adopts
	if n := testenv.AttachedPrograms(t, slice, ebpf.AttachCGroupInet4Connect); n != 1 {
		t.Errorf("%d connect4 programs on %s after a second run, want 1 (adopted)", n, slice)
	}
	if _, err := RemovePins(pinDir); err != nil {
		t.Fatal(err)
	}
	if n := testenv.AttachedPrograms(t, slice, ebpf.AttachCGroupInet4Connect); n != 0 {
		t.Errorf("%d connect4 programs on %s after RemovePins", n, slice)
	}
}

// TestFailedStartLeavesNoPins: a start that fails after pinning (here: one
// enrolled "cgroup" is a plain directory) removes every pin it made, and
// the pin directory it created, but keeps what an earlier run pinned.
func TestFailedStartLeavesNoPins(t *testing.T) {
	testenv.RequirePrivileged(t)
	pinDir := testBPFFS(t)
	own, good := testenv.NewCgroup(t), dottedCgroup(t)
	notCgroup := t.TempDir()
	t.Cleanup(func() { RemovePins(pinDir) })

	failedStart := func() {
		t.Helper()
		opts := pinOpts(pinDir, own)
		d, err := Load(opts)
		if err != nil {
			t.Fatal(err)
		}
		err = d.SetCapture([]string{good, notCgroup}, opts.IncludeCIDRs, nil, nil)
		if err == nil {
			t.Fatalf("SetCapture with %s enrolled did not fail", notCgroup)
		}
		t.Logf("start failed as intended: %v", err)
		if err := d.Close(); err != nil {
			t.Errorf("Close after a failed start: %v", err)
		}
	}

	failedStart()
	if got := names(t, pinDir); got != nil {
		t.Errorf("a failed first start left %v in %s", got, pinDir)
	}
	if _, err := os.Stat(pinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a failed first start left the pin directory it made: %v", err)
	}
	for _, cg := range []string{good, own} {
		for _, typ := range attachOrder {
			if n := testenv.AttachedPrograms(t, cg, typ); n != 0 {
				t.Errorf("a failed start left %d %s programs on %s", n, typ, cg)
			}
		}
	}

	// An earlier run's capture survives a failed start.
	opts := pinOpts(pinDir, own)
	d, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.SetCapture([]string{good}, opts.IncludeCIDRs, nil, nil); err != nil {
		t.Fatal(err)
	}
	d.Commit()
	d.Close()
	before := names(t, pinDir)
	failedStart()
	if after := names(t, pinDir); strings.Join(after, " ") != strings.Join(before, " ") {
		t.Errorf("pins after a failed start: %v, want those of the earlier run: %v", after, before)
	}
	if n := testenv.AttachedPrograms(t, good, ebpf.AttachCGroupInet4Connect); n != 1 {
		t.Errorf("%d connect4 programs on %s after a failed start, want the earlier run's", n, good)
	}
}
