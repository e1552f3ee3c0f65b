package enrol

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/cgroups"
)

// found is what one scan saw of one network namespace: the enrolled
// processes in it and their cgroups.
type found struct {
	pids    []int
	cgroups []string
}

// scanResult is a scan's view: namespaces by inode, and every cgroup
// directory of the enrolled trees (for the watcher).
type scanResult struct {
	ns   map[uint64]*found
	dirs []string
}

// scan walks the enrolled cgroup trees and groups their processes by
// network namespace. A process or cgroup that goes away meanwhile is
// skipped: the next scan sees the world as it is then.
func scan(roots []string) (scanResult, error) {
	res := scanResult{ns: make(map[uint64]*found)}
	var errs []error
	for _, root := range roots {
		err := filepath.WalkDir(root, func(dir string, d fs.DirEntry, err error) error {
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return nil
				}
				return err
			}
			if !d.IsDir() {
				return nil
			}
			res.dirs = append(res.dirs, dir)
			pids, err := cgroups.Procs(dir)
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return nil
				}
				return err
			}
			for _, pid := range pids {
				ino, err := netnsInode(pid)
				if err != nil {
					continue // exited, or a kernel thread
				}
				f := res.ns[ino]
				if f == nil {
					f = &found{}
					res.ns[ino] = f
				}
				f.pids = append(f.pids, pid)
				if !slices.Contains(f.cgroups, dir) {
					f.cgroups = append(f.cgroups, dir)
				}
			}
			return nil
		})
		if err != nil {
			errs = append(errs, fmt.Errorf("scanning enrolled cgroup %s: %w", root, err))
		}
	}
	return res, errors.Join(errs...)
}

// netnsInode names the network namespace of a process by the inode of
// its nsfs file, which stays unique for as long as the namespace lives.
func netnsInode(pid int) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}
