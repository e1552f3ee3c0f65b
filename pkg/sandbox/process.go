package sandbox

import (
	"fmt"
	"os/exec"
	"syscall"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Start starts cmd (cmd.Start) inside a cgroup and a network namespace.
//
// cgroup is the path of a cgroup v2 directory the process is born in, or ""
// for the caller's own. The process is cloned straight into it (clone3 with
// CLONE_INTO_CGROUP, Linux 5.7+), so it never runs an instruction outside
// it: no window in which a connect() escapes capture.
//
// netnsName is the name of a namespace below /run/netns (NewNamedNetns) to
// start the process in, or "" for the caller's own. A new process inherits
// the network namespace of the thread that forks it, so the fork happens on a
// locked OS thread switched into the namespace for just that call.
//
// The process gets SIGKILL when the caller dies, even if it never cleans up
// (a crash, a hard timeout). Start sets these fields of cmd.SysProcAttr,
// allocating it if nil, and keeps the rest; it does not touch cmd.Stdout or
// cmd.Stderr.
func Start(cmd *exec.Cmd, cgroup, netnsName string) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	// Pdeathsig follows the forking thread, not the process; the runtime
	// ends a thread only when a goroutine exits locked to it, which this
	// package does only after a failed setns, when things are broken
	// anyway.
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	if cgroup != "" {
		fd, err := unix.Open(cgroup, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("opening cgroup %s: %w", cgroup, err)
		}
		// Only needed until the clone.
		defer unix.Close(fd)
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = fd
	}
	if netnsName == "" {
		return cmd.Start()
	}
	ns, err := netns.GetFromName(netnsName)
	if err != nil {
		return fmt.Errorf("opening network namespace %s: %w", netnsName, err)
	}
	defer ns.Close()
	return InNetns(ns, cmd.Start)
}
