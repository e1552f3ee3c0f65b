package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/daemon"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// TestUpgrade: `smeshd upgrade` makes the running smeshd start the binary
// at its path (this test binary, which acts as smeshd through asSmeshd in
// the environment the successor inherits) with its arguments, and hand
// over to it. The command waits and prints the new PID; the successor
// stays in the predecessor's cgroup, writes where it wrote, serves
// (/readyz, the control socket) and the predecessor exits 0. An upgrade to
// a successor that cannot start (its configuration, which it reads anew,
// does not load) fails with the successor's exit status and reason, and
// the running smeshd serves on.
func TestUpgrade(t *testing.T) {
	w := newSmeshdWorld(t)
	exe, node, smeshCg, runtime, path, conf := w.exe, w.node, w.smeshCg, w.runtime, w.path, w.conf
	first := testenv.StartProcess(t, smeshCg, node.Name, exe, "-c", path)
	waitStderr(t, first, "smeshd ready", 1)

	var out, errOut bytes.Buffer
	if err := run(context.Background(), []string{"upgrade", "-timeout", "60s"}, &out, &errOut, nil); err != nil {
		t.Fatalf("smeshd upgrade: %v\n%s", err, first.Stderr())
	}
	m := regexp.MustCompile(`upgraded: PID (\d+) serves now`).FindStringSubmatch(out.String())
	if m == nil {
		t.Fatalf("smeshd upgrade printed %q, want the new PID", out.String())
	}
	pid, _ := strconv.Atoi(m[1])
	// Not this test's child: stopped by the PID the upgrade reported.
	t.Cleanup(func() { stopPID(t, pid) })
	if pid == first.PID() || !alive(pid) {
		t.Fatalf("the upgrade reported PID %d (the predecessor is %d): not a running successor", pid, first.PID())
	}

	// The predecessor drains (nothing to drain here) and exits 0.
	select {
	case <-first.Exited():
	case <-time.After(20 * time.Second):
		t.Fatalf("the predecessor did not exit after the upgrade:\n%s", first.Stderr())
	}
	if err := first.Wait(); err != nil {
		t.Errorf("the predecessor exited with %v", err)
	}
	// The successor writes where its predecessor wrote (the journal under
	// systemd), was started with the same arguments, and stayed in the
	// predecessor's cgroup: smeshd's own, shared with smeshd only.
	if !strings.Contains(first.Stderr(), "took over: the predecessor released everything") {
		t.Errorf("the successor's log is not where the predecessor's went:\n%s", first.Stderr())
	}
	if cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); string(cmdline) != exe+"\x00-c\x00"+path+"\x00" {
		t.Errorf("the successor runs %q, want %s -c %s", cmdline, exe, path)
	}
	if cg, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid)); !strings.Contains(string(cg), "::/"+filepath.Base(smeshCg)+"\n") {
		t.Errorf("the successor is in cgroup %q, want the predecessor's %s", cg, smeshCg)
	}

	// The predecessor is gone: what answers is the successor.
	if status := readyzIn(t, node); !strings.Contains(status, " 200 ") {
		t.Errorf("/readyz after the upgrade: %q", status)
	}
	if err := daemon.Reload(filepath.Join(runtime, daemon.ControlSocketName), 10*time.Second); err != nil {
		t.Errorf("reloading the successor over the control socket: %v", err)
	}

	// An upgrade whose successor cannot start.
	if err := os.WriteFile(path, []byte(conf+"[bogus]\nkey = 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	err := run(context.Background(), []string{"upgrade", "-timeout", "60s"}, &out, &errOut, nil)
	if err == nil {
		t.Fatalf("an upgrade to a successor whose configuration does not load succeeded: %s", out.String())
	}
	t.Logf("the failed upgrade: %v", err)
	for _, want := range []string{"did not take over", "exit status 1", "unknown key bogus", "goes on serving"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("the failed upgrade's error lacks %q: %v", want, err)
		}
	}
	if !alive(pid) {
		t.Fatal("the running smeshd exited after a failed upgrade")
	}
	if status := readyzIn(t, node); !strings.Contains(status, " 200 ") {
		t.Errorf("/readyz after the failed upgrade: %q", status)
	}
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := daemon.Reload(filepath.Join(runtime, daemon.ControlSocketName), 10*time.Second); err != nil {
		t.Errorf("reloading the running smeshd after the failed upgrade: %v", err)
	}
}

// readyzIn is the status line of the admin's /readyz in node's namespace.
func readyzIn(t *testing.T, node *testenv.Node) string {
	t.Helper()
	var status string
	if err := node.Do(func() (err error) {
		status, err = readyz()
		return err
	}); err != nil {
		t.Fatalf("smeshd's admin: %v", err)
	}
	return status
}

// alive says whether process pid runs (a zombie does not).
func alive(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// "PID (COMM) STATE ...": COMM may hold spaces and parentheses.
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
	return len(fields) > 0 && fields[0] != "Z"
}

// stopPID stops a process this test did not start itself but knows by
// PID (a successor started by smeshd): SIGTERM, then SIGKILL.
func stopPID(t *testing.T, pid int) {
	if !alive(pid) {
		return
	}
	syscall.Kill(pid, syscall.SIGTERM)
	for deadline := time.Now().Add(15 * time.Second); alive(pid); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Errorf("smeshd PID %d did not stop on SIGTERM: killing it", pid)
			syscall.Kill(pid, syscall.SIGKILL)
			return
		}
	}
}
