package daemon

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// `smeshd upgrade` (docs/restart.md, 3.4): the running smeshd starts its
// successor itself, the binary now at the path it was started from, with
// its own arguments and environment, and the successor takes over through
// the hand-over (handover.go). Under systemd that is the only way to
// upgrade without a gap: `systemctl restart` stops before it starts. The
// successor is the running one's child, so it is in the unit's cgroup, and
// the running one, still the unit's main process, tells systemd that the
// successor is the main process now (MAINPID=) right before it releases:
// the successor's READY=1 and WATCHDOG=1 then come from the main process,
// which NotifyAccess=main requires, and the predecessor's exit after its
// drain is not the service's end.
//
// The control socket's "upgrade" is answered once the successor took over
// ("ok PID") or failed ("error: REASON"): it exited (with its status and
// the reason it gave), it was refused, or it did not take over in time.

// upgradeTimeout bounds how long a predecessor waits for the successor it
// started to take over: its whole start (successorStartTimeout) and a
// margin for what comes before it dials the hand-over socket.
const upgradeTimeout = successorStartTimeout + 30*time.Second

// UpgradeAnswerTimeout is how long `smeshd upgrade` waits by default: the
// running smeshd answers within upgradeTimeout.
const UpgradeAnswerTimeout = upgradeTimeout + 30*time.Second

// upgradeReportEnv names the descriptor on which a successor started by
// `smeshd upgrade` writes why it failed, for the predecessor to answer
// with (its stderr goes to the journal, which the predecessor cannot
// read back).
const upgradeReportEnv = "SMESHD_UPGRADE_REPORT_FD"

// ExecutablePath is the path smeshd's binary was started from, to be
// resolved when smeshd starts: the kernel's link text of /proc/self/exe,
// without the " (deleted)" it gets once a package upgrade replaced the
// file. os.Executable would open the old, deleted binary; the point of an
// upgrade is to start the new one at the same path.
func ExecutablePath() (string, error) {
	path, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return "", fmt.Errorf("finding smeshd's own binary: %w", err)
	}
	return strings.TrimSuffix(path, " (deleted)"), nil
}

// upgradeRequest is an upgrade asked for on the control socket; the
// daemon's loop answers on reply (buffered: the loop never waits).
type upgradeRequest struct {
	reply chan upgradeResult
}

// upgradeResult is the outcome of an upgrade: the successor's PID, or why
// it did not take over.
type upgradeResult struct {
	pid int
	err error
}

// upgrade is a successor this smeshd started and waits for.
type upgrade struct {
	cmd   *exec.Cmd
	pid   int
	reply chan upgradeResult
	// exited receives the successor's exit (cmd.Wait) should it end
	// before it took over; report, what it said about why.
	exited   chan error
	report   chan string
	deadline *time.Timer
}

// startSuccessor starts the binary at the path this smeshd was started
// from, with its arguments and environment, writing where this one writes.
func (d *daemon) startSuccessor(reply chan upgradeResult) (*upgrade, error) {
	if d.opts.Executable == "" {
		return nil, errors.New("this smeshd does not know the path of its binary, so it cannot start a successor")
	}
	if _, err := os.Stat(d.opts.Executable); err != nil {
		return nil, fmt.Errorf("no smeshd binary to start: %w (install the new binary at that path first)", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("starting the successor: %w", err)
	}
	cmd := exec.Command(d.opts.Executable, d.opts.Args...)
	// The successor is given what systemd gave this one (RUNTIME_DIRECTORY,
	// NOTIFY_SOCKET, WATCHDOG_USEC, ...) but what names this process:
	// sd_listen_fds and sd_watchdog_enabled would refuse variables meant for
	// another PID, and systemd passes no descriptors here.
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		switch name {
		case "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID", upgradeReportEnv:
			continue
		}
		cmd.Env = append(cmd.Env, kv)
	}
	cmd.Env = append(cmd.Env, upgradeReportEnv+"=3")
	cmd.ExtraFiles = []*os.File{w} // fd 3
	// The same stdout and stderr (the journal under systemd): files are
	// passed as they are, so the successor keeps writing there once this
	// one has exited.
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	// A session of its own: a signal to this one's process group (a
	// terminal's ^C, a kill of the group) does not reach the successor.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	w.Close() // the successor's copy is the only writer
	if err != nil {
		r.Close()
		return nil, fmt.Errorf("starting the successor %s: %w", d.opts.Executable, err)
	}
	u := &upgrade{cmd: cmd, pid: cmd.Process.Pid, reply: reply,
		exited: make(chan error, 1), report: make(chan string, 1), deadline: time.NewTimer(upgradeTimeout)}
	go func() {
		defer r.Close()
		data, _ := io.ReadAll(io.LimitReader(r, 4096))
		u.report <- strings.TrimSpace(string(data))
	}()
	go func() { u.exited <- cmd.Wait() }()
	d.log.Info().Int("successor", u.pid).Str("binary", d.opts.Executable).Msg("upgrade: started a successor; serving until it takes over")
	return u, nil
}

// failed is the answer for a successor that exited with err before it
// took over: its status and the reason it wrote, if any.
func (u *upgrade) failed(err error) error {
	status := "exited 0"
	if err != nil {
		status = err.Error() // "exit status 1", "signal: killed"
	}
	var reason string
	select {
	case reason = <-u.report:
	case <-time.After(time.Second): // a grandchild holds the pipe
	}
	msg := fmt.Sprintf("the successor (PID %d) did not take over: %s", u.pid, status)
	if reason != "" {
		msg += ": " + strings.ReplaceAll(reason, "\n", "; ")
	} else {
		msg += " (its reason is in its output: the journal under systemd)"
	}
	return errors.New(msg + "; this smeshd goes on serving")
}

// kill ends a successor that did not take over in time (by the PID this
// smeshd started) and waits for it.
func (u *upgrade) kill() {
	u.cmd.Process.Kill()
	select {
	case <-u.exited:
	case <-time.After(5 * time.Second):
	}
}

// The successor's end of the report pipe. It is taken out of the
// environment and made close-on-exec at once, so a later successor does
// not inherit it, and closed once smeshd is ready.
var upgradeReport struct {
	once sync.Once
	mu   sync.Mutex
	f    *os.File
}

func takeUpgradeReport() {
	upgradeReport.once.Do(func() {
		v, ok := os.LookupEnv(upgradeReportEnv)
		if !ok {
			return
		}
		os.Unsetenv(upgradeReportEnv)
		fd, err := strconv.Atoi(v)
		if err != nil || fd < 3 {
			return
		}
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			return // not open: started by hand with the variable set
		}
		unix.CloseOnExec(fd)
		upgradeReport.f = os.NewFile(uintptr(fd), "upgrade-report")
	})
}

// ReportStartFailure tells the smeshd that started this one by `smeshd
// upgrade` why this one could not start; it does nothing in a smeshd
// started otherwise.
func ReportStartFailure(err error) {
	takeUpgradeReport()
	upgradeReport.mu.Lock()
	defer upgradeReport.mu.Unlock()
	if f := upgradeReport.f; f != nil {
		w := bufio.NewWriter(f)
		w.WriteString(err.Error())
		w.Flush()
		f.Close()
		upgradeReport.f = nil
	}
}

// closeUpgradeReport closes the report pipe: this smeshd started.
func closeUpgradeReport() {
	takeUpgradeReport()
	upgradeReport.mu.Lock()
	defer upgradeReport.mu.Unlock()
	if upgradeReport.f != nil {
		upgradeReport.f.Close()
		upgradeReport.f = nil
	}
}
