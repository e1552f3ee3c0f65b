package testenv

import (
	"os"
	"path/filepath"
	"testing"
	"time"

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
