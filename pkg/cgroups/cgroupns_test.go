package cgroups

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// ofHelperEnv makes the test binary print Of(mount, 0) and what
// /proc/self/cgroup says, instead of running the tests. Its value is the
// reference cgroup namespace: the test's, standing in for PID 1's (which
// root cannot open on every test machine).
const ofHelperEnv = "SMESH_CGROUPS_TEST_OF_HELPER"

func ofHelper(refNS string) int {
	mount, err := Mount()
	if err != nil {
		fmt.Println("error", err)
		return 0
	}
	own, err := of(mount, 0, refNS)
	raw, _ := os.ReadFile("/proc/self/cgroup")
	fmt.Printf("of %s %v\nraw %s\n", own, err, strings.TrimSpace(string(raw)))
	return 0
}

// TestOfInPrivateCgroupNamespace runs Of in a process born in a cgroup and
// in a cgroup namespace rooted there, as a Kubernetes container on a cgroup
// v2 node is: /proc/self/cgroup says "0::/", and Of must still name the
// cgroup by its path below the node's mount (the DaemonSet mounts the node's
// tree), or smeshd would take the cgroup v2 root for its own.
func TestOfInPrivateCgroupNamespace(t *testing.T) {
	mount := requirePrivileged(t)
	cg := filepath.Join(mount, unique("smesh-test"), "container")
	if err := os.MkdirAll(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := Remove(filepath.Dir(cg), 5*time.Second); err != nil {
			t.Errorf("cleaning up: %v", err)
		}
	})
	fd, err := unix.Open(cg, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=/proc/%d/ns/cgroup", ofHelperEnv, os.Getpid()))
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Pdeathsig:   syscall.SIGKILL,
		UseCgroupFD: true, CgroupFD: fd,
		Cloneflags: syscall.CLONE_NEWCGROUP,
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "\n0::/\n") && !strings.Contains(string(out), "raw 0::/\n") {
		t.Fatalf("the helper is not in a cgroup namespace of its own:\n%s", out)
	}
	if want := "of " + cg + " <nil>\n"; !strings.Contains(string(out), want) {
		t.Errorf("Of in a private cgroup namespace:\n%s\nwant %q", out, want)
	}
}
