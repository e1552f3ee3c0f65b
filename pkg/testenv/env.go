package testenv

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/smesh-dev/smesh/pkg/cgroups"
)

// RequirePrivilegedEnv names the environment variable that turns skips into
// failures. CI sets it to 1 so that a green run cannot hide kernel tests that
// did not run.
const RequirePrivilegedEnv = "SMESH_REQUIRE_PRIVILEGED"

// kernelBTF is what CO-RE relocation reads; without it no BPF object of
// smesh loads, so kernel tests cannot run either.
const kernelBTF = "/sys/kernel/btf/vmlinux"

// RequirePrivileged skips t, with the reason, unless the test runs as root
// on a machine with a cgroup v2 mount and kernel BTF. When
// SMESH_REQUIRE_PRIVILEGED=1 it fails t instead.
func RequirePrivileged(t testing.TB) {
	t.Helper()
	var missing []string
	if euid := os.Geteuid(); euid != 0 {
		missing = append(missing, fmt.Sprintf("root (running as euid %d)", euid))
	}
	if _, err := cgroups.Mount(); err != nil {
		missing = append(missing, err.Error())
	}
	if _, err := os.Stat(kernelBTF); err != nil {
		missing = append(missing, fmt.Sprintf("kernel BTF: %v", err))
	}
	if len(missing) > 0 {
		SkipOrFail(t, "kernel test needs %s", strings.Join(missing, "; "))
	}
}

// RequireCommand returns the path of the external program name (iperf3,
// socat, ...). If it is not installed, t is skipped, or failed when
// SMESH_REQUIRE_PRIVILEGED=1: CI installs every tool a test drives.
func RequireCommand(t testing.TB, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		SkipOrFail(t, "test needs the command %s: %v", name, err)
	}
	return path
}

// SkipOrFail skips t with the reason, or fails it where skips are not
// allowed (SMESH_REQUIRE_PRIVILEGED=1, as in CI).
func SkipOrFail(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv(RequirePrivilegedEnv) == "1" {
		t.Fatalf(format+" (failing instead of skipping: %s=1)", append(args, RequirePrivilegedEnv)...)
	}
	t.Skipf(format, args...)
}

// Cgroup2Mount returns where the cgroup v2 hierarchy is mounted:
// /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a hybrid one.
// It is [cgroups.Mount], kept for tests that know it by this name.
func Cgroup2Mount() (string, error) {
	return cgroups.Mount()
}

// Unique returns prefix followed by a dash and 8 random hex digits, e.g.
// Unique("smesh-test") = "smesh-test-3fa85f64". Random rather than counted,
// so that test binaries running side by side never pick the same name.
func Unique(prefix string) string {
	var b [4]byte
	// crypto/rand.Read never returns an error (Go 1.24+).
	_, _ = rand.Read(b[:])
	return prefix + "-" + hex.EncodeToString(b[:])
}
