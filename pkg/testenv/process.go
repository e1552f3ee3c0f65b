package testenv

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/sandbox"
)

// helperEnv tells a re-executed test binary which helper to run.
const helperEnv = "SMESH_TESTENV_HELPER"

// helperArgsSep separates the flags for the testing package from the
// helper's own arguments on the command line of a helper process.
const helperArgsSep = "--"

// unknownHelperExit is the exit code of a helper process asked for a helper
// that its TestMain did not pass to RunHelpers.
const unknownHelperExit = 125

// stopTimeout bounds how long Stop waits for a killed process to be reaped.
const stopTimeout = 5 * time.Second

// outputGrace bounds how long Wait waits, after the process exited, for its
// stdout and stderr to reach end of file.
const outputGrace = 2 * time.Second

// HelperFunc is the body of a helper process. It gets the arguments given to
// StartHelper; its result becomes the exit code of the process.
type HelperFunc func(args []string) int

// RunHelpers must be called by the TestMain of every test package that
// starts helpers, before m.Run. In the test process it returns at once. In a
// helper process (the test binary re-executed by StartHelper) it runs the
// requested helper from helpers and exits with its result; the tests of the
// package never run there.
//
// The table is passed in rather than registered in a package variable: the
// re-executed process starts from main with nothing but its environment and
// arguments, and TestMain is the one place every process of the binary runs
// through before any test, so it is where the names must resolve.
func RunHelpers(helpers map[string]HelperFunc) {
	name, ok := os.LookupEnv(helperEnv)
	if !ok {
		return
	}
	// Processes the helper starts itself are not helpers.
	os.Unsetenv(helperEnv)
	fn, ok := helpers[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "testenv: TestMain passed no helper named %q to RunHelpers\n", name)
		os.Exit(unknownHelperExit)
	}
	var args []string
	if i := slices.Index(os.Args, helperArgsSep); i >= 0 {
		args = os.Args[i+1:]
	}
	os.Exit(fn(args))
}

// Helper is a process started by StartHelper or StartProcess. Its stdout and
// stderr are captured; ReadLine consumes stdout line by line, Stdout and
// Stderr return everything captured so far.
type Helper struct {
	t      testing.TB
	name   string
	cmd    *exec.Cmd
	stdin  *os.File // write end of a helper's stdin, nil for other processes
	stdout *capture
	stderr *capture

	done    chan struct{} // closed when the process has been reaped
	waitErr error         // valid once done is closed
}

// StartHelper starts the helper name (see RunHelpers) in a new process: the
// test binary, re-executed. See StartProcess for cgroup and netnsName.
func StartHelper(t testing.TB, cgroup, netnsName, name string, args ...string) *Helper {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatalf("starting helper %s: %v", name, err)
	}
	// -test.run=^$: should TestMain not call RunHelpers, the process runs
	// no test (and the caller sees its stdout end) instead of running the
	// whole package again, recursively.
	cmd := exec.Command(exe, append([]string{"-test.run=^$", helperArgsSep}, args...)...)
	cmd.Env = append(os.Environ(), helperEnv+"="+name)
	// A pipe for Send; external programs keep the default stdin, since
	// some (socat, iperf3) behave differently with one.
	inR, inW, err := os.Pipe()
	if err != nil {
		t.Fatalf("starting helper %s: %v", name, err)
	}
	cmd.Stdin = inR
	h := start(t, cgroup, netnsName, "helper "+name, cmd)
	inR.Close()
	h.stdin = inW
	t.Cleanup(func() { inW.Close() })
	return h
}

// Send writes line and a newline to the stdin of a helper started with
// StartHelper, for helpers that take commands.
func (h *Helper) Send(line string) error {
	if h.stdin == nil {
		return fmt.Errorf("%s has no stdin to send to", h.name)
	}
	if _, err := h.stdin.WriteString(line + "\n"); err != nil {
		return fmt.Errorf("sending to %s: %w", h.name, err)
	}
	return nil
}

// StartHelperVia starts the helper name as StartHelper does, but through
// the command wrapper, which gets the helper's command line as its last
// arguments: e.g. {"ip", "netns", "exec", NODE} starts it the way people
// start a daemon in a network namespace. The wrapper is born in cgroup and
// in the test's own network namespace.
func StartHelperVia(t testing.TB, cgroup string, wrapper []string, name string, args ...string) *Helper {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatalf("starting helper %s: %v", name, err)
	}
	argv := slices.Concat(wrapper[1:], []string{exe, "-test.run=^$", helperArgsSep}, args)
	cmd := exec.Command(wrapper[0], argv...)
	cmd.Env = append(os.Environ(), helperEnv+"="+name)
	return start(t, cgroup, "", "helper "+name+" via "+wrapper[0], cmd)
}

// StartProcess starts the external program name with args (looked up in
// PATH), e.g. iperf3.
//
// cgroup is the path of a cgroup v2 directory the process is born in, or ""
// for the test's own cgroup. The process is cloned straight into it
// (clone3 with CLONE_INTO_CGROUP, Linux 5.7+), so it never runs an
// instruction outside it: no window in which a connect() escapes capture.
//
// netnsName is the name of a network namespace (Node.Name) to start the
// process in, or "" for the test's own. A new process inherits the network
// namespace of the thread that forks it, so the fork happens on a locked OS
// thread switched into the namespace for just that call.
//
// Cleanup SIGKILLs the process if it is still running and reaps it; if the
// test failed, it logs what the process wrote.
func StartProcess(t testing.TB, cgroup, netnsName, name string, args ...string) *Helper {
	t.Helper()
	return start(t, cgroup, netnsName, name, exec.Command(name, args...))
}

func start(t testing.TB, cgroup, netnsName, label string, cmd *exec.Cmd) *Helper {
	t.Helper()
	// Pipes of our own rather than cmd.StdoutPipe: Wait then waits for the
	// process only, not for readers, and output is kept after it exits.
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatalf("starting %s: %v", label, err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		t.Fatalf("starting %s: %v", label, err)
	}
	cmd.Stdout, cmd.Stderr = outW, errW

	// Dies with the test binary even if cleanup never runs (a crash, a
	// hard timeout): see sandbox.Start.
	err = sandbox.Start(cmd, cgroup, netnsName)
	// The child holds its own copies; ours would keep the readers from
	// ever seeing EOF.
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		t.Fatalf("starting %s: %v", label, err)
	}

	h := &Helper{
		t:      t,
		name:   label,
		cmd:    cmd,
		stdout: newCapture(outR),
		stderr: newCapture(errR),
		done:   make(chan struct{}),
	}
	go func() {
		err := cmd.Wait()
		// Let the readers drain what the process wrote before it exited,
		// so that Stdout and Stderr are complete once Wait returns. A
		// process it started in the background may hold the pipes open
		// for much longer: do not wait for that.
		// One grace for both: a timer's channel fires once, so waiting
		// on it for the second pipe would wait for the background process.
		grace := make(chan struct{})
		timer := time.AfterFunc(outputGrace, func() { close(grace) })
		defer timer.Stop()
		for _, c := range []*capture{h.stdout, h.stderr} {
			select {
			case <-c.closed:
			case <-grace:
			}
		}
		h.waitErr = err
		close(h.done)
	}()
	t.Cleanup(func() {
		h.Stop()
		if t.Failed() {
			t.Logf("%s (pid %d): %s\nstdout:\n%s\nstderr:\n%s",
				h.name, h.PID(), h.status(), tail(h.Stdout()), tail(h.Stderr()))
		}
	})
	return h
}

// PID returns the process ID.
func (h *Helper) PID() int {
	return h.cmd.Process.Pid
}

// ReadLine returns the next line the process writes to stdout, without the
// line end. It fails after timeout, and with an error wrapping io.EOF once
// stdout is closed (usually: the process exited) and every line was read.
func (h *Helper) ReadLine(timeout time.Duration) (string, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		line, ok, eof, changed := h.stdout.next()
		switch {
		case ok:
			return line, nil
		case eof:
			return "", fmt.Errorf("%s closed stdout: %w", h.name, io.EOF)
		}
		select {
		case <-changed:
		case <-timer.C:
			return "", fmt.Errorf("%s wrote no line to stdout within %v", h.name, timeout)
		}
	}
}

// Stdout returns everything the process has written to stdout so far,
// including the lines ReadLine returned.
func (h *Helper) Stdout() string { return h.stdout.String() }

// Stderr returns everything the process has written to stderr so far.
func (h *Helper) Stderr() string { return h.stderr.String() }

// Wait waits for the process to exit and returns its status as
// exec.Cmd.Wait does. By then Stdout and Stderr hold everything the process
// wrote, unless something it left running in the background keeps its
// stdout or stderr open: Wait gives up on that after 2s. It can be called
// any number of times.
func (h *Helper) Wait() error {
	<-h.done
	return h.waitErr
}

// status describes how the process ended, for logs.
func (h *Helper) status() string {
	select {
	case <-h.done:
		if h.waitErr == nil {
			return "exit status 0"
		}
		return h.waitErr.Error()
	default:
		return "still running"
	}
}

// Exited returns a channel that is closed once the process has exited.
func (h *Helper) Exited() <-chan struct{} { return h.done }

// Signal sends sig to the process, e.g. SIGTERM to test a graceful stop. It
// is a no-op once the process has exited.
func (h *Helper) Signal(sig os.Signal) error {
	select {
	case <-h.done:
		return nil
	default:
	}
	// os.Process signals through a pidfd: never a recycled PID.
	if err := h.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signalling %s: %w", h.name, err)
	}
	return nil
}

// Stop SIGKILLs the process if it is still running and waits until it has
// been reaped. It fails the test if the process does not go away.
func (h *Helper) Stop() {
	if err := h.Signal(syscall.SIGKILL); err != nil {
		h.t.Errorf("stopping %s: %v", h.name, err)
		return
	}
	select {
	case <-h.done:
	case <-time.After(stopTimeout):
		h.t.Errorf("stopping %s: pid %d still running %v after SIGKILL", h.name, h.PID(), stopTimeout)
	}
}

// capture collects one output stream of a process, keeping all of it and
// queueing complete lines for ReadLine. The reading goroutine never blocks on
// a consumer, so a chatty process cannot stall on a full pipe.
type capture struct {
	mu      sync.Mutex
	all     bytes.Buffer
	lines   []string
	eof     bool
	changed chan struct{} // closed and replaced whenever lines or eof change
	closed  chan struct{} // closed at end of file
}

func newCapture(r io.ReadCloser) *capture {
	c := &capture{changed: make(chan struct{}), closed: make(chan struct{})}
	go c.collect(r)
	return c
}

func (c *capture) collect(r io.ReadCloser) {
	defer close(c.closed)
	defer r.Close()
	br := bufio.NewReader(r)
	for {
		s, err := br.ReadString('\n')
		c.mu.Lock()
		c.all.WriteString(s)
		if s != "" {
			c.lines = append(c.lines, strings.TrimRight(s, "\r\n"))
		}
		if err != nil {
			c.eof = true
		}
		close(c.changed)
		c.changed = make(chan struct{})
		c.mu.Unlock()
		if err != nil {
			return
		}
	}
}

// next pops the oldest unread line. Without one, it returns whether the
// stream has ended and a channel that is closed on the next change.
func (c *capture) next() (line string, ok, eof bool, changed <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.lines) > 0 {
		line = c.lines[0]
		c.lines = c.lines[1:]
		return line, true, false, nil
	}
	return "", false, c.eof, c.changed
}

func (c *capture) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.all.String()
}

// tail keeps logs of failed tests readable when a process was chatty.
func tail(s string) string {
	const max = 4096
	if len(s) <= max {
		return s
	}
	return "[...]" + s[len(s)-max:]
}
