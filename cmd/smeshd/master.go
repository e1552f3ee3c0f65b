package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/daemon"
	"github.com/smesh-dev/smesh/pkg/handover"
)

// Under systemd `smeshd -c FILE` is a small master, the unit's main process,
// and the daemon runs in a worker it starts (docs/restart.md, 3.3): systemd
// waits for the main process to exit before it starts the next one, so only
// a process that is not the main one can go on relaying while the next
// smeshd already serves. The master passes the worker what systemd passed
// it (the descriptor store's content), forwards signals, and exits:
//   - once the worker says it has moved out of the unit to drain there
//     ("detached": `systemctl restart`), with 0;
//   - when the worker exits, with its status (`systemctl stop`: the worker
//     drained in place; a crash: non-zero, so Restart=on-failure applies,
//     and the store gives everything back to the next worker).
//
// A worker that handed over to a successor (`smeshd upgrade`) names it;
// the master is a child subreaper, so the successor becomes its child when
// its parent, the old worker, exits.

// masterMode reports whether this `smeshd -c FILE` is to be a master:
// executed by systemd itself as a service's process (SYSTEMD_EXEC_PID, 248+,
// is this PID: a process started from anything systemd runs, such as a
// test or a benchmark under a CI runner's unit, inherits another), with
// NOTIFY_SOCKET and a runtime directory, and not a worker itself.
func masterMode() bool {
	return os.Getenv("SYSTEMD_EXEC_PID") == strconv.Itoa(os.Getpid()) && os.Getenv("NOTIFY_SOCKET") != "" &&
		os.Getenv("INVOCATION_ID") != "" && os.Getenv("RUNTIME_DIRECTORY") != "" && os.Getenv(daemon.MasterEnv) == ""
}

// runMaster runs the master until it has to exit, and returns the exit
// status.
func runMaster(args []string) int {
	logf := func(format string, a ...any) {
		fmt.Fprintf(os.Stderr, "smeshd master: "+format+"\n", a...)
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		logf("cannot become a child subreaper: %v", err)
		return 1
	}
	sockPath := filepath.Join(strings.Split(os.Getenv("RUNTIME_DIRECTORY"), ":")[0], daemon.MasterSocketName)
	os.Remove(sockPath)
	sock, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		logf("%v", err)
		return 1
	}
	defer sock.Close()

	// What systemd passed (LISTEN_PID names this process) goes to the
	// worker from fd 3 on, in the same order, with LISTEN_FDNAMES.
	var extra []*os.File
	if os.Getenv("LISTEN_PID") == strconv.Itoa(os.Getpid()) {
		n, _ := strconv.Atoi(os.Getenv("LISTEN_FDS"))
		for i := range n {
			extra = append(extra, os.NewFile(uintptr(3+i), "stored"))
		}
	}
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		switch name {
		case "LISTEN_PID", "LISTEN_FDS", "WATCHDOG_PID", "SYSTEMD_EXEC_PID", handover.WorkerFDsEnv, daemon.MasterEnv:
			continue
		}
		env = append(env, kv)
	}
	env = append(env, daemon.MasterEnv+"="+sockPath, handover.WorkerFDsEnv+"="+strconv.Itoa(len(extra)))

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	// This binary by its path (not /proc/self/exe, which would make the
	// worker's comm "exe" in the journal).
	exe, err := os.Executable()
	if err != nil {
		exe = "/proc/self/exe"
	}
	cmd := exec.Command(exe, args...)
	cmd.Env, cmd.ExtraFiles = env, extra
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		logf("starting the worker: %v", err)
		return 1
	}
	for _, f := range extra {
		f.Close() // the worker's and the store's now
	}
	worker := cmd.Process.Pid
	logf("worker PID %d started with %d stored descriptors", worker, len(extra))

	type exit struct {
		pid    int
		status unix.WaitStatus
	}
	exits := make(chan exit, 8)
	go func() {
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, 0, nil)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return // no child left: the last exit was reported
			}
			exits <- exit{pid, ws}
		}
	}()
	msgs := make(chan string, 8)
	go func() {
		buf := make([]byte, 256)
		for {
			n, err := sock.Read(buf)
			if err != nil {
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	// A worker reaped by someone else (a successor of `smeshd upgrade`
	// that dies while its parent, the old worker, still drains) is seen
	// gone here.
	gone := time.NewTicker(time.Second)
	defer gone.Stop()
	stopping := false
	for {
		select {
		case <-gone.C:
			if unix.Kill(worker, 0) == unix.ESRCH {
				logf("worker PID %d is gone", worker)
				return 1
			}
		case sig := <-sigs:
			if sig == syscall.SIGTERM || sig == syscall.SIGINT {
				stopping = true
			}
			unix.Kill(worker, sig.(syscall.Signal))
		case m := <-msgs:
			kind, pidText, _ := strings.Cut(m, " ")
			pid, _ := strconv.Atoi(pidText)
			switch {
			case kind == daemon.MasterSuccessor && pid > 0:
				logf("worker PID %d handed over to PID %d", worker, pid)
				worker = pid
			case kind == daemon.MasterDetached && pid == worker:
				logf("worker PID %d drains outside the unit; the next smeshd takes over from the descriptor store", worker)
				return 0
			}
		case e := <-exits:
			if e.pid != worker {
				continue // a worker that handed over and drained
			}
			code := e.status.ExitStatus()
			if e.status.Signaled() {
				code = 128 + int(e.status.Signal())
			}
			if !stopping && code == 0 {
				code = 1 // a worker never ends by itself: restart it
			}
			logf("worker PID %d exited (%v)", worker, describe(e.status))
			return code
		}
	}
}

func describe(ws unix.WaitStatus) string {
	if ws.Signaled() {
		return "signal " + ws.Signal().String()
	}
	return "status " + strconv.Itoa(ws.ExitStatus())
}
