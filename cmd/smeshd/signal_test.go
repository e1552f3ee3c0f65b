package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/certs"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// waitStderr waits until p's stderr has n lines containing s.
func waitStderr(t *testing.T, p *testenv.Helper, s string, n int) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for strings.Count(p.Stderr(), s) < n {
		select {
		case <-p.Exited():
			t.Fatalf("smeshd exited (%v) before logging %q:\n%s", p.Wait(), s, p.Stderr())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("smeshd did not log %q:\n%s", s, p.Stderr())
		}
	}
}

// TestSIGHUPWhileStarting: `systemctl reload` right after start, before
// smeshd is ready, used to kill it (SIGHUP's default action; exit status
// 129). Now the real smeshd binary (this test binary, run as smeshd) keeps
// starting, and applies the reload once ready. Start-up is held at a known
// point: the CA file is a named pipe, which smeshd reads after its admin
// endpoint is up and before anything is attached.
func TestSIGHUPWhileStarting(t *testing.T) {
	testenv.RequirePrivileged(t)
	t.Setenv(asSmeshd, "1")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	node, smeshCg, enrolled := testenv.NewNode(t), testenv.NewCgroup(t), testenv.NewCgroup(t)
	mount, err := testenv.Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	rel, _ := filepath.Rel(mount, enrolled)
	dir := t.TempDir()
	if _, err := certs.Init(dir, []string{"n"}, certs.DefaultTrustDomain); err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(t.TempDir(), "ca.crt")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { // lets the writer below return should smeshd be gone
		if fd, err := unix.Open(fifo, unix.O_RDONLY|unix.O_NONBLOCK, 0); err == nil {
			unix.Close(fd)
		}
	})
	conf := func(extra string) string {
		return fmt.Sprintf("[capture]\ncgroups = [%q]\n%s\n[log]\nformat = \"json\"\n[tunnel.tls]\ncert = %q\nkey = %q\nca = %q\n",
			rel, extra, filepath.Join(dir, "n.crt"), filepath.Join(dir, "n.key"), fifo)
	}
	path := filepath.Join(t.TempDir(), "smesh.toml")
	if err := os.WriteFile(path, []byte(conf("")), 0o644); err != nil {
		t.Fatal(err)
	}
	p := testenv.StartProcess(t, smeshCg, node.Name, exe, "-c", path)
	waitStderr(t, p, "admin server listening", 1)

	// Reloads while starting, with a changed file: several are one.
	if err := os.WriteFile(path, []byte(conf("exclude_ports = [22]")), 0o644); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if err := p.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(200 * time.Millisecond)
	select {
	case <-p.Exited():
		t.Fatalf("SIGHUP while starting ended smeshd (%v):\n%s", p.Wait(), p.Stderr())
	default:
	}
	if strings.Contains(p.Stderr(), "smeshd ready") {
		t.Fatal("smeshd got ready without its CA: the test does not hold start-up")
	}
	wrote := make(chan error, 1)
	go func() { wrote <- os.WriteFile(fifo, caPEM, 0) }()
	waitStderr(t, p, "smeshd ready", 1)
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	waitStderr(t, p, "configuration reloaded", 1)
	log := p.Stderr()
	if strings.Index(log, "configuration reloaded") < strings.Index(log, "smeshd ready") {
		t.Error("the reload was applied before smeshd was ready")
	}
	if !strings.Contains(log, "while smeshd started") {
		t.Error("the log does not say the reload was asked for while smeshd started")
	}
	time.Sleep(200 * time.Millisecond)
	if n := strings.Count(p.Stderr(), "configuration reloaded"); n != 1 {
		t.Errorf("%d reloads for three SIGHUPs while starting, want 1", n)
	}

	// And once ready, SIGHUP reloads as always; SIGTERM stops it cleanly.
	if err := p.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitStderr(t, p, "configuration reloaded", 2)
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := p.Wait(); err != nil {
		t.Errorf("smeshd exit: %v\n%s", err, p.Stderr())
	}
}
