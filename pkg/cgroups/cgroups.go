// Package cgroups finds the cgroup v2 hierarchy and the cgroups of processes,
// and tears cgroup trees down again. smesh enrolls workloads by cgroup and
// tells its own sockets apart by cgroup, so these few facts are needed by the
// daemon, its tests and bench.
package cgroups

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// parseMount returns the mount point of the first cgroup2 line of r, in the
// format of /proc/mounts.
func parseMount(r io.Reader) (string, error) {
	mounts, err := parseMounts(r)
	if err != nil {
		return "", err
	}
	m, ok := cgroup2(mounts)
	if !ok {
		return "", errNotMounted
	}
	return m.point, nil
}

var errNotMounted = errors.New("no cgroup v2 hierarchy is mounted (see /proc/mounts); smesh needs cgroup v2")

// mount is one line of /proc/PID/mounts.
type mount struct {
	point, fstype, options string
}

func parseMounts(r io.Reader) ([]mount, error) {
	var ms []mount
	s := bufio.NewScanner(r)
	for s.Scan() {
		// device mountpoint fstype options dump pass
		fields := strings.Fields(s.Text())
		if len(fields) >= 4 {
			ms = append(ms, mount{point: unescapeMountPath(fields[1]), fstype: fields[2], options: fields[3]})
		}
	}
	if err := s.Err(); err != nil {
		return nil, fmt.Errorf("reading mounts: %w", err)
	}
	return ms, nil
}

// cgroup2 returns the first cgroup2 mount of ms.
func cgroup2(ms []mount) (mount, bool) {
	for _, m := range ms {
		if m.fstype == "cgroup2" {
			return m, true
		}
	}
	return mount{}, false
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

// Of returns the cgroup v2 directory of process pid (0: this process).
//
// /proc/PID/cgroup names the cgroup relative to the reader's cgroup
// namespace. A container on a cgroup v2 host runs in a namespace of its own,
// rooted at its own cgroup, where its cgroup reads as "/"; the node's tree,
// mounted into it (smeshd's DaemonSet mounts the node's /sys/fs/cgroup),
// shows the cgroup at its full path. So when this process's cgroup namespace
// is not PID 1's, the file is also read from a thread in PID 1's namespace
// (with the host's PID namespace, the node's), and of the two paths the one
// whose cgroup.procs lists the process is the answer.
func Of(mount string, pid int) (string, error) {
	return of(mount, pid, "/proc/1/ns/cgroup")
}

// of is Of with the reference cgroup namespace, the node's, named by refNS.
func of(mount string, pid int, refNS string) (string, error) {
	file := "/proc/self/cgroup"
	if pid != 0 {
		file = "/proc/" + strconv.Itoa(pid) + "/cgroup"
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return "", err
	}
	path, err := parseCgroupFile(file, data, mount)
	if err != nil {
		return "", err
	}
	if sameCgroupNamespace("/proc/self/ns/cgroup", refNS) {
		return path, nil
	}
	hostData, err := readInCgroupNamespace(refNS, file)
	if err != nil {
		return path, nil // no way to know better: the old answer
	}
	hostPath, err := parseCgroupFile(file, hostData, mount)
	if err != nil {
		return path, nil
	}
	if pid == 0 {
		pid = os.Getpid()
	}
	for _, p := range []string{hostPath, path} {
		if procs, err := Procs(p); err == nil && slices.Contains(procs, pid) {
			return p, nil
		}
	}
	return path, nil
}

func parseCgroupFile(file string, data []byte, mount string) (string, error) {
	for _, line := range strings.Split(string(data), "\n") {
		if rel, ok := strings.CutPrefix(line, "0::"); ok {
			return filepath.Join(mount, rel), nil
		}
	}
	return "", fmt.Errorf("%s has no cgroup v2 entry", file)
}

// sameCgroupNamespace reports whether two nsfs files name one namespace;
// true when either cannot be read (nothing better can be done then).
func sameCgroupNamespace(a, b string) bool {
	var sa, sb unix.Stat_t
	if unix.Stat(a, &sa) != nil || unix.Stat(b, &sb) != nil {
		return true
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino
}

// readInCgroupNamespace reads file from an OS thread switched into the
// cgroup namespace nsFile (setns(2) with CLONE_NEWCGROUP changes only the
// calling thread, and needs CAP_SYS_ADMIN). The thread is never given back
// to Go's scheduler: it ends with the goroutine.
func readInCgroupNamespace(nsFile, file string) ([]byte, error) {
	type result struct {
		data []byte
		err  error
	}
	res := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		// No UnlockOSThread: a thread in another namespace must die.
		fd, err := unix.Open(nsFile, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			res <- result{nil, err}
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWCGROUP); err != nil {
			res <- result{nil, fmt.Errorf("entering cgroup namespace %s: %w", nsFile, err)}
			return
		}
		// /proc/thread-self: /proc/self/cgroup would be read by the
		// same thread anyway, but name it for the reader.
		if strings.HasPrefix(file, "/proc/self/") {
			file = "/proc/thread-self/" + strings.TrimPrefix(file, "/proc/self/")
		}
		data, err := os.ReadFile(file)
		res <- result{data, err}
	}()
	r := <-res
	return r.data, r.err
}

// ID returns the cgroup id of a cgroup v2 directory: the inode number, which
// is what bpf_get_current_cgroup_id() reports.
func ID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat cgroup %s: %w", path, err)
	}
	return st.Ino, nil
}

// Procs lists the PIDs in a cgroup (not in its descendants).
func Procs(path string) ([]int, error) {
	data, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(string(data)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("parsing %s/cgroup.procs: %w", path, err)
		}
		pids = append(pids, pid)
	}
	return pids, nil
}

// Join moves process pid (0: this process) into the cgroup at path.
func Join(path string, pid int) error {
	if pid == 0 {
		pid = os.Getpid()
	}
	err := os.WriteFile(filepath.Join(path, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0)
	if err != nil {
		return fmt.Errorf("moving pid %d into cgroup %s: %w", pid, path, err)
	}
	return nil
}

// Within reports whether path is dir itself or below it.
func Within(path, dir string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}
