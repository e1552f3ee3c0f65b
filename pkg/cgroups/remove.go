package cgroups

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Remove SIGKILLs every process in the cgroup tree at path, waits until none
// is left, and removes path and every cgroup below it, children first. It
// gives up with an error after timeout.
//
// Every process in the tree dies, so path must be a cgroup the caller
// created and put only its own processes into. path must exist.
func Remove(path string, timeout time.Duration) error {
	return remove(path, timeout, kill)
}

// remove is Remove with the way to kill the processes in a tree passed in,
// so that tests reach the fallback for kernels without cgroup.kill.
func remove(path string, timeout time.Duration, kill func(path string) error) error {
	deadline := time.Now().Add(timeout)
	if err := kill(path); err != nil {
		return err
	}
	for {
		populated, err := populated(path)
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
		if err := kill(path); err != nil {
			return err
		}
		time.Sleep(10 * time.Millisecond)
	}
	return removeTree(path, deadline)
}

// RemoveTree removes path and every cgroup below it, children first, once
// their processes are gone (it kills nothing; it works on any cgroup
// hierarchy, a v1 name=systemd one too). It gives up with an error after
// timeout.
func RemoveTree(path string, timeout time.Duration) error {
	return removeTree(path, time.Now().Add(timeout))
}

// removeTree is RemoveTree by a deadline. rmdir of a cgroup whose last
// process just exited can still see EBUSY for a moment: it retries until
// the deadline.
func removeTree(path string, deadline time.Time) error {
	dirs, err := tree(path)
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

// kill SIGKILLs every process in the cgroup tree at path: with cgroup.kill
// (Linux 5.14+) in one atomic step, otherwise PID by PID.
func kill(path string) error {
	// No O_CREATE (os.WriteFile would add it): on kernfs, creating a
	// missing file fails with EACCES, which would hide that cgroup.kill
	// does not exist.
	f, err := os.OpenFile(filepath.Join(path, "cgroup.kill"), os.O_WRONLY, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return killEach(path)
	}
	if err == nil {
		_, err = f.Write([]byte("1"))
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		return fmt.Errorf("killing the processes in %s: %w", path, err)
	}
	return nil
}

// killEach SIGKILLs the processes in the cgroup tree at path one by one. A
// process forked meanwhile escapes; Remove sweeps again until none is left.
func killEach(path string) error {
	dirs, err := tree(path)
	if err != nil {
		return err
	}
	for _, dir := range dirs {
		pids, err := Procs(dir)
		if err != nil {
			return fmt.Errorf("listing the processes in %s: %w", dir, err)
		}
		for _, pid := range pids {
			// ESRCH: it exited in between.
			if err := unix.Kill(pid, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("killing pid %d in %s: %w", pid, dir, err)
			}
		}
	}
	return nil
}

// populated reports whether any process is left in the tree at path (the
// "populated" key of cgroup.events covers the descendants too).
func populated(path string) (bool, error) {
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

// tree lists path and every cgroup below it, parents before children.
func tree(path string) ([]string, error) {
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
