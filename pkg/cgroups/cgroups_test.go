package cgroups

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParseMount(t *testing.T) {
	for _, tc := range []struct {
		name, mounts, want string
	}{
		{
			name: "hybrid",
			mounts: "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n" +
				"cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n" +
				"cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n",
			want: "/sys/fs/cgroup/unified",
		},
		{
			name:   "unified",
			mounts: "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n",
			want:   "/sys/fs/cgroup",
		},
		{
			name:   "escaped",
			mounts: `none /tmp/my\040cg\134x cgroup2 rw 0 0` + "\n",
			want:   `/tmp/my cg\x`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseMount(strings.NewReader(tc.mounts))
			if err != nil || got != tc.want {
				t.Errorf("parseMount() = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
	if _, err := parseMount(strings.NewReader("proc /proc proc rw 0 0\n")); err == nil {
		t.Error("parseMount() without a cgroup2 line: no error")
	}
}

func TestRemove(t *testing.T) {
	testRemove(t, kill)
}

// TestRemoveWithoutCgroupKill takes the path of kernels older than 5.14,
// which this machine's kernel may never take by itself.
func TestRemoveWithoutCgroupKill(t *testing.T) {
	testRemove(t, killEach)
}

// testRemove fills a cgroup and a grandchild of it with processes that fork
// processes of their own, and checks that remove leaves none of them and no
// directory behind.
func testRemove(t *testing.T, kill func(string) error) {
	mount := requirePrivileged(t)
	root := filepath.Join(mount, unique("smesh-test"))
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	// Should the test fail before remove ran.
	t.Cleanup(func() {
		if _, err := os.Stat(root); err == nil {
			if err := Remove(root, 5*time.Second); err != nil {
				t.Errorf("cleaning up: %v", err)
			}
		}
	})
	leaf := filepath.Join(root, "child", "grandchild")
	if err := os.MkdirAll(leaf, 0o755); err != nil {
		t.Fatal(err)
	}

	var shells []*exec.Cmd
	var orphans []int
	for _, cg := range []string{root, leaf} {
		// sleep in the background is nobody's child we can wait for: only
		// the cgroup knows it once sh is gone.
		sh, bg := startIn(t, cg, "sleep 30 </dev/null >/dev/null 2>&1 & echo $!; exec sleep 30")
		shells = append(shells, sh)
		orphans = append(orphans, bg)
		pids, err := Procs(cg)
		if err != nil {
			t.Fatal(err)
		}
		for _, pid := range []int{sh.Process.Pid, bg} {
			if !slices.Contains(pids, pid) {
				t.Fatalf("pid %d is not in %s (cgroup.procs: %v)", pid, cg, pids)
			}
		}
	}

	if err := remove(root, 5*time.Second, kill); err != nil {
		t.Fatalf("remove(%s): %v", root, err)
	}
	if _, err := os.Stat(root); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s still exists after remove (stat: %v)", root, err)
	}
	for _, sh := range shells {
		err := sh.Wait()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Errorf("sh (pid %d) ended with %v, want killed by SIGKILL", sh.Process.Pid, err)
		}
	}
	// Reaping an orphan is up to init, which may take its time: a zombie
	// is dead enough.
	for _, pid := range orphans {
		if state, err := procState(pid); err == nil && state != "Z" {
			t.Errorf("pid %d (sleep) is in state %s after remove, want gone or zombie", pid, state)
		}
	}
}

// startIn starts sh -c script born in cgroup cg and returns it with the
// first line it prints, which must be a PID.
func startIn(t *testing.T, cg, script string) (*exec.Cmd, int) {
	t.Helper()
	fd, err := unix.Open(cg, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	cmd := exec.Command("sh", "-c", script)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, UseCgroupFD: true, CgroupFD: fd}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("reading the pid sh started: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatalf("sh printed %q, want a pid", line)
	}
	return cmd, pid
}

// procState returns the state letter of process pid (R, S, Z, ...).
func procState(pid int) (string, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", err
	}
	// pid (comm) state ...; comm may contain spaces and parentheses.
	i := strings.LastIndex(string(data), ") ")
	if i < 0 || i+2 >= len(data) {
		return "", fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	return string(data[i+2 : i+3]), nil
}

// requirePrivileged returns the cgroup v2 mount, or skips t when it cannot
// create cgroups there: fails it instead when SMESH_REQUIRE_PRIVILEGED=1.
// (pkg/testenv has the full check, but it imports this package.)
func requirePrivileged(t *testing.T) string {
	t.Helper()
	var missing []string
	if euid := os.Geteuid(); euid != 0 {
		missing = append(missing, fmt.Sprintf("root (running as euid %d)", euid))
	}
	mount, err := Mount()
	if err != nil {
		missing = append(missing, err.Error())
	}
	if len(missing) > 0 {
		msg := "test needs " + strings.Join(missing, "; ")
		if os.Getenv("SMESH_REQUIRE_PRIVILEGED") == "1" {
			t.Fatal(msg + " (failing instead of skipping: SMESH_REQUIRE_PRIVILEGED=1)")
		}
		t.Skip(msg)
	}
	return mount
}

// unique returns prefix-<8 random hex digits>, a name no concurrent test
// binary picks too.
func unique(prefix string) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return prefix + "-" + hex.EncodeToString(b[:])
}
