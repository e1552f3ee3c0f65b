package deploy

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// TestSystemd installs smeshd as the README says in a Debian 12 container
// booted with systemd 252 as PID 1, and checks what the unit promises
// (README, "Running under systemd"), each defect of issue 13 included.
// The subtests share the container and run in order; each leaves smeshd
// running with the installed configuration.
func TestSystemd(t *testing.T) {
	testenv.RequirePrivileged(t)
	t.Parallel() // with TestSystemdNotifyReload: a container each
	start := time.Now()
	rootfs := bookwormRootfs(t)
	src := sourceTree(t)
	bpffs := testBPFFS(t)
	c := bootContainer(t, rootfs, "--bind-ro="+src+":/root/smesh", "--bind="+bpffs+":/sys/fs/bpf")
	s := &systemd{container: c}
	c.diagnose = func() string { return "smeshd's journal:\n" + tail(s.journal(), 25) }

	t.Run("README install", func(t *testing.T) { c.t = t; s.install(t) })
	c.t = t
	if t.Failed() {
		t.Fatalf("smeshd is not installed; journal:\n%s", s.journal())
	}
	for _, step := range []struct {
		name string
		fn   func(t *testing.T)
	}{
		{"ready", s.checkReady},
		{"journal without colours", s.checkJournal},
		{"splice of an enrolled scope", s.checkSplice},
		{"reload", s.checkReload},
		{"stop smesh.slice", s.checkSliceStop},
		{"watchdog", s.checkWatchdog},
		{"restarts and SIGKILL", s.checkRestarts},
		{"on_failure closed", s.checkClosed},
		{"restarts on_failure closed", s.checkRestartsClosed},
		{"drain on stop", s.checkDrain},
		{"capabilities", s.checkCapabilities},
		{"upgrade", s.checkUpgrade},
		{"stop", s.checkStop},
	} {
		t.Run(step.name, func(t *testing.T) {
			c.t = t
			step.fn(t)
		})
	}
	c.t = t
	t.Logf("TestSystemd took %v", time.Since(start).Round(time.Second))
}

// TestSystemdNotifyReload installs smeshd as the README says on systemd
// 254 (bookworm-backports), with the README's drop-in for systemd 253 and
// later: Type=notify-reload, reloads driven by systemd's SIGHUP and
// smeshd's RELOADING=1 with MONOTONIC_USEC.
func TestSystemdNotifyReload(t *testing.T) {
	testenv.RequirePrivileged(t)
	t.Parallel()
	rootfs := backportsRootfs(t)
	src := sourceTree(t)
	c := bootContainer(t, rootfs, "--bind-ro="+src+":/root/smesh")
	s := &systemd{container: c}
	c.diagnose = func() string { return "smeshd's journal:\n" + tail(s.journal(), 25) }
	blocks := readmeBlocks(t)
	if blocks[0][0] != "make build" {
		t.Fatalf("the README's install steps begin with %q, want \"make build\"", blocks[0][0])
	}
	s.runREADME(append(blocks[0][1:], blocks[1]...))
	if got := s.show("smeshd", "Type"); got != "notify-reload" {
		t.Fatalf("smeshd.service is Type=%s after the README's steps for systemd 253+, want notify-reload", got)
	}
	if got := s.show("smeshd", "ActiveState"); got != "active" {
		t.Fatalf("smeshd is %s", got)
	}
	t.Run("reload waits", func(t *testing.T) { c.t = t; s.checkReloadWaits() })
	t.Run("rejected reload", func(t *testing.T) { c.t = t; s.checkRejectedReload(false) })
	// The master/worker restart on 254 too, where systemd sends the
	// reload's SIGHUP to the master, which forwards it.
	t.Run("restarts and SIGKILL", func(t *testing.T) { c.t = t; s.checkRestarts(t) })
	t.Run("reload after restarts", func(t *testing.T) { c.t = t; s.checkReloadWaits() })
	c.t = t
	s.sh("systemctl stop smeshd")
	if r := s.show("smeshd", "Result"); r != "success" {
		t.Errorf("smeshd stopped with result %s", r)
	}
}

// systemd is the state the subtests share.
type systemd struct {
	*container
	// smallSum and blobSum are the SHA-256 of /srv/small and /srv/blob,
	// what the web server serves.
	smallSum, blobSum string
}

const (
	// smallSize is the size of the file the splice checks download: less
	// than splice_queue_limit (2 MiB), so that a spliced hop never hits the
	// bound, which would move the rest of it to TCP (bounded splice).
	smallSize = 1_500_000
	// blobSize is the size of the file the drain check downloads: 6 s at
	// 1 MB/s.
	blobSize = 6_000_000
)

const (
	configPath = "/etc/smesh/smesh.toml"
	sliceDir   = "/sys/fs/cgroup/smesh.slice"
	// dropIns is where the checks put their runtime drop-ins (gone at the
	// container's next boot, removed by each check).
	dropIns = "/run/systemd/system/smeshd.service.d"
)

// sourceTree lays out what the README's steps read, as in a checkout:
// bin/smeshd (built like `make build`), smesh.toml and deploy/.
func sourceTree(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	// make test passes the go it found in GO (sudo's PATH may lack it).
	gobin := os.Getenv("GO")
	if gobin == "" {
		var err error
		if gobin, err = exec.LookPath("go"); err != nil {
			gobin = filepath.Join(runtime.GOROOT(), "bin", "go")
		}
	}
	// What `make build` runs; static, as the container's libc is not
	// necessarily the host's.
	build := exec.Command(gobin, "build", "-ldflags", "-X main.version=systemd-test", "-o", filepath.Join(dir, "bin", "smeshd"), "./cmd/smeshd")
	build.Dir = ".."
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building smeshd: %v\n%s", err, out)
	}
	for _, f := range []string{"smesh.toml", "deploy/smeshd.service", "deploy/smesh.slice", "deploy/smeshd.service.d/notify-reload.conf"} {
		data, err := os.ReadFile(filepath.Join("..", f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, f)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// testBPFFS mounts a bpffs of the test's own (a new instance), to be the
// container's /sys/fs/bpf.
func testBPFFS(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mounting a bpffs for the container: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmounting the container's bpffs: %v", err)
		}
	})
	return dir
}

// readmeBlocks returns the shell blocks of the README's section "Running
// under systemd", in order.
func readmeBlocks(t *testing.T) [][]string {
	t.Helper()
	data, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(data), "\n## Running under systemd\n")
	if !ok {
		t.Fatal("README.md has no section \"Running under systemd\"")
	}
	section, _, _ = strings.Cut(section, "\n## ")
	var blocks [][]string
	var cur []string
	in := false
	for line := range strings.Lines(section) {
		line = strings.TrimRight(line, "\n")
		switch {
		case !in && line == "```sh":
			in, cur = true, nil
		case in && line == "```":
			in = false
			blocks = append(blocks, cur)
		case in:
			cur = append(cur, line)
		}
	}
	if len(blocks) < 2 {
		t.Fatalf("README.md, \"Running under systemd\": %d shell blocks, want the install steps and the notify-reload ones", len(blocks))
	}
	return blocks
}

// runREADME runs the lines of a README block in the container, verbatim,
// from /root/smesh (the tree sourceTree made). The container's shell is
// root and has no sudo: a shim runs sudo's command as it is.
func (s *systemd) runREADME(lines []string) {
	s.t.Helper()
	s.sh(`[ -x /usr/local/bin/sudo ] || { printf '#!/bin/sh\nexec "$@"\n' > /usr/local/bin/sudo; chmod 755 /usr/local/bin/sudo; }`)
	script := "cd /root/smesh\n" + strings.Join(lines, "\n")
	out, err := s.exec(commandTimeout, "/bin/sh", "-exc", script)
	s.t.Logf("README steps:\n%s", out)
	if err != nil {
		s.t.Fatalf("the README's steps failed: %v\n%s", err, s.journal())
	}
}

func (s *systemd) install(t *testing.T) {
	steps := readmeBlocks(t)[0]
	// The first step builds bin/smeshd, which sourceTree did.
	if len(steps) == 0 || steps[0] != "make build" {
		t.Fatalf("the README's install steps begin with %q, want \"make build\"", steps)
	}
	s.runREADME(steps[1:])
	for unit, want := range map[string]string{"smeshd": "active", "smesh.slice": "active"} {
		if got := s.show(unit, "ActiveState"); got != want {
			t.Errorf("%s is %s after the README's steps, want %s", unit, got, want)
		}
	}
	if got := s.show("smeshd", "UnitFileState"); got != "enabled" {
		t.Errorf("smeshd is %s, want enabled", got)
	}
}

// checkReady: `systemctl start` returned once smeshd was ready: /readyz says
// so at once, the capture is on smesh.slice, and smeshd created no cgroup.
func (s *systemd) checkReady(t *testing.T) {
	// A fresh start: its job returns on READY=1.
	s.sh("systemctl restart smeshd")
	if code, body := s.admin("/readyz"); code != 200 {
		t.Errorf("/readyz right after systemctl restart returned: %d %q", code, body)
	}
	for _, typ := range []ebpf.AttachType{ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupSockOps} {
		if n := s.attached(sliceDir, typ); n != 1 {
			t.Errorf("%d %s programs on smesh.slice, want 1", n, typ)
		}
	}
	j := s.journal()
	if !strings.Contains(j, "smeshd ready") {
		t.Errorf("no \"smeshd ready\" in the journal:\n%s", j)
	}
	if strings.Contains(j, "created enrolled cgroup") {
		t.Error("smeshd created an enrolled cgroup under systemd")
	}
}

// checkJournal: no escape sequences, every message a string.
func (s *systemd) checkJournal(t *testing.T) {
	out := s.sh("journalctl -u smeshd -o json --no-pager _COMM=smeshd")
	n := 0
	for line := range strings.Lines(out) {
		var entry map[string]any
		if err := json.Unmarshal([]byte(line), &entry); err != nil {
			t.Fatalf("journal entry %q: %v", line, err)
		}
		msg, ok := entry["MESSAGE"].(string)
		if !ok {
			t.Errorf("a journal message is stored as %T, not text: %v", entry["MESSAGE"], entry["MESSAGE"])
			continue
		}
		if strings.Contains(msg, "\x1b[") {
			t.Errorf("escape sequence in the journal: %q", msg)
		}
		n++
	}
	if n < 5 {
		t.Errorf("only %d messages of smeshd in the journal", n)
	}
}

// startWeb serves /srv/blob from a service in smesh.slice (enrolled), on
// 127.0.0.1:8080. Starting a unit in the slice starts the slice.
func (s *systemd) startWeb(unit string) {
	s.t.Helper()
	if s.blobSum == "" {
		out := s.sh(fmt.Sprintf("mkdir -p /srv && head -c %d /dev/urandom > /srv/small && head -c %d /dev/urandom > /srv/blob && sha256sum /srv/small /srv/blob", smallSize, blobSize))
		sums := strings.Fields(out)
		s.smallSum, s.blobSum = sums[0], sums[2]
	}
	s.sh("systemctl stop 'smesh-test-web*' 2>/dev/null || true")
	s.sh("systemd-run --quiet --unit=" + unit + " --slice=smesh.slice -p WorkingDirectory=/srv python3 -m http.server --bind 127.0.0.1 8080")
	// Polled from outside the mesh (this shell is not enrolled).
	s.sh("for i in $(seq 100); do curl -fsS -o /dev/null http://127.0.0.1:8080/ && exit 0; sleep 0.1; done; exit 1")
}

// download fetches /srv/small from a scope in smesh.slice and checks every
// byte.
func (s *systemd) download() {
	s.t.Helper()
	out := s.sh("systemd-run --quiet --slice=smesh.slice --scope sh -c 'curl -fsS http://127.0.0.1:8080/small | sha256sum'")
	if got := strings.Fields(out); len(got) == 0 || got[0] != s.smallSum {
		s.t.Errorf("downloaded file: sha256 %q, want %s", out, s.smallSum)
	}
}

func (s *systemd) splicedBytes() float64 {
	return s.metric("smesh_bytes_total", map[string]string{"path": "splice", "direction": "tx"}) +
		s.metric("smesh_bytes_total", map[string]string{"path": "splice", "direction": "rx"})
}

// checkSplice: a scope started with systemd-run --slice=smesh.slice --scope
// talks to a server in the slice over a spliced connection, every byte
// intact.
func (s *systemd) checkSplice(t *testing.T) {
	s.startWeb("smesh-test-web")
	before := s.splicedBytes()
	s.download()
	if got := s.splicedBytes() - before; got < smallSize {
		t.Errorf("%v bytes spliced for a %d-byte download", got, smallSize)
	}
}

// checkReload: `systemctl reload` returns once the reload is done, and a
// rejected file makes it fail, with the reason in the journal and the
// status, and changes nothing.
func (s *systemd) checkReload(t *testing.T) {
	s.sh("cp " + configPath + " /root/smesh.toml.good")
	defer s.sh("cp /root/smesh.toml.good " + configPath + " && systemctl reload smeshd")
	ok := s.metric("smesh_config_reloads_total", map[string]string{"result": "ok"})
	for i := 1; i <= 5; i++ {
		s.sh(fmt.Sprintf(`sed -i 's/^exclude_ports = .*/exclude_ports = [%d]/' %s && systemctl reload smeshd`, 40000+i, configPath))
		if got := s.metric("smesh_config_reloads_total", map[string]string{"result": "ok"}); got != ok+float64(i) {
			t.Fatalf("after reload %d returned, smesh_config_reloads_total{result=ok} = %v, want %v", i, got, ok+float64(i))
		}
	}
	s.checkReloadWaits()
	s.checkRejectedReload(true)
}

// checkReloadWaits: `systemctl reload` has not returned while smeshd is
// still reading its file (a named pipe it blocks on), and returns once it
// did.
func (s *systemd) checkReloadWaits() {
	t := s.t
	t.Helper()
	ok := s.metric("smesh_config_reloads_total", map[string]string{"result": "ok"})
	s.sh("cp " + configPath + " /root/smesh.toml.fifo && rm " + configPath + " && mkfifo -m 0644 " + configPath)
	defer s.sh("rm -f " + configPath + " && cp /root/smesh.toml.fifo " + configPath)
	s.sh("rm -f /run/smesh-test-reload.rc && systemd-run --quiet --collect --unit=smesh-test-reload sh -c 'systemctl reload smeshd; echo $? > /run/smesh-test-reload.rc'")
	time.Sleep(time.Second)
	if _, done := s.try("test -e /run/smesh-test-reload.rc"); done {
		t.Fatal("systemctl reload returned while smeshd was still reading its configuration")
	}
	// Opens the pipe for smeshd to read, then the reload goes on.
	s.sh("timeout 10 sh -c 'cat /root/smesh.toml.fifo > " + configPath + "'")
	s.waitFor("systemctl reload to return", func() bool { _, done := s.try("test -e /run/smesh-test-reload.rc"); return done })
	if rc := strings.TrimSpace(s.sh("cat /run/smesh-test-reload.rc")); rc != "0" {
		t.Errorf("systemctl reload exited with %s", rc)
	}
	if got := s.metric("smesh_config_reloads_total", map[string]string{"result": "ok"}); got != ok+1 {
		t.Errorf("smesh_config_reloads_total{result=ok} = %v, want %v", got, ok+1)
	}
}

// checkRejectedReload: a file smeshd rejects changes nothing; the reason is
// in the journal and systemd's status; with the unit's ExecReload,
// `systemctl reload` fails (wantFail), with Type=notify-reload it cannot.
func (s *systemd) checkRejectedReload(wantFail bool) {
	t := s.t
	t.Helper()
	pid := s.show("smeshd", "MainPID")
	errs := s.metric("smesh_config_reloads_total", map[string]string{"result": "error"})
	s.sh("cp " + configPath + " /root/smesh.toml.bad && printf '\\n[bogus]\\nkey = 1\\n' >> /root/smesh.toml.bad")
	s.sh("cp " + configPath + " /root/smesh.toml.before && cp /root/smesh.toml.bad " + configPath)
	defer s.sh("cp /root/smesh.toml.before " + configPath)
	out, ok := s.try("systemctl reload smeshd")
	t.Logf("systemctl reload of a bad file: exit ok %v: %s", ok, strings.TrimSpace(out))
	if ok == wantFail {
		if wantFail {
			t.Error("systemctl reload of a file smeshd rejects succeeded")
		} else {
			t.Error("systemctl reload of a rejected file failed with Type=notify-reload: the README says it cannot; update it")
		}
	}
	if got := s.metric("smesh_config_reloads_total", map[string]string{"result": "error"}); got != errs+1 {
		t.Errorf("smesh_config_reloads_total{result=error} = %v, want %v", got, errs+1)
	}
	if j := s.journal(); !strings.Contains(j, "configuration rejected") || !strings.Contains(j, "unknown key bogus") {
		t.Errorf("the journal does not say why the reload was rejected:\n%s", tail(j, 10))
	}
	if st := s.show("smeshd", "StatusText"); !strings.Contains(st, "unknown key bogus") {
		t.Errorf("systemctl status says %q, want the reason of the rejection", st)
	}
	if got := s.show("smeshd", "ActiveState"); got != "active" || s.show("smeshd", "MainPID") != pid {
		t.Errorf("after a rejected reload smeshd is %s with PID %s, want active with PID %s", got, s.show("smeshd", "MainPID"), pid)
	}
}

// checkSliceStop: `systemctl stop smesh.slice` removes the slice's cgroup;
// smeshd stays up and says so; it creates no cgroup, not even on a reload;
// when the slice starts again, capture and splice are back.
func (s *systemd) checkSliceStop(t *testing.T) {
	pid := s.show("smeshd", "MainPID")
	removed := s.metric("smesh_enrolled_cgroup_events_total", map[string]string{"event": "removed"})
	created := s.metric("smesh_enrolled_cgroup_events_total", map[string]string{"event": "created"})
	s.sh("systemctl stop smesh.slice")
	s.waitFor("/readyz 503 naming smesh.slice", func() bool {
		code, body := s.admin("/readyz")
		return code == 503 && strings.Contains(body, sliceDir)
	})
	if s.show("smeshd", "ActiveState") != "active" || s.show("smeshd", "MainPID") != pid {
		t.Error("smeshd did not stay up when smesh.slice stopped")
	}
	if got := s.metric("smesh_enrolled_cgroups", map[string]string{"state": "missing"}); got != 1 {
		t.Errorf("smesh_enrolled_cgroups{state=missing} = %v, want 1", got)
	}
	if got := s.metric("smesh_enrolled_cgroup_events_total", map[string]string{"event": "removed"}); got != removed+1 {
		t.Errorf("smesh_enrolled_cgroup_events_total{event=removed} = %v, want %v", got, removed+1)
	}
	if st := s.show("smeshd", "StatusText"); !strings.Contains(st, sliceDir) {
		t.Errorf("systemctl status says %q, want the missing slice", st)
	}
	if !strings.Contains(s.journal(), "enrolled cgroup removed") {
		t.Error("smeshd did not log the removal")
	}
	// A reload (which enrols again) must not create it either.
	s.sh("systemctl reload smeshd")
	if _, err := os.Stat(s.hostCgroup(sliceDir)); err == nil {
		t.Errorf("%s exists while smesh.slice is stopped: smeshd created it", sliceDir)
	}
	if got := s.show("smesh.slice", "ActiveState"); got != "inactive" {
		t.Errorf("smesh.slice is %s, want inactive", got)
	}

	s.startWeb("smesh-test-web2") // starts the slice
	s.waitFor("/readyz 200 again", func() bool { code, _ := s.admin("/readyz"); return code == 200 })
	if got := s.metric("smesh_enrolled_cgroup_events_total", map[string]string{"event": "created"}); got != created+1 {
		t.Errorf("smesh_enrolled_cgroup_events_total{event=created} = %v, want %v", got, created+1)
	}
	if n := s.attached(sliceDir, ebpf.AttachCGroupInet4Connect); n != 1 {
		t.Errorf("%d connect4 programs on the new smesh.slice, want 1", n)
	}
	before := s.splicedBytes()
	s.download()
	if got := s.splicedBytes() - before; got < smallSize {
		t.Errorf("%v bytes spliced after the slice came back, for a %d-byte download", got, smallSize)
	}
}

// checkWatchdog: smeshd pings the watchdog, and one that hangs is killed
// and restarted.
func (s *systemd) checkWatchdog(t *testing.T) {
	s.dropIn("smesh-test-watchdog", "[Service]\nWatchdogSec=2s\n")
	defer s.removeDropIn("smesh-test-watchdog")
	s.sh("systemctl restart smeshd")
	first := s.show("smeshd", "WatchdogTimestampMonotonic")
	time.Sleep(1500 * time.Millisecond)
	if second := s.show("smeshd", "WatchdogTimestampMonotonic"); second == first || second == "0" {
		t.Errorf("no watchdog ping in 1.5s (WatchdogSec=2s): %s, then %s", first, second)
	}
	restarts := s.show("smeshd", "NRestarts")
	// The worker pings (NotifyAccess=all); the master only waits.
	pid := s.worker()
	s.sh("kill -STOP " + pid)
	s.waitFor("the watchdog to restart a stopped smeshd", func() bool {
		return s.show("smeshd", "NRestarts") != restarts && s.show("smeshd", "ActiveState") == "active"
	})
	if !strings.Contains(s.journal(), "Watchdog timeout") {
		t.Error("no watchdog timeout in the journal")
	}
}

// checkRestarts: `systemctl restart smeshd`, ten times, refuses nothing
// and cuts nothing, and a crash of the worker loses nothing but what it
// relayed (docs/restart.md, 3.3). In copy mode (every connection relayed by
// smeshd) a client in the mesh makes connections without pause, each
// downloading /srv/small with its bytes checked, while a long-lived
// connection in the mesh exchanges checked lines every 100 ms across all of
// it: it is relayed by the first worker, which drains it in its scope
// smeshd-drain-PID.scope while the next ones serve. Each restart is a new
// master and worker (MainPID changes, NRestarts does not); the capture
// stays attached while no smeshd runs after the SIGKILL (held by systemd's
// descriptor store), and the connections made meanwhile wait and succeed.
// However often smeshd was restarted by hand, a crash brings it back.
func (s *systemd) checkRestarts(t *testing.T) { s.checkRestartsIn(t, "open") }

// checkRestartsClosed: the same with on_failure = "closed": the pinned
// capture's lock travels through the store too.
func (s *systemd) checkRestartsClosed(t *testing.T) {
	s.checkRestartsIn(t, "closed")
	s.sh("systemctl stop smeshd && smeshd cleanup && systemctl start smeshd")
}

func (s *systemd) checkRestartsIn(t *testing.T, onFailure string) {
	s.sh("cp " + configPath + " /root/smesh.toml.good")
	defer s.sh("cp /root/smesh.toml.good " + configPath + " && systemctl restart smeshd")
	// Services whose addresses exist only for connections captured by
	// smeshd (the container has nothing but loopback): a connection that
	// went out uncaptured fails.
	s.sh(`sed -i 's/^mode = "auto"/mode = "copy"/; s/^drain_timeout = .*/drain_timeout = "120s"/; s/^on_failure = .*/on_failure = "` + onFailure + `"/' ` + configPath + ` && cat >> ` + configPath + ` <<'EOF'

[[services]]
name = "smesh-test-web"
vip = "198.19.0.10"
port = 80
backends = ["127.0.0.1:8080"]

[[services]]
name = "smesh-test-echo"
vip = "198.19.0.11"
port = 81
backends = ["127.0.0.1:8081"]
EOF`)
	// Time to look while smeshd is away after the SIGKILL.
	s.dropIn("smesh-test-restart", "[Service]\nRestartSec=3s\n")
	defer s.removeDropIn("smesh-test-restart")
	s.sh("systemctl restart smeshd")
	s.startWeb("smesh-test-web")
	s.sh("systemctl stop smesh-test-echo 2>/dev/null || true; rm -f /run/smesh-test-*.stop /run/smesh-test-*.out")
	s.sh(`systemd-run --quiet --unit=smesh-test-echo --slice=smesh.slice python3 -c '
import socketserver
class H(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("127.0.0.1", 8081), H).serve_forever()
'`)
	s.sh("for i in $(seq 100); do python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8081), 1)' 2>/dev/null && exit 0; sleep 0.1; done; exit 1")
	// The long-lived connection: opened now, relayed by the worker
	// serving now, until told to stop (at most 170 s).
	s.sh(`systemd-run --quiet --unit=smesh-test-stream --slice=smesh.slice -p RemainAfterExit=yes python3 -c '
import os, socket, time
c = socket.create_connection(("198.19.0.11", 81), 10)
c.settimeout(10)
r = c.makefile("rb")
n, res, end = 0, "", time.time() + 170
try:
    while not os.path.exists("/run/smesh-test-stream.stop") and time.time() < end:
        want = b"exchange %d\n" % n
        c.sendall(want)
        got = r.readline()
        if got != want:
            raise Exception("exchange %d: got %r" % (n, got))
        n += 1
        time.sleep(0.1)
    res = "ok %d" % n
except Exception as e:
    res = "failed %d %s" % (n, e)
open("/run/smesh-test-stream.out", "w").write(res + "\n")
'`)
	s.waitFor("the long-lived connection to be relayed", func() bool {
		_, body := s.admin("/debug/connections")
		return strings.Contains(body, "127.0.0.1:8081")
	})
	// Connections in the mesh, one after another, every byte checked.
	s.startLoop("smesh-test-loop")
	time.Sleep(time.Second)

	restarts := s.show("smeshd", "NRestarts")
	firstWorker := s.worker()
	pids := map[string]bool{s.show("smeshd", "MainPID"): true}
	for i := 0; i < 10; i++ {
		s.sh("systemctl restart smeshd")
		pid := s.show("smeshd", "MainPID")
		if pids[pid] {
			t.Errorf("restart %d: MainPID %s is not new", i+1, pid)
		}
		pids[pid] = true
		time.Sleep(500 * time.Millisecond)
	}
	if got := s.show("smeshd", "NRestarts"); got != restarts {
		t.Errorf("NRestarts %s after the restarts by hand, want %s", got, restarts)
	}
	if scope := fmt.Sprintf("smeshd-drain-%s.scope", firstWorker); s.show(scope, "ActiveState") != "active" {
		t.Errorf("%s is %s, want active: the first worker drains the long-lived connection there", scope, s.show(scope, "ActiveState"))
	}

	// The restarts are over: every connection across them must have
	// succeeded. The loop stops before the crash below, which may cut
	// what the dead worker relays (a download in flight).
	s.stopLoop(t, "smesh-test-loop", "connections across 10 restarts")

	// A crash of the worker: the master exits non-zero, systemd starts
	// smeshd again after RestartSec=; meanwhile the capture is held by the
	// store and new connections wait in the stored listener's queue.
	worker := s.worker()
	s.sh("kill -KILL " + worker)
	s.startLoop("smesh-test-crashloop")
	s.waitFor("smeshd to be gone", func() bool { return s.show("smeshd", "MainPID") == "0" })
	for _, typ := range []ebpf.AttachType{ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupSockOps} {
		if n := s.attached(sliceDir, typ); n != 1 {
			t.Errorf("%d %s programs on smesh.slice while no smeshd runs, want 1 (held by the descriptor store)", n, typ)
		}
	}
	s.waitFor("smeshd to come back after SIGKILL", func() bool {
		return s.show("smeshd", "NRestarts") != restarts && s.show("smeshd", "ActiveState") == "active"
	})
	time.Sleep(2 * time.Second)

	// Made from right after the SIGKILL on: they waited in the stored
	// listener's queue until the next worker took it.
	s.stopLoop(t, "smesh-test-crashloop", "connections made from the crash on")
	s.sh("touch /run/smesh-test-stream.stop")
	s.waitFor("the stream to end", func() bool {
		_, ok := s.try("test -e /run/smesh-test-stream.out")
		return ok
	})
	stream := strings.TrimSpace(s.sh("cat /run/smesh-test-stream.out"))
	s.sh("systemctl stop smesh-test-stream smesh-test-echo; rm -f /run/smesh-test-*.stop /run/smesh-test-*.out /run/smesh-test-*.err")
	if !strings.HasPrefix(stream, "ok ") {
		t.Errorf("the long-lived connection across 10 restarts and a crash: %q", stream)
	} else {
		t.Logf("the long-lived connection across 10 restarts and a crash: %s exchanges, all intact", strings.TrimPrefix(stream, "ok "))
	}
	// Drained, the first worker exits and its scope goes.
	s.waitFor("the drain scopes to go", func() bool {
		return strings.TrimSpace(s.sh("systemctl list-units --no-legend --plain 'smeshd-drain-*' | grep -c active || true")) == "0"
	})
	j := s.journal()
	for _, bad := range []string{"Start request repeated too quickly", "left-over process", "reception only permitted"} {
		if strings.Contains(j, bad) {
			t.Errorf("%q in the journal:\n%s", bad, tail(j, 20))
		}
	}
}

// worker is the PID of the worker the unit's main process (smeshd's
// master) started: its newest child.
func (s *systemd) worker() string {
	s.t.Helper()
	main := s.show("smeshd", "MainPID")
	var pid string
	s.waitFor("smeshd's worker", func() bool {
		out, _ := s.try("cat /proc/" + main + "/task/*/children")
		f := strings.Fields(out)
		if len(f) == 0 {
			return false
		}
		pid = f[len(f)-1]
		return true
	})
	return pid
}

// checkClosed: on_failure = "closed" starts with smesh.slice enrolled
// (pins named by cgroup id), keeps refusing while smeshd is away, is
// adopted by the restarted smeshd; a start that fails leaves no pin.
func (s *systemd) checkClosed(t *testing.T) {
	// Time to look while smeshd is away.
	s.dropIn("smesh-test-restart", "[Service]\nRestartSec=8s\n")
	defer s.removeDropIn("smesh-test-restart") // restarts smeshd, after the next defer
	s.sh("cp " + configPath + " /root/smesh.toml.good")
	defer func() {
		s.sh("cp /root/smesh.toml.good " + configPath + " && systemctl restart smeshd")
		if out := s.sh("ls /sys/fs/bpf"); strings.Contains(out, "smesh") {
			t.Errorf("pins left after going back to on_failure = \"open\": %s", out)
		}
	}()
	s.sh(`sed -i 's/^on_failure = .*/on_failure = "closed"/' ` + configPath + " && systemctl restart smeshd")
	id := strings.TrimSpace(s.sh("stat -c %i " + sliceDir))
	pins := s.sh("ls /sys/fs/bpf/smesh")
	want := fmt.Sprintf("link_%d_%s", ebpf.AttachCGroupInet4Connect, id)
	if !strings.Contains(pins, want) {
		t.Errorf("pins %q, want %s (connect4 of smesh.slice, by cgroup id)", pins, want)
	}
	// Away: still attached, and a captured connection is refused.
	s.sh("systemctl kill --signal=SIGKILL smeshd")
	s.waitFor("smeshd to be gone", func() bool { return s.show("smeshd", "MainPID") == "0" })
	if n := s.attached(sliceDir, ebpf.AttachCGroupInet4Connect); n != 1 {
		t.Errorf("%d connect4 programs on smesh.slice while smeshd is away, want the pinned one", n)
	}
	// Uncaptured, 198.18.0.1 is unreachable (the container has only
	// loopback); captured, connect4 sends it to the proxy port, which
	// nobody listens on, or refuses it outright.
	out, _ := s.try(`systemd-run --quiet --slice=smesh.slice --scope python3 -c '
import socket
s = socket.socket()
s.settimeout(5)
try:
    s.connect(("198.18.0.1", 80))
    print("connected")
except OSError as e:
    print(type(e).__name__, e)
'`)
	// The stored listener queues it (to be answered by the next smeshd),
	// or without one it is refused: never direct.
	if !strings.Contains(out, "connected") && !strings.Contains(out, "ConnectionRefusedError") && !strings.Contains(out, "PermissionError") {
		t.Errorf("a captured connection while smeshd is away: %q, want queued or refused", out)
	}
	if s.show("smeshd", "MainPID") != "0" {
		t.Error("smeshd came back before the check of the pinned capture ended")
	}
	s.waitFor("smeshd to come back", func() bool { return s.show("smeshd", "ActiveState") == "active" })
	if n := s.attached(sliceDir, ebpf.AttachCGroupInet4Connect); n != 1 {
		t.Errorf("%d connect4 programs on smesh.slice after the restart, want 1 (adopted)", n)
	}

	// A start that fails after pinning (an enrolled path that is no
	// cgroup) removes what it pinned.
	s.sh("systemctl stop smeshd && smeshd cleanup")
	s.sh(`sed -i 's/^cgroups = .*/cgroups = ["smesh.slice", "cgroup.procs"]/' ` + configPath)
	if _, ok := s.try("systemctl start smeshd"); ok {
		t.Error("smeshd started with cgroup.procs enrolled")
	}
	s.sh("systemctl stop smeshd")
	if j := s.journal(); !strings.Contains(j, "attaching") {
		t.Errorf("the start did not fail where expected:\n%s", tail(j, 5))
	}
	if out := s.sh("ls /sys/fs/bpf"); strings.Contains(out, "smesh") {
		t.Errorf("a failed start left pins: %s: %s", out, s.sh("ls /sys/fs/bpf/smesh || true"))
	}
	s.sh("systemctl reset-failed smeshd")
}

// checkDrain: systemctl stop lets a relayed connection finish: the
// download was going when the stop began and its last read began before
// smeshd was gone, every byte arrived, and the stop ended with success
// although it lasted past TimeoutStopSec= (systemd would have killed
// smeshd otherwise, with Result=timeout); nothing stays attached.
//
// The events are ordered by the kernel's monotonic clock, in which systemd
// stamps its units and the download its reads. Bytes alone would not tell:
// the kernel keeps delivering what a smeshd killed mid-drain had queued,
// and the whole download fits in the sockets' buffers.
func (s *systemd) checkDrain(t *testing.T) {
	s.dropIn("smesh-test-stop", "[Service]\nTimeoutStopSec=3s\n")
	defer s.removeDropIn("smesh-test-stop") // restarts smeshd, after the next defer
	s.sh("cp " + configPath + " /root/smesh.toml.good")
	defer s.sh("cp /root/smesh.toml.good " + configPath)
	// copy mode relays same-node connections through smeshd.
	s.sh(`sed -i 's/^mode = "auto"/mode = "copy"/; s/^drain_timeout = .*/drain_timeout = "30s"/' ` + configPath)
	s.sh("systemctl restart smeshd")
	// A reader of 1 MB/s (curl's --limit-rate does not hold on loopback).
	// It writes the SHA-256 and the count of what it read, and when
	// (CLOCK_MONOTONIC, µs) it began the read that returned the last bytes:
	// that read closes the connection (Content-Length reached), which ends
	// the relay.
	s.sh(`systemd-run --quiet --unit=smesh-test-slow --slice=smesh.slice -p RemainAfterExit=yes python3 -c '
import hashlib, time, urllib.request
h, n, last = hashlib.sha256(), 0, 0
with urllib.request.urlopen("http://127.0.0.1:8080/blob") as r:
    while True:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        chunk = r.read(100000)
        if not chunk:
            break
        h.update(chunk)
        n, last = n + len(chunk), before
        time.sleep(0.1)
open("/run/smesh-test-slow.sum", "w").write("%s %d %d\n" % (h.hexdigest(), n, last))
'`)
	s.waitFor("the download to be relayed", func() bool {
		_, body := s.admin("/debug/connections")
		return strings.Contains(body, "127.0.0.1:8080")
	})
	s.sh("systemctl stop smeshd")
	if r := s.show("smeshd", "Result"); r != "success" {
		t.Errorf("smeshd stopped with result %s, want success (TimeoutStopSec=3s, extended by smeshd)", r)
	}
	s.waitFor("the download to end", func() bool {
		st := s.show("smesh-test-slow", "SubState")
		return st == "exited" || st == "failed"
	})
	if r := s.show("smesh-test-slow", "Result"); r != "success" {
		t.Errorf("the download across the drain ended with result %s:\n%s", r, s.sh("journalctl -u smesh-test-slow --no-pager | tail -5"))
	}
	out, _ := s.try("cat /run/smesh-test-slow.sum")
	got := strings.Fields(out)
	if len(got) != 3 || got[0] != s.blobSum || got[1] != strconv.Itoa(blobSize) {
		t.Errorf("download across the drain: %q, want sha256 %s, %d bytes and when it ended", strings.TrimSpace(out), s.blobSum, blobSize)
	} else {
		last, _ := strconv.ParseUint(got[2], 10, 64)
		stopped := s.monotonic("smeshd", "ActiveExitTimestampMonotonic")
		gone := s.monotonic("smeshd", "InactiveEnterTimestampMonotonic")
		if !(stopped < last && last < gone) {
			t.Errorf("the download's last read began at %d µs, want after the stop began (%d) and before smeshd was gone (%d): smeshd did not drain it",
				last, stopped, gone)
		}
		t.Logf("the stop began at %d µs, the download's last read at %d, smeshd was gone at %d", stopped, last, gone)
	}
	s.sh("systemctl stop smesh-test-slow; rm -f /run/smesh-test-slow.sum; systemctl reset-failed smesh-test-slow 2>/dev/null || true")
	for _, typ := range []ebpf.AttachType{ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupSockOps} {
		if n := s.attached(sliceDir, typ); n != 0 {
			t.Errorf("%d %s programs on smesh.slice after stop", n, typ)
		}
	}
}

// checkCapabilities: without CAP_BPF or CAP_NET_ADMIN, smeshd names what it
// lacks instead of blaming the kernel.
func (s *systemd) checkCapabilities(t *testing.T) {
	for missing, keep := range map[string]string{
		"CAP_BPF":       "CAP_NET_ADMIN CAP_PERFMON",
		"CAP_NET_ADMIN": "CAP_BPF CAP_PERFMON",
	} {
		out, ok := s.try(fmt.Sprintf("systemd-run --quiet --wait --pipe -p CapabilityBoundingSet='%s' /usr/local/bin/smeshd check -c %s", keep, configPath))
		if ok {
			t.Errorf("smeshd check without %s passed:\n%s", missing, out)
		}
		if !strings.Contains(out, "missing capability "+missing) || strings.Contains(out, "this kernel cannot") {
			t.Errorf("smeshd check without %s says:\n%s", missing, out)
		}
	}
}

// checkUpgrade: `smeshd upgrade` after the binary was replaced (a new
// inode at /usr/local/bin/smeshd, as a package upgrade leaves it) starts
// the binary now at that path, which takes over without a gap: the
// command prints its PID, which is the master's worker now (the old worker
// told the master; the master stays the unit's MainPID); the unit stays
// active and running, restarted by nobody; the new worker's READY=1 and
// watchdog pings are accepted (WatchdogSec=2s here: the unit would be
// killed otherwise); the old worker drains and exits; connections made in
// the mesh all along never fail; one made after is spliced, every byte
// intact.
func (s *systemd) checkUpgrade(t *testing.T) {
	s.dropIn("smesh-test-watchdog", "[Service]\nWatchdogSec=2s\n")
	defer s.removeDropIn("smesh-test-watchdog")
	s.sh("systemctl restart smeshd")
	// The journal from here on (the watchdog check timed out before).
	since := strings.TrimSpace(s.sh("date +%s"))
	s.startWeb("smesh-test-web")
	mainPID, pid, restarts := s.show("smeshd", "MainPID"), s.worker(), s.show("smeshd", "NRestarts")
	s.sh("cp /usr/local/bin/smeshd /usr/local/bin/.smeshd.new && mv -f /usr/local/bin/.smeshd.new /usr/local/bin/smeshd")
	if exe := s.sh("readlink /proc/" + pid + "/exe"); !strings.Contains(exe, "(deleted)") {
		t.Fatalf("the running smeshd's binary is %q after it was replaced, want a deleted one", exe)
	}
	// Connections in the mesh while the upgrade goes on, one after
	// another, until told to stop (at most 60 s).
	s.sh("rm -f /run/smesh-test-loop.stop /run/smesh-test-loop.out")
	s.sh(`systemd-run --quiet --unit=smesh-test-loop --slice=smesh.slice -p RemainAfterExit=yes sh -c '
ok=0; failed=0; end=$(($(date +%s) + 60))
while [ ! -e /run/smesh-test-loop.stop ] && [ $(date +%s) -lt $end ]; do
  if curl -fsS -o /dev/null --max-time 5 http://127.0.0.1:8080/small; then ok=$((ok+1)); else failed=$((failed+1)); fi
done
echo "$ok $failed" > /run/smesh-test-loop.out'`)
	time.Sleep(time.Second)

	out := s.sh("smeshd upgrade")
	t.Logf("smeshd upgrade: %s", strings.TrimSpace(out))
	var newPID string
	if f := strings.Fields(strings.TrimPrefix(strings.TrimSpace(out), "smeshd: upgraded: PID ")); len(f) > 0 {
		newPID = f[0]
	}
	if newPID == "" || newPID == pid {
		t.Fatalf("smeshd upgrade printed %q, want the new PID (the old one is %s)", out, pid)
	}
	if got := s.show("smeshd", "MainPID"); got != mainPID {
		t.Errorf("MainPID after the upgrade is %s, want the master's %s", got, mainPID)
	}
	if exe := s.sh("readlink /proc/" + newPID + "/exe"); strings.TrimSpace(exe) != "/usr/local/bin/smeshd" {
		t.Errorf("the successor runs %q, want the new /usr/local/bin/smeshd", exe)
	}
	s.waitFor("the old smeshd to drain and exit", func() bool { _, ok := s.try("test ! -e /proc/" + pid); return ok })
	time.Sleep(3 * time.Second) // more than WatchdogSec: the new main's pings must count
	if w := s.worker(); w != newPID {
		t.Errorf("the master's worker after the upgrade is %s, want the successor %s", w, newPID)
	}
	for prop, want := range map[string]string{"ActiveState": "active", "SubState": "running", "MainPID": mainPID, "NRestarts": restarts} {
		if got := s.show("smeshd", prop); got != want {
			t.Errorf("after the upgrade %s=%s, want %s", prop, got, want)
		}
	}
	if code, body := s.admin("/readyz"); code != 200 {
		t.Errorf("/readyz after the upgrade: %d %q", code, body)
	}
	j, _ := s.exec(commandTimeout, "journalctl", "-u", "smeshd", "--no-pager", "-o", "short-monotonic", "--since=@"+since)
	if strings.Contains(j, "reception only permitted for main PID") {
		t.Errorf("systemd dropped a notification of smeshd's:\n%s", tail(j, 20))
	}
	if strings.Contains(j, "Watchdog timeout") {
		t.Errorf("the watchdog fired across the upgrade:\n%s", tail(j, 20))
	}

	s.sh("touch /run/smesh-test-loop.stop")
	s.waitFor("the connection loop to end", func() bool { _, ok := s.try("test -e /run/smesh-test-loop.out"); return ok })
	res := strings.Fields(s.sh("cat /run/smesh-test-loop.out"))
	s.sh("systemctl stop smesh-test-loop; rm -f /run/smesh-test-loop.stop /run/smesh-test-loop.out")
	if len(res) != 2 || res[1] != "0" || res[0] == "0" {
		t.Errorf("connections across the upgrade: %v, want some ok and 0 failed", res)
	} else {
		t.Logf("connections across the upgrade: %s ok, 0 failed", res[0])
	}
	before := s.splicedBytes()
	s.download()
	if got := s.splicedBytes() - before; got < smallSize {
		t.Errorf("%v bytes spliced after the upgrade, for a %d-byte download", got, smallSize)
	}

	// The master reaps the new worker although it did not start it (a
	// child subreaper: once the old worker exited the successor is the
	// master's child): its crash is seen and restarted.
	s.sh("kill -KILL " + newPID)
	s.waitFor("systemd to restart the upgraded smeshd after it was killed", func() bool {
		return s.show("smeshd", "NRestarts") != restarts && s.show("smeshd", "ActiveState") == "active" &&
			s.show("smeshd", "MainPID") != mainPID
	})
}

// checkStop: a stopped smeshd leaves nothing attached (the worker emptied
// systemd's descriptor store): connections in the mesh go direct, as
// without smeshd.
func (s *systemd) checkStop(t *testing.T) {
	s.sh("systemctl stop smeshd")
	s.download()
	for _, typ := range []ebpf.AttachType{ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupSockOps, ebpf.AttachCgroupInet4GetPeername} {
		if n := s.attached(sliceDir, typ); n != 0 {
			t.Errorf("%d %s programs on smesh.slice after stop", n, typ)
		}
	}
	if r := s.show("smeshd", "Result"); r != "success" {
		t.Errorf("smeshd stopped with result %s", r)
	}
}

// show is one property of a unit (systemctl show -P).
func (s *systemd) show(unit, property string) string {
	s.t.Helper()
	return strings.TrimSpace(s.sh("systemctl show -P " + property + " " + unit))
}

// monotonic is a timestamp property of unit, CLOCK_MONOTONIC in µs.
func (s *systemd) monotonic(unit, property string) uint64 {
	s.t.Helper()
	v := s.show(unit, property)
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil || n == 0 {
		s.t.Fatalf("%s of %s: %q", property, unit, v)
	}
	return n
}

// journal is smeshd's journal, as text.
func (s *systemd) journal() string {
	out, _ := s.exec(commandTimeout, "journalctl", "-u", "smeshd", "--no-pager", "-o", "short-monotonic")
	return out
}

func (s *systemd) dropIn(name, content string) {
	s.t.Helper()
	s.sh(fmt.Sprintf("mkdir -p %s && printf '%%s' '%s' > %s/%s.conf && systemctl daemon-reload", dropIns, content, dropIns, name))
}

func (s *systemd) removeDropIn(name string) {
	s.t.Helper()
	s.sh(fmt.Sprintf("rm -f %s/%s.conf && systemctl daemon-reload && systemctl restart smeshd", dropIns, name))
}

// admin GETs a path of smeshd's admin endpoint, from outside the mesh.
func (s *systemd) admin(path string) (int, string) {
	s.t.Helper()
	out, _ := s.exec(commandTimeout, "curl", "-sS", "-w", "\n%{http_code}", "http://127.0.0.1:15000"+path)
	out = strings.TrimRight(out, "\n")
	i := strings.LastIndex(out, "\n")
	code, _ := strconv.Atoi(out[i+1:])
	return code, out[:max(i, 0)]
}

// metric is the value of the series of family name with labels, or -1.
func (s *systemd) metric(name string, labels map[string]string) float64 {
	s.t.Helper()
	code, text := s.admin("/metrics")
	if code != 200 {
		s.t.Fatalf("/metrics: %d %s", code, text)
	}
	return testenv.Metric(s.t, text, name, labels)
}

// attached counts the programs of type typ on a cgroup of the container,
// queried from the host; a cgroup that does not exist has none.
func (s *systemd) attached(inside string, typ ebpf.AttachType) int {
	s.t.Helper()
	path := s.hostCgroup(inside)
	if _, err := os.Stat(path); os.IsNotExist(err) {
		return 0
	}
	return testenv.AttachedPrograms(s.t, path, typ)
}

func (s *systemd) waitFor(what string, cond func() bool) {
	s.t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			s.t.Fatalf("waited 20s for %s\n%s", what, tail(s.journal(), 15))
		}
	}
}

// startLoop starts unit, in smesh.slice (the mesh): downloads of /small
// from the test web server's captured-only address, one after another,
// each checked by its sha256, until /run/UNIT.stop exists (at most 170 s).
// It writes "OK FAILED" to /run/UNIT.out at the end, and each failure's
// time and curl's error to /run/UNIT.err.
func (s *systemd) startLoop(unit string) {
	s.t.Helper()
	s.sh(`systemd-run --quiet --unit=` + unit + ` --slice=smesh.slice -p RemainAfterExit=yes sh -c '
ok=0; failed=0; end=$(($(date +%s) + 170))
while [ ! -e /run/` + unit + `.stop ] && [ $(date +%s) -lt $end ]; do
  if [ "$(curl -fsS --max-time 20 http://198.19.0.10/small 2>/run/` + unit + `.curl | sha256sum | cut -d" " -f1)" = "` + s.smallSum + `" ]; then ok=$((ok+1)); else failed=$((failed+1)); echo "$(date +%T.%N) $(cat /run/` + unit + `.curl)" >> /run/` + unit + `.err; fi
done
echo "$ok $failed" > /run/` + unit + `.out'`)
}

// stopLoop stops what startLoop started and fails t unless some downloads
// went through and none failed (what, for the message).
func (s *systemd) stopLoop(t *testing.T, unit, what string) {
	t.Helper()
	s.sh("touch /run/" + unit + ".stop")
	s.waitFor(unit+" to end", func() bool {
		_, ok := s.try("test -e /run/" + unit + ".out")
		return ok
	})
	loop := strings.Fields(s.sh("cat /run/" + unit + ".out"))
	errs, _ := s.try("cat /run/" + unit + ".err")
	s.sh("systemctl stop " + unit + " 2>/dev/null || true; rm -f /run/" + unit + ".*")
	if len(loop) != 2 || loop[1] != "0" || loop[0] == "0" {
		t.Errorf("%s: %v (ok, failed), want some ok and 0 failed; failures:\n%s", what, loop, errs)
	} else {
		t.Logf("%s: %s ok, 0 failed", what, loop[0])
	}
}
