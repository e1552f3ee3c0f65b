package daemon

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/smesh-dev/smesh/pkg/config"
)

// Cgroups is [capture] cgroups resolved on this host.
type Cgroups struct {
	// Paths are the enrolled cgroup directories.
	Paths []string
	// Missing are those of Paths that do not exist yet: smeshd creates
	// them.
	Missing []string
}

// ResolveCgroups resolves [capture] cgroups below the cgroup v2 mount and
// checks each entry as attaching to it needs: not the mount itself, not
// outside it, not below another entry (config.CgroupPaths), and an existing
// directory or one smeshd can create (its parent exists). smeshd's start,
// its reloads and `smeshd check` all take the cgroups from here, so that
// check accepts exactly what start and reload accept. It changes nothing.
func ResolveCgroups(cfg config.Config, mount string) (Cgroups, error) {
	paths, err := cfg.CgroupPaths(mount)
	if err != nil {
		return Cgroups{}, err
	}
	// [[capture.workloads]] at or below them (the node's name only makes
	// default identities, which this does not keep).
	if _, err := cfg.Workloads(mount, "node"); err != nil {
		return Cgroups{}, err
	}
	res := Cgroups{Paths: paths}
	var errs []error
	for _, p := range paths {
		fi, err := os.Stat(p)
		switch {
		case errors.Is(err, os.ErrNotExist), errors.Is(err, syscall.ENOTDIR):
			parent := filepath.Dir(p)
			if pi, err := os.Stat(parent); err != nil || !pi.IsDir() {
				errs = append(errs, fmt.Errorf("capture.cgroups: %s does not exist, and smeshd creates only its last directory: %s is not a cgroup directory", p, parent))
				continue
			}
			res.Missing = append(res.Missing, p)
		case err != nil:
			errs = append(errs, fmt.Errorf("capture.cgroups: %w", err))
		case !fi.IsDir():
			errs = append(errs, fmt.Errorf("capture.cgroups: %s is a file, not a cgroup (a cgroup is a directory below %s)", p, mount))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return Cgroups{}, err
	}
	return res, nil
}
