package cgroups

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// MemoryLimit is the memory limit that applies to the cgroup at path below
// the cgroup v2 mount: the smallest memory.max of path and its ancestors
// (systemd's MemoryMax= of a unit or its slice, a pod's limits.memory).
// ok is false when none sets one ("max", or no memory controller there).
func MemoryLimit(mount, path string) (limit int64, ok bool, err error) {
	if !Within(path, mount) {
		return 0, false, fmt.Errorf("%s is not below the cgroup v2 mount %s", path, mount)
	}
	for dir := path; ; dir = filepath.Dir(dir) {
		data, err := os.ReadFile(filepath.Join(dir, "memory.max"))
		switch {
		case errors.Is(err, os.ErrNotExist):
			// The root has no memory.max, nor has a cgroup whose
			// parent does not enable the memory controller.
		case err != nil:
			return 0, false, err
		default:
			v := strings.TrimSpace(string(data))
			if v != "max" {
				n, err := strconv.ParseInt(v, 10, 64)
				if err != nil {
					return 0, false, fmt.Errorf("%s/memory.max: %q is not a byte count", dir, v)
				}
				if !ok || n < limit {
					limit, ok = n, true
				}
			}
		}
		if dir == mount || len(dir) <= len(mount) {
			return limit, ok, nil
		}
	}
}
