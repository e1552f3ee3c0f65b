package cgroups

import (
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// mountHelperEnv makes the test binary, re-executed under `ip netns exec`,
// run mountHelper instead of the tests. Its value is the test's mount
// namespace, where the helper must not mount anything.
const mountHelperEnv = "SMESH_CGROUPS_TEST_MOUNT_HELPER"

// overmountEnv tells mountHelper to cover /sys/fs/cgroup with a tmpfs first,
// so that Mount must refuse.
const overmountEnv = "SMESH_CGROUPS_TEST_OVERMOUNT"

func TestMain(m *testing.M) {
	if ns, ok := os.LookupEnv(mountHelperEnv); ok {
		os.Exit(mountHelper(ns))
	}
	if ns, ok := os.LookupEnv(ofHelperEnv); ok {
		os.Exit(ofHelper(ns))
	}
	os.Exit(m.Run())
}

// mountHelper calls Mount twice and prints what it got and what it sees:
// "KEY value" lines.
func mountHelper(testNS string) int {
	if self, err := os.Readlink("/proc/self/ns/mnt"); err != nil || self == testNS {
		fmt.Fprintf(os.Stderr, "helper: in mount namespace %q (%v), the test's own: refusing\n", self, err)
		return 2
	}
	if os.Getenv(overmountEnv) == "1" {
		if err := unix.Mount("tmpfs", sysfsCgroup, "tmpfs", 0, ""); err != nil {
			fmt.Fprintln(os.Stderr, "helper:", err)
			return 2
		}
	}
	mount, err := Mount()
	if err != nil {
		fmt.Printf("error %s\n", err)
		return 0
	}
	again, err := Mount()
	fmt.Printf("mount %s\nagain %s %v\n", mount, again, err)
	own, err := Of(mount, 0)
	fmt.Printf("cgroup %s %v\n", own, err)
	procs, err := Procs(own)
	fmt.Printf("listed %v %v\n", slices.Contains(procs, os.Getpid()), err)
	data, _ := os.ReadFile("/proc/self/mounts")
	fmt.Printf("cgroup2-mounts %d\n", strings.Count(string(data), " cgroup2 "))
	return 0
}

// TestMountUnderIPNetnsExec runs Mount in a process started with `ip netns
// exec`, whose mount namespace has a fresh /sys without the cgroup v2
// mount. Mount mounts it there, once, at the test's path, and it is the
// live hierarchy (the helper finds itself in its cgroup). The test's own
// mounts do not change. With something else on /sys/fs/cgroup, Mount
// refuses and says what to do instead.
func TestMountUnderIPNetnsExec(t *testing.T) {
	mount := requirePrivileged(t)
	ip, err := exec.LookPath("ip")
	if err != nil {
		skipOrFail(t, "test needs the command ip: %v", err)
	}
	ns := unique("smesh-test")
	if out, err := exec.Command(ip, "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", ns, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command(ip, "netns", "del", ns).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", ns, err, out)
		}
	})
	testNS, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ownCgroup, err := Of(mount, 0)
	if err != nil {
		t.Fatal(err)
	}
	before, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	helper := func(extraEnv ...string) map[string]string {
		t.Helper()
		cmd := exec.Command(ip, "netns", "exec", ns, exe, "-test.run=^$")
		cmd.Env = append(append(os.Environ(), mountHelperEnv+"="+testNS), extraEnv...)
		out, err := cmd.Output()
		if err != nil {
			var stderr []byte
			if ee, ok := err.(*exec.ExitError); ok {
				stderr = ee.Stderr
			}
			t.Fatalf("helper under ip netns exec: %v: %s%s", err, out, stderr)
		}
		got := make(map[string]string)
		for line := range strings.Lines(string(out)) {
			k, v, _ := strings.Cut(strings.TrimSpace(line), " ")
			got[k] = v
		}
		return got
	}

	got := helper()
	want := map[string]string{
		"mount":          mount,
		"again":          mount + " <nil>",
		"cgroup":         ownCgroup + " <nil>", // the helper runs in the test's cgroup
		"listed":         "true <nil>",
		"cgroup2-mounts": "1",
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("helper under ip netns exec: %s %q, want %q (all: %v)", k, got[k], w, got)
		}
	}

	got = helper(overmountEnv + "=1")
	for _, w := range []string{"ip netns exec", "nsenter --net=/run/netns/NAME", "not sysfs's own directory"} {
		if !strings.Contains(got["error"], w) {
			t.Errorf("with a tmpfs on %s, Mount's error does not say %q: %q", sysfsCgroup, w, got["error"])
		}
	}

	// Named network namespaces come and go with other tests on the
	// machine, and /run/netns propagates their mounts everywhere: only
	// the rest must be as it was.
	withoutNetns := func(mounts []byte) string {
		var keep []string
		for _, line := range strings.Split(string(mounts), "\n") {
			if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], "/run/netns/") {
				continue
			}
			keep = append(keep, line)
		}
		return strings.Join(keep, "\n")
	}
	if after, _ := os.ReadFile("/proc/self/mounts"); withoutNetns(after) != withoutNetns(before) {
		t.Errorf("the test's mounts changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

func skipOrFail(t *testing.T, format string, args ...any) {
	t.Helper()
	if os.Getenv("SMESH_REQUIRE_PRIVILEGED") == "1" {
		t.Fatalf(format+" (failing instead of skipping: SMESH_REQUIRE_PRIVILEGED=1)", args...)
	}
	t.Skipf(format, args...)
}

func TestCgroup2MountOptions(t *testing.T) {
	features := []string{"nsdelegate", "favordynmods", "memory_localevents", "memory_recursiveprot", "memory_hugetlb_accounting", "pids_localevents"}
	for _, c := range []struct {
		options string
		flags   uintptr
		data    string
	}{
		// systemd's unified mount: every cgroup2 option is kept, or
		// mounting would clear it for the whole host.
		{"rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC | unix.MS_RELATIME, "nsdelegate,memory_recursiveprot"},
		// A hybrid host's.
		{"rw,relatime", unix.MS_RELATIME, ""},
		// Options that are not cgroup2's (an LSM's) are left out.
		{"ro,noatime,seclabel,favordynmods", unix.MS_RDONLY | unix.MS_NOATIME, "favordynmods"},
	} {
		flags, data := cgroup2MountOptions(c.options, features)
		if flags != c.flags || data != c.data {
			t.Errorf("cgroup2MountOptions(%q) = %#x, %q; want %#x, %q", c.options, flags, data, c.flags, c.data)
		}
	}
}

func TestMountOf(t *testing.T) {
	const info = `22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
24 22 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
25 24 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:8 - tmpfs tmpfs ro,mode=755
41 22 0:38 / /sys rw,relatime master:7 - sysfs netns rw
`
	for _, c := range []struct{ path, point, optional string }{
		// The sysfs mounted last on /sys is on top.
		{"/sys/fs/bpf", "/sys", "master:7"},
		{"/sys/fs/cgroup/unified", "/sys/fs/cgroup", "shared:8"},
		{"/etc", "/", "shared:1"},
		{"/system", "/", "shared:1"},
	} {
		if point, optional := mountOf(info, c.path); point != c.point || optional != c.optional {
			t.Errorf("mountOf(%s) = %q, %q; want %q, %q", c.path, point, optional, c.point, c.optional)
		}
	}
}
