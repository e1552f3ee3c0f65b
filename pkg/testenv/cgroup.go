package testenv

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
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
	mount, err := Cgroup2Mount()
	if err != nil {
		t.Fatalf("creating a test cgroup: %v", err)
	}
	path := filepath.Join(mount, Unique("smesh-test"))
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatalf("creating a test cgroup: %v", err)
	}
	t.Cleanup(func() {
		if err := removeCgroup(path, cgroupRemoveTimeout); err != nil {
			t.Errorf("removing test cgroup: %v", err)
		}
	})
	return path
}

// removeCgroup kills what runs in the cgroup tree at path and removes it.
func removeCgroup(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	if err := killCgroup(path); err != nil {
		return err
	}
	for {
		populated, err := cgroupPopulated(path)
		if err != nil {
			return err
		}
		if !populated {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes in %s did not exit within %v", path, timeout)
		}
		// Without cgroup.kill, processes forked after the first sweep
		// need another one.
		if err := killCgroup(path); err != nil {
			return err
		}
		time.Sleep(10 * time.Millisecond)
	}

	// Children first. rmdir of a cgroup whose last process just exited can
	// still see EBUSY for a moment, so retry until the deadline.
	dirs, err := cgroupDirs(path)
	if err != nil {
		return err
	}
	for _, dir := range slices.Backward(dirs) {
		for {
			err := unix.Rmdir(dir)
			if err == nil || errors.Is(err, unix.ENOENT) {
				break
			}
			if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
				return fmt.Errorf("rmdir %s: %w", dir, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return nil
}

// killCgroup SIGKILLs every process in the cgroup tree at path: with
// cgroup.kill (Linux 5.14+) in one atomic step, otherwise PID by PID.
func killCgroup(path string) error {
	err := os.WriteFile(filepath.Join(path, "cgroup.kill"), []byte("1"), 0)
	if err == nil {
		return nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("killing the processes in %s: %w", path, err)
	}
	dirs, err := cgroupDirs(path)
	if err != nil {
		return err
	}
	for _, dir := range dirs {
		pids, err := cgroupProcs(dir)
		if err != nil {
			return err
		}
		for _, pid := range pids {
			// ESRCH: it exited in between.
			if err := unix.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("killing pid %d in %s: %w", pid, dir, err)
			}
		}
	}
	return nil
}

// cgroupPopulated reports whether any process is left in the tree at path
// (the "populated" key of cgroup.events covers the descendants too).
func cgroupPopulated(path string) (bool, error) {
	data, err := os.ReadFile(filepath.Join(path, "cgroup.events"))
	if err != nil {
		return false, fmt.Errorf("reading the state of %s: %w", path, err)
	}
	for line := range strings.Lines(string(data)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "populated "); ok {
			return v != "0", nil
		}
	}
	return false, fmt.Errorf("%s/cgroup.events has no populated key", path)
}

// cgroupDirs lists path and every cgroup below it, parents before children.
func cgroupDirs(path string) ([]string, error) {
	var dirs []string
	err := filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("listing cgroups below %s: %w", path, err)
	}
	return dirs, nil
}

// cgroupProcs returns the PIDs listed in the cgroup.procs of the cgroup at
// dir.
func cgroupProcs(dir string) ([]int, error) {
	data, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil, fmt.Errorf("listing the processes in %s: %w", dir, err)
	}
	var pids []int
	for f := range bytes.FieldsSeq(data) {
		pid, err := strconv.Atoi(string(f))
		if err != nil {
			return nil, fmt.Errorf("parsing %s/cgroup.procs: %w", dir, err)
		}
		pids = append(pids, pid)
	}
	return pids, nil
}
