package sandbox_test

import (
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/sandbox"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// freshNetnsHelperEnv makes the test binary, re-executed under `unshare
// --mount`, run TestNamedNetnsBesideFirstIPNetns's check. Its value is "MNT
// GONAME IPNAME": the test's mount namespace, where the helper must not
// unmount anything, and the names of the two namespaces to create.
const freshNetnsHelperEnv = "SMESH_TEST_FRESH_NETNS"

// TestNamedNetnsBesideFirstIPNetns starts where a fresh machine does, with
// /run/netns no mount point, creates a namespace with NewNamedNetns, then
// one with the machine's first `ip netns add`, and deletes the first:
// nothing may stay busy or mounted. (ip bind-mounts /run/netns onto itself
// when it is no mount point, which hid namespaces mounted there before.)
//
// The fresh machine is made in a private mount namespace, in a child
// process: unmounting /run/netns in the test's own would hide the
// namespaces of everything running beside it.
func TestNamedNetnsBesideFirstIPNetns(t *testing.T) {
	if v, ok := os.LookupEnv(freshNetnsHelperEnv); ok {
		freshNetnsHelper(t, v)
		return
	}
	requireRoot(t)
	unshare := testenv.RequireCommand(t, "unshare")
	testenv.RequireCommand(t, "ip")
	own, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		t.Fatal(err)
	}
	goName, ipName := testenv.Unique("smesh-test"), testenv.Unique("smesh-test")
	// The helper's mounts go with its mount namespace; a file it could not
	// remove stays, and here it is a plain file.
	t.Cleanup(func() {
		for _, name := range []string{goName, ipName} {
			if err := os.Remove(filepath.Join("/run/netns", name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				t.Error(err)
			}
		}
	})
	cmd := exec.CommandContext(t.Context(), unshare, "--mount", "--propagation", "private",
		os.Args[0], "-test.run=^TestNamedNetnsBesideFirstIPNetns$", "-test.v")
	cmd.Env = append(os.Environ(), freshNetnsHelperEnv+"="+own+" "+goName+" "+ipName)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS") {
		t.Fatalf("child in a private mount namespace: %v\n%s", err, out)
	}
}

func freshNetnsHelper(t *testing.T, v string) {
	f := strings.Fields(v)
	if len(f) != 3 {
		t.Fatalf("%s=%q, want MNT GONAME IPNAME", freshNetnsHelperEnv, v)
	}
	testMnt, goName, ipName := f[0], f[1], f[2]
	if self, err := os.Readlink("/proc/self/ns/mnt"); err != nil || self == testMnt {
		t.Fatalf("helper in mount namespace %q (%v), the test's own: refusing to unmount /run/netns", self, err)
	}
	ip := testenv.RequireCommand(t, "ip")

	// Lazily, as namespaces of other tests may be mounted below it; there
	// may be more than one bind mount to take off.
	for {
		err := unix.Unmount("/run/netns", unix.MNT_DETACH)
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			break // no mount point (left), or not even the directory
		}
		if err != nil {
			t.Fatalf("unmounting /run/netns: %v", err)
		}
	}

	ns, err := sandbox.NewNamedNetns(goName)
	if err != nil {
		t.Fatal(err)
	}
	ns.Close()
	if out, err := exec.Command(ip, "netns", "add", ipName).CombinedOutput(); err != nil {
		t.Errorf("ip netns add %s: %v: %s", ipName, err, out)
	}
	if err := sandbox.DeleteNamedNetns(goName); err != nil {
		t.Errorf("after `ip netns add`: %v", err)
	}
	if out, err := exec.Command(ip, "netns", "del", ipName).CombinedOutput(); err != nil {
		t.Errorf("ip netns del %s: %v: %s", ipName, err, out)
	}

	mountinfo, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(mountinfo)) {
		// The fifth field is the mount point.
		if f := strings.Fields(line); len(f) > 4 && (f[4] == "/run/netns/"+goName || f[4] == "/run/netns/"+ipName) {
			t.Errorf("left mounted: %s", strings.TrimSpace(line))
		}
	}
	for _, name := range []string{goName, ipName} {
		if _, err := os.Lstat(filepath.Join("/run/netns", name)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("/run/netns/%s is still there (%v)", name, err)
		}
	}
}
