package testenv

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
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
	if _, err := Cgroup2Mount(); err != nil {
		missing = append(missing, err.Error())
	}
	if _, err := os.Stat(kernelBTF); err != nil {
		missing = append(missing, fmt.Sprintf("kernel BTF: %v", err))
	}
	if len(missing) > 0 {
		skipOrFail(t, "kernel test needs %s", strings.Join(missing, "; "))
	}
}

// RequireCommand returns the path of the external program name (iperf3,
// socat, ...). If it is not installed, t is skipped, or failed when
// SMESH_REQUIRE_PRIVILEGED=1: CI installs every tool a test drives.
func RequireCommand(t testing.TB, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		skipOrFail(t, "test needs the command %s: %v", name, err)
	}
	return path
}

func skipOrFail(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv(RequirePrivilegedEnv) == "1" {
		t.Fatalf(format+" (failing instead of skipping: %s=1)", append(args, RequirePrivilegedEnv)...)
	}
	t.Skipf(format, args...)
}

// Cgroup2Mount returns the mount point of the first cgroup2 file system in
// /proc/mounts: /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on
// a hybrid one.
func Cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/mounts")
	if err != nil {
		return "", fmt.Errorf("finding the cgroup v2 mount: %w", err)
	}
	defer f.Close()
	return parseCgroup2Mount(f)
}

func parseCgroup2Mount(r io.Reader) (string, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		// device mountpoint fstype options dump pass
		fields := strings.Fields(sc.Text())
		if len(fields) >= 3 && fields[2] == "cgroup2" {
			return unescapeMountPath(fields[1]), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("reading /proc/mounts: %w", err)
	}
	return "", errors.New("no cgroup2 file system is mounted")
}

// unescapeMountPath undoes the octal escapes (\040 for a space, \011, \012,
// \134) the kernel writes into /proc/mounts.
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) && isOctal(s[i+1:i+4]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(s string) bool {
	if len(s) != 3 || s[0] > '3' {
		return false
	}
	for i := 0; i < 3; i++ {
		if s[i] < '0' || s[i] > '7' {
			return false
		}
	}
	return true
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
