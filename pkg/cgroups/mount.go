package cgroups

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// mountMu serializes Mount: two callers that both find no cgroup v2 mount
// must not both mount one. It guards the mount namespace, which is
// process-wide state, not state of this package.
var mountMu sync.Mutex

// Mount returns where the cgroup v2 hierarchy is mounted, read from
// /proc/self/mounts: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified
// on hybrid ones.
//
// `ip netns exec NAME cmd` runs cmd in a mount namespace of its own with a
// fresh /sys, where the cgroup v2 mount is missing. When this process sees
// no cgroup2 mount but PID 1 does, Mount mounts the hierarchy where PID 1
// has it, in this process's mount namespace only (see mountPrivate), and
// returns that. Otherwise the error says what is wrong and what to do.
func Mount() (string, error) {
	mountMu.Lock()
	defer mountMu.Unlock()
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return "", fmt.Errorf("finding the cgroup v2 mount: %w", err)
	}
	defer f.Close()
	mounts, err := parseMounts(f)
	if err != nil {
		return "", err
	}
	if m, ok := cgroup2(mounts); ok {
		return m.point, nil
	}
	return mountPrivate()
}

// sysfsCgroup is where sysfs has its mount point for cgroup file systems;
// every cgroup v2 mount PID 1 may have that mountPrivate recreates is there
// or below it.
const sysfsCgroup = "/sys/fs/cgroup"

// mountPrivate mounts the cgroup v2 hierarchy in this process's mount
// namespace, at the place PID 1 has it, with the same options. It does so
// only when it is sure to change nothing outside this namespace:
//
//   - PID 1 has a cgroup2 mount and this process has none, so they are in
//     different mount namespaces. (Where /proc/1/ns/mnt can be read, that is
//     checked too; a root without CAP_SYS_PTRACE over PID 1 cannot.)
//   - /sys/fs/cgroup is sysfs's own empty directory, nothing mounted on it,
//     on a mount that propagates nothing to a peer: mounts below it stay in
//     this namespace. That is what `ip netns exec` leaves (it makes / a
//     slave and mounts a new sysfs).
//   - The hierarchy's options (nsdelegate, memory_recursiveprot, ...) are
//     those of PID 1's mount: mounting cgroup2 applies its options to the
//     whole hierarchy, for every namespace, so other options would change
//     the host.
//
// On a hybrid host (PID 1 has it at /sys/fs/cgroup/unified) a tmpfs on
// /sys/fs/cgroup holds the directory to mount it on, so that paths are the
// same as outside: in the configuration, in the log, in /proc/PID/cgroup.
// The mounts go away with the namespace.
func mountPrivate() (string, error) {
	pid1, err := os.ReadFile("/proc/1/mounts")
	if err != nil {
		return "", errNotMounted
	}
	hostMounts, err := parseMounts(bytes.NewReader(pid1))
	if err != nil {
		return "", err
	}
	host, ok := cgroup2(hostMounts)
	if !ok {
		return "", errNotMounted
	}
	fail := func(err error) (string, error) {
		return "", fmt.Errorf("no cgroup v2 hierarchy is mounted in this mount namespace, though PID 1 has one at %s "+
			"(`ip netns exec` starts its command in a mount namespace with a fresh /sys, without it), "+
			"and it cannot be mounted here: %w; start smeshd with `nsenter --net=/run/netns/NAME smeshd ...` "+
			"instead of `ip netns exec NAME smeshd ...`: nsenter keeps the mounts", host.point, err)
	}
	if self, init, err := mountNamespaces(); err == nil && self == init {
		return fail(fmt.Errorf("this is PID 1's mount namespace (%s), where nothing is mounted on its behalf", self))
	}
	if host.point != sysfsCgroup && !strings.HasPrefix(host.point, sysfsCgroup+"/") {
		return fail(fmt.Errorf("PID 1 has it at %s, not at or below %s", host.point, sysfsCgroup))
	}
	if err := bareSysfsDir(sysfsCgroup); err != nil {
		return fail(err)
	}
	features, err := os.ReadFile("/sys/kernel/cgroup/features")
	if err != nil {
		return fail(fmt.Errorf("reading the cgroup2 mount options this kernel knows: %w", err))
	}
	flags, data := cgroup2MountOptions(host.options, strings.Fields(string(features)))

	if host.point != sysfsCgroup {
		if err := unix.Mount("tmpfs", sysfsCgroup, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=755"); err != nil {
			return fail(fmt.Errorf("mounting a tmpfs on %s: %w", sysfsCgroup, err))
		}
		if err := os.MkdirAll(host.point, 0o755); err != nil {
			unix.Unmount(sysfsCgroup, unix.MNT_DETACH)
			return fail(err)
		}
	}
	if err := unix.Mount("cgroup2", host.point, "cgroup2", flags, data); err != nil {
		if host.point != sysfsCgroup {
			unix.Unmount(sysfsCgroup, unix.MNT_DETACH)
		}
		return fail(fmt.Errorf("mounting cgroup2 on %s: %w", host.point, err))
	}
	return host.point, nil
}

// mountNamespaces returns the mount namespaces of this process and of PID 1
// ("mnt:[4026531841]").
func mountNamespaces() (self, init string, err error) {
	if self, err = os.Readlink("/proc/self/ns/mnt"); err != nil {
		return "", "", err
	}
	if init, err = os.Readlink("/proc/1/ns/mnt"); err != nil {
		return "", "", err
	}
	return self, init, nil
}

// bareSysfsDir checks that dir is an empty directory of sysfs with nothing
// mounted on it, on a mount that is not shared with another namespace.
func bareSysfsDir(dir string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return err
	}
	if st.Type != unix.SYSFS_MAGIC {
		return fmt.Errorf("%s is not sysfs's own directory: something else is mounted there", dir)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	if len(ents) > 0 {
		return fmt.Errorf("%s is not empty", dir)
	}
	info, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	point, optional := mountOf(string(info), dir)
	if strings.Contains(optional, "shared:") {
		return fmt.Errorf("%s is a shared mount (%s): a mount below it would propagate to other mount namespaces", point, optional)
	}
	return nil
}

// mountOf finds, in mountinfo (the format of /proc/self/mountinfo), the
// mount path is on and returns its mount point and optional fields
// ("shared:5 master:1", or "").
func mountOf(mountinfo, path string) (point, optional string) {
	sc := bufio.NewScanner(strings.NewReader(mountinfo))
	for sc.Scan() {
		// id parent major:minor root mountpoint options [optional...] - fstype source superoptions
		fields := strings.Fields(sc.Text())
		sep := slices.Index(fields, "-")
		if len(fields) < 6 || sep < 6 {
			continue
		}
		mp := unescapeMountPath(fields[4])
		// The longest mount point that holds path; of mounts on the same
		// point, the later one is on top.
		if Within(path, mp) && len(mp) >= len(point) {
			point, optional = mp, strings.Join(fields[6:sep], " ")
		}
	}
	return point, optional
}

// cgroup2MountOptions turns the options of PID 1's cgroup2 mount (from
// /proc/1/mounts) into mount(2) flags and data: the cgroup2 options the
// kernel lists in features, and the per-mount flags.
func cgroup2MountOptions(options string, features []string) (flags uintptr, data string) {
	var keep []string
	for _, o := range strings.Split(options, ",") {
		switch o {
		case "ro":
			flags |= unix.MS_RDONLY
		case "nosuid":
			flags |= unix.MS_NOSUID
		case "nodev":
			flags |= unix.MS_NODEV
		case "noexec":
			flags |= unix.MS_NOEXEC
		case "relatime":
			flags |= unix.MS_RELATIME
		case "noatime":
			flags |= unix.MS_NOATIME
		default:
			if slices.Contains(features, o) {
				keep = append(keep, o)
			}
		}
	}
	return flags, strings.Join(keep, ",")
}
