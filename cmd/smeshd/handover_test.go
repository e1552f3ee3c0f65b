package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/daemon"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// TestHandoverFailedStart: a second smeshd started while one runs, with
// the same RUNTIME_DIRECTORY, takes the running one's listeners and data
// path over (handover.sock) before it listens anywhere of its own. When it
// cannot use them (here its capture.on_failure is "closed" while the
// running one's is "open": it pins its maps, and the running one's, which
// it was handed, are not the pinned ones; two sets at once would capture
// twice), it gives up before it says ready, saying why and what to do, and
// the running one goes on serving as if nothing happened: its admin
// answers, its control socket reloads, SIGTERM stops it cleanly. (A
// changed map_size used to be the trigger: such a hand-over now succeeds,
// TestHandoverMapSizeChanged.)
func TestHandoverFailedStart(t *testing.T) {
	w := newSmeshdWorld(t)
	exe, node, smeshCg, runtime, path, conf := w.exe, w.node, w.smeshCg, w.runtime, w.path, w.conf
	bpffs := t.TempDir()
	if err := syscall.Mount("bpf", bpffs, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mounting a bpffs for the test: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(bpffs, syscall.MNT_DETACH) })
	other := filepath.Join(t.TempDir(), "smesh.toml")
	closed := strings.Replace(conf, "[capture]\n", fmt.Sprintf("[capture]\non_failure = \"closed\"\npin_dir = %q\n", filepath.Join(bpffs, "smesh")), 1)
	if err := os.WriteFile(other, []byte(closed), 0o644); err != nil {
		t.Fatal(err)
	}
	first := testenv.StartProcess(t, smeshCg, node.Name, exe, "-c", path)
	waitStderr(t, first, "smeshd ready", 1)
	if _, err := os.Stat(filepath.Join(runtime, daemon.HandoverSocketName)); err != nil {
		t.Fatalf("the running smeshd serves no hand-over socket: %v", err)
	}

	// Meanwhile /readyz is asked without pause: every answer must be the
	// first one's (200). The second takes the admin listener with the rest
	// but accepts nothing before the first released it, which it never
	// does here: an answer of its own (503, not ready) or a connection cut
	// by its exit would show.
	second := testenv.StartProcess(t, smeshCg, node.Name, exe, "-c", other)
	asked, bad := 0, []string{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		node.Do(func() error {
			for {
				select {
				case <-second.Exited():
					return nil
				default:
				}
				asked++
				if status, err := readyz(); err != nil || !strings.Contains(status, " 200 ") {
					bad = append(bad, fmt.Sprintf("%q %v", status, err))
				}
			}
		})
	}()
	select {
	case <-second.Exited():
	case <-time.After(30 * time.Second):
		t.Fatal("the second smeshd neither took over nor gave up")
	}
	<-done
	if asked == 0 || len(bad) > 0 {
		t.Errorf("/readyz asked %d times while the second smeshd tried to take over; not the first one's 200: %d, e.g. %v", asked, len(bad), bad[:min(len(bad), 3)])
	}
	if err := second.Wait(); err == nil {
		t.Error("the second smeshd exited 0 without taking over")
	}
	if errOut := second.Stderr(); !strings.Contains(errOut, "failed, it goes on serving") ||
		!strings.Contains(errOut, "did capture.on_failure change?") || !strings.Contains(errOut, "stop the running smeshd, then start this one") {
		t.Errorf("the second smeshd's error does not say that and why the hand-over failed, and what to do:\n%s", errOut)
	}
	waitStderr(t, first, "the successor did not take over: going on serving", 1)
	if ents, err := os.ReadDir(filepath.Join(bpffs, "smesh")); err == nil && len(ents) > 0 {
		t.Errorf("the failed start left %d pins behind", len(ents))
	}

	// The first one serves on: its admin says ready, its control socket
	// reloads, and it stops as always.
	select {
	case <-first.Exited():
		t.Fatalf("the running smeshd exited (%v)", first.Wait())
	default:
	}
	status := readyzIn(t, node)
	if !strings.Contains(status, " 200 ") {
		t.Errorf("the running smeshd's /readyz after the failed hand-over: %q", status)
	}
	if err := daemon.Reload(filepath.Join(runtime, daemon.ControlSocketName), 10*time.Second); err != nil {
		t.Errorf("reloading the running smeshd after the failed hand-over: %v", err)
	}
	if err := first.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := first.Wait(); err != nil {
		t.Errorf("smeshd exit: %v", err)
	}
}

// readyz asks smeshd's admin (in the calling thread's namespace) for
// /readyz and returns the status line.
func readyz() (string, error) {
	c, err := net.DialTimeout("tcp4", "127.0.0.1:15000", 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "GET /readyz HTTP/1.0\r\n\r\n"); err != nil {
		return "", err
	}
	return bufio.NewReader(c).ReadString('\n')
}

// smeshdWorld is what a test runs a real smeshd in: this test binary acting
// as smeshd (asSmeshd), a RUNTIME_DIRECTORY, a test network namespace,
// smeshd's cgroup and an enrolled one, and a configuration file that
// enrolls it (conf, at path) with the tunnel's TLS off.
type smeshdWorld struct {
	exe, runtime, smeshCg, enrolled, path, conf string
	node                                        *testenv.Node
}

func newSmeshdWorld(t *testing.T) smeshdWorld {
	t.Helper()
	testenv.RequirePrivileged(t)
	t.Setenv(asSmeshd, "1")
	w := smeshdWorld{runtime: t.TempDir()}
	t.Setenv("RUNTIME_DIRECTORY", w.runtime)
	var err error
	if w.exe, err = os.Executable(); err != nil {
		t.Fatal(err)
	}
	w.node, w.smeshCg, w.enrolled = testenv.NewNode(t), testenv.NewCgroup(t), testenv.NewCgroup(t)
	mount, err := testenv.Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	rel, err := filepath.Rel(mount, w.enrolled)
	if err != nil {
		t.Fatal(err)
	}
	w.conf = fmt.Sprintf("[capture]\ncgroups = [%q]\n[log]\nformat = \"json\"\n[tunnel.tls]\nmode = \"disabled\"\n", rel)
	w.path = filepath.Join(t.TempDir(), "smesh.toml")
	if err := os.WriteFile(w.path, []byte(w.conf), 0o644); err != nil {
		t.Fatal(err)
	}
	return w
}

// echoServer serves echoes on 127.0.0.1 in w's node namespace and returns
// its address.
func (w smeshdWorld) echoServer(t *testing.T) string {
	t.Helper()
	var ln net.Listener
	if err := w.node.Do(func() (err error) {
		ln, err = net.Listen("tcp4", "127.0.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

// echoLoop exchanges checked echoes with addr from w's enrolled cgroup,
// one connection after another, until the function it returns is called:
// that fails t unless some went through and none failed.
func (w smeshdWorld) echoLoop(t *testing.T, addr string) func() {
	t.Helper()
	loop := testenv.StartHelper(t, w.enrolled, w.node.Name, "echo-loop", addr)
	return func() {
		t.Helper()
		if err := loop.Send("stop"); err != nil {
			t.Fatal(err)
		}
		line, err := loop.ReadLine(30 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var ok, failed int
		if _, err := fmt.Sscanf(line, "ok %d failed %d", &ok, &failed); err != nil {
			t.Fatalf("echo loop said %q", line)
		}
		t.Logf("%d exchanges through the mesh, %d failed", ok, failed)
		if ok == 0 || failed != 0 {
			t.Errorf("%d exchanges, %d failed (%.800s); want none failed", ok, failed, loop.Stderr())
		}
	}
}
