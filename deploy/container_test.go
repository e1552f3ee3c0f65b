package deploy

// A Debian container booted with a real systemd as its PID 1
// (systemd-nspawn), for the tests that install smeshd as the README says and
// drive it with systemctl.
//
// The root file system is made once per machine with debootstrap and kept
// under /var/cache/smesh-test-rootfs; each container boots it read-only with
// a tmpfs overlay (--volatile=overlay), so nothing a test does reaches the
// cache. The container has a network namespace of its own with nothing but
// loopback (--private-network), and a cgroup of its own, smesh-test-*,
// made in the cgroup v2 tree and, on a hybrid host, in the name=systemd v1
// tree too (nspawn moves itself there before it starts the container's
// systemd with SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1). Cleanup powers the
// container off, kills whatever is left in its cgroup and removes the
// cgroups and what nspawn keeps in /run for it.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/cgroups"
	"github.com/smesh-dev/smesh/pkg/sandbox"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

const (
	// rootfsCache holds the root file systems, one directory each, named
	// after what they contain.
	rootfsCache = "/var/cache/smesh-test-rootfs"
	// defaultMirror is used when the apt sources name no Debian mirror.
	defaultMirror = "http://deb.debian.org/debian"
	// bootTimeout bounds the container's boot, up to a running system.
	bootTimeout = 60 * time.Second
	// commandTimeout bounds one command run in the container.
	commandTimeout = 2 * time.Minute
)

// debootstrapPackages are what the tests drive in the container, beyond a
// minimal Debian: systemd as PID 1, and the clients and servers of the
// checks.
var debootstrapPackages = []string{"systemd", "systemd-sysv", "dbus", "iproute2", "curl", "python3"}

// withCacheLock runs fn holding the rootfs cache's lock, so that test runs
// on one machine build each root file system once.
func withCacheLock(t *testing.T, fn func()) {
	t.Helper()
	if err := os.MkdirAll(rootfsCache, 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(rootfsCache, "lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	defer unix.Flock(int(f.Fd()), unix.LOCK_UN)
	fn()
}

// cacheName names a cached root file system after its parts, so that a
// change of them makes a new one.
func cacheName(prefix string, parts ...string) string {
	sum := sha256.Sum256([]byte(strings.Join(parts, "\n")))
	return prefix + "-" + hex.EncodeToString(sum[:4])
}

// buildCached returns the cached directory name below rootfsCache, making
// it first with make (which fills a temporary directory) if it is missing.
// A build that fails leaves nothing behind.
func buildCached(t *testing.T, name string, make func(dir string) error) string {
	t.Helper()
	dir := filepath.Join(rootfsCache, name)
	withCacheLock(t, func() {
		if _, err := os.Stat(dir); err == nil {
			return
		}
		tmp, err := os.MkdirTemp(rootfsCache, name+".tmp-")
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		t.Logf("building the container's root file system %s (once per machine)", dir)
		if err := make(tmp); err != nil {
			removeTree(t, tmp)
			t.Fatalf("building %s: %v", dir, err)
		}
		if err := os.Rename(tmp, dir); err != nil {
			removeTree(t, tmp)
			t.Fatal(err)
		}
		t.Logf("built %s in %v", dir, time.Since(start).Round(time.Second))
	})
	return dir
}

// removeTree removes a root file system that is being built: whatever a
// failed build left mounted below it first (debootstrap mounts /proc and
// /sys in the target), so that nothing of the host is removed through it.
func removeTree(t *testing.T, dir string) {
	t.Helper()
	mounts, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Errorf("not removing %s: %v", dir, err)
		return
	}
	var below []string
	for line := range strings.Lines(string(mounts)) {
		if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], dir+"/") {
			below = append(below, f[1])
		}
	}
	for _, m := range slices.Backward(below) {
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil {
			t.Errorf("not removing %s: unmounting %s: %v", dir, m, err)
			return
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		t.Errorf("removing %s: %v", dir, err)
	}
}

// bookwormRootfs returns a Debian 12 root file system with systemd 252.
func bookwormRootfs(t *testing.T) string {
	t.Helper()
	debootstrap := testenv.RequireCommand(t, "debootstrap")
	mirror := aptMirror(t)
	include := strings.Join(debootstrapPackages, ",")
	return buildCached(t, cacheName("bookworm", include), func(dir string) error {
		cmd := exec.Command(debootstrap, "--variant=minbase", "--include="+include, "bookworm", dir, mirror)
		out, err := runLogged(t, cmd, 15*time.Minute)
		if err != nil {
			return fmt.Errorf("debootstrap: %w\n%s", err, tail(out, 30))
		}
		return nil
	})
}

// backportsRootfs returns bookwormRootfs with systemd from
// bookworm-backports (254), which has Type=notify-reload.
func backportsRootfs(t *testing.T) string {
	t.Helper()
	base := bookwormRootfs(t)
	mirror := aptMirror(t)
	return buildCached(t, cacheName("bookworm-backports-systemd", base, mirror), func(dir string) error {
		if out, err := exec.Command("cp", "-a", base+"/.", dir+"/").CombinedOutput(); err != nil {
			return fmt.Errorf("copying %s: %v\n%s", base, err, out)
		}
		return runIn(t, dir, fmt.Sprintf(`
echo "deb %s bookworm-backports main" > /etc/apt/sources.list.d/backports.list
export DEBIAN_FRONTEND=noninteractive
apt-get -qq update
apt-get -qq -y install -t bookworm-backports systemd systemd-sysv >/dev/null
apt-get clean
rm -rf /var/lib/apt/lists/*
systemctl --version | head -1`, mirror), 10*time.Minute)
	})
}

// aptMirror is the Debian mirror apt uses on this machine, from its
// sources (deb822 .sources files or one-line sources.list).
func aptMirror(t *testing.T) string {
	t.Helper()
	files, _ := filepath.Glob("/etc/apt/sources.list.d/*.sources")
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		// Stanzas are separated by blank lines.
		for stanza := range strings.SplitSeq(string(data), "\n\n") {
			fields := map[string]string{}
			for line := range strings.Lines(stanza) {
				if k, v, ok := strings.Cut(line, ":"); ok && !strings.HasPrefix(k, "#") {
					fields[strings.TrimSpace(k)] = strings.TrimSpace(v)
				}
			}
			if slices.Contains(strings.Fields(fields["Types"]), "deb") &&
				slices.Contains(strings.Fields(fields["Suites"]), "bookworm") &&
				fields["Enabled"] != "no" && fields["URIs"] != "" {
				return strings.Fields(fields["URIs"])[0]
			}
		}
	}
	for _, f := range append([]string{"/etc/apt/sources.list"}, must(filepath.Glob("/etc/apt/sources.list.d/*.list"))...) {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for line := range strings.Lines(string(data)) {
			fields := strings.Fields(line)
			// deb [options] URI suite components...
			if len(fields) < 3 || fields[0] != "deb" {
				continue
			}
			fields = fields[1:]
			if strings.HasPrefix(fields[0], "[") {
				for len(fields) > 0 && !strings.HasSuffix(fields[0], "]") {
					fields = fields[1:]
				}
				if len(fields) > 0 {
					fields = fields[1:]
				}
			}
			if len(fields) >= 2 && fields[1] == "bookworm" {
				return fields[0]
			}
		}
	}
	t.Logf("no Debian bookworm mirror in the apt sources; using %s", defaultMirror)
	return defaultMirror
}

func must[T any](v T, _ error) T { return v }

// runLogged runs cmd with a timeout and returns its combined output.
func runLogged(t *testing.T, cmd *exec.Cmd, timeout time.Duration) (string, error) {
	t.Helper()
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return "", err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return out.String(), err
	case <-time.After(timeout):
		cmd.Process.Kill()
		<-done
		return out.String(), fmt.Errorf("%s: no end after %v", cmd.Path, timeout)
	}
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// container is a booted container.
type container struct {
	// t is the running (sub)test, which the helpers fail; top is the test
	// that booted the container, which cleans up.
	t, top  *testing.T
	name    string // smesh-test-*: its cgroups and nspawn's machine name
	cgroup  string // its cgroup v2 directory on the host
	v1      string // its name=systemd directory, "" on a unified host
	cmd     *exec.Cmd
	exited  chan struct{}
	console string // nspawn's output: the container's console
	leader  int    // the container's PID 1, as the host sees it
	// diagnose, if set, adds to the message of a failed command.
	diagnose func() string
	removed  bool
}

// startNspawn starts systemd-nspawn with args in cgroups of its own, and
// removes all of it in cleanup.
func startNspawn(t *testing.T, args ...string) *container {
	t.Helper()
	nspawn := testenv.RequireCommand(t, "systemd-nspawn")
	mount, err := cgroups.Mount()
	if err != nil {
		t.Fatal(err)
	}
	c := &container{t: t, top: t, name: testenv.Unique("smesh-test"), exited: make(chan struct{})}
	c.console = filepath.Join(t.TempDir(), "console")
	c.cgroup = filepath.Join(mount, c.name)
	if err := os.Mkdir(c.cgroup, 0o755); err != nil {
		t.Fatal(err)
	}
	// On a hybrid host, systemd-nspawn insists on a name=systemd cgroup
	// of its own as well.
	if v1 := namedSystemdMount(); v1 != "" {
		c.v1 = filepath.Join(v1, c.name)
		if err := os.Mkdir(c.v1, 0o755); err != nil {
			os.Remove(c.cgroup)
			t.Fatal(err)
		}
	}
	t.Cleanup(c.remove)

	args = append([]string{nspawn, "--register=no", "--keep-unit", "--machine=" + c.name}, args...)
	// The shell joins the name=systemd cgroup, then becomes nspawn; the
	// cgroup v2 one it is born in (sandbox.Start).
	c.cmd = exec.Command("/bin/sh", append([]string{"-c", `[ -z "$V1" ] || echo $$ > "$V1/cgroup.procs" && exec "$@"`, "sh"}, args...)...)
	c.cmd.Env = append(os.Environ(), "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1", "V1="+c.v1)
	out, err := os.Create(c.console)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	c.cmd.Stdout, c.cmd.Stderr = out, out
	if err := sandbox.Start(c.cmd, c.cgroup, ""); err != nil {
		t.Fatalf("starting systemd-nspawn: %v", err)
	}
	go func() { c.cmd.Wait(); close(c.exited) }()
	return c
}

// runIn runs a shell script as the only process of a container on dir
// (no boot, the host's network), for building a root file system.
func runIn(t *testing.T, dir, script string, timeout time.Duration) error {
	t.Helper()
	c := startNspawn(t, "--quiet", "--directory="+dir, "/bin/sh", "-ec", script)
	defer c.remove()
	select {
	case <-c.exited:
	case <-time.After(timeout):
		return fmt.Errorf("no end after %v\n%s", timeout, c.consoleTail())
	}
	if !c.cmd.ProcessState.Success() {
		return fmt.Errorf("%v\n%s", c.cmd.ProcessState, c.consoleTail())
	}
	return nil
}

// bootContainer boots rootfs and waits until its systemd says the system
// runs. binds are nspawn --bind= / --bind-ro= options.
func bootContainer(t *testing.T, rootfs string, binds ...string) *container {
	t.Helper()
	testenv.RequireCommand(t, "nsenter")
	args := []string{"--boot", "--private-network", "--capability=all", "--system-call-filter=bpf",
		"--volatile=overlay", "--console=read-only", "--directory=" + rootfs}
	c := startNspawn(t, append(args, binds...)...)

	start := time.Now()
	deadline := start.Add(bootTimeout)
	for c.leader == 0 {
		// systemd moves itself into init.scope early in its boot.
		if pids, err := cgroups.Procs(filepath.Join(c.cgroup, "payload", "init.scope")); err == nil && len(pids) > 0 {
			c.leader = pids[0]
			break
		}
		select {
		case <-c.exited:
			t.Fatalf("systemd-nspawn exited: %v\n%s", c.cmd.ProcessState, c.consoleTail())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("no systemd in the container after %v\n%s", bootTimeout, c.consoleTail())
		}
	}
	// "running", or "degraded" (exit status 1) with some unit failed. Until
	// systemd listens on its private socket, systemctl cannot ask.
	var state string
	for {
		out, _ := c.exec(bootTimeout, "systemctl", "is-system-running", "--wait")
		if state = strings.TrimSpace(out); state == "running" || state == "degraded" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the container's systemd did not boot: %q\n%s", state, c.consoleTail())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if state == "degraded" {
		failed, _ := c.exec(commandTimeout, "systemctl", "--failed", "--no-legend")
		t.Logf("the container booted degraded:\n%s", failed)
	}
	t.Logf("container %s booted in %v (systemd %s)", c.name, time.Since(start).Round(10*time.Millisecond), c.systemdVersion())
	return c
}

// namedSystemdMount is where the name=systemd cgroup v1 hierarchy is
// mounted, or "" when it is not (a unified host).
func namedSystemdMount() string {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return ""
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) >= 4 && fields[2] == "cgroup" && slices.Contains(strings.Split(fields[3], ","), "name=systemd") {
			return fields[1]
		}
	}
	return ""
}

func (c *container) consoleTail() string {
	data, _ := os.ReadFile(c.console)
	return "console:\n" + tail(string(data), 40)
}

func (c *container) systemdVersion() string {
	out, _ := c.exec(commandTimeout, "systemctl", "--version")
	v, _, _ := strings.Cut(out, "\n")
	return strings.TrimPrefix(v, "systemd ")
}

// exec runs a command inside the container, in all of its namespaces, with
// a clean environment, and returns its combined output.
func (c *container) exec(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	full := append([]string{"--target", fmt.Sprint(c.leader), "--all", "--",
		"/usr/bin/env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=/root", "LANG=C.UTF-8", "SYSTEMD_PAGER=cat", "SYSTEMD_COLORS=0"}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", full...)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("%v: no end after %v", args, timeout)
	}
	return string(out), err
}

// sh runs a shell script in the container and returns its output; a
// non-zero exit fails the test.
func (c *container) sh(script string) string {
	c.t.Helper()
	out, err := c.exec(commandTimeout, "/bin/sh", "-ec", script)
	if err != nil {
		more := ""
		if c.diagnose != nil {
			more = c.diagnose()
		}
		c.t.Fatalf("in the container: %s: %v\n%s\n%s", script, err, out, more)
	}
	return out
}

// try runs a shell script in the container and returns its output and
// whether it exited with 0.
func (c *container) try(script string) (string, bool) {
	out, err := c.exec(commandTimeout, "/bin/sh", "-ec", script)
	return out, err == nil
}

// hostPath is where a path below the container's /sys/fs/cgroup is on the
// host.
func (c *container) hostCgroup(inside string) string {
	rel, _ := filepath.Rel("/sys/fs/cgroup", inside)
	return filepath.Join(c.cgroup, "payload", rel)
}

// remove powers the container off (nspawn asks its systemd on SIGTERM),
// kills what is left, and removes its cgroups and nspawn's state in /run.
func (c *container) remove() {
	if c.removed {
		return
	}
	c.removed = true
	t := c.top
	if c.cmd != nil && c.cmd.Process != nil {
		select {
		case <-c.exited:
		default:
			c.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-c.exited:
			case <-time.After(15 * time.Second):
				t.Logf("the container did not power off within 15s; killing it")
			}
		}
	}
	if err := cgroups.Remove(c.cgroup, 15*time.Second); err != nil {
		t.Errorf("removing the container's cgroup: %v", err)
	}
	if c.cmd != nil && c.cmd.Process != nil {
		<-c.exited
	}
	if c.v1 != "" {
		if err := cgroups.RemoveTree(c.v1, 5*time.Second); err != nil {
			t.Errorf("removing the container's name=systemd cgroup: %v", err)
		}
	}
	// What nspawn keeps for a machine while it runs; a killed one leaves
	// it.
	if err := os.RemoveAll(filepath.Join("/run/systemd/nspawn/propagate", c.name)); err != nil {
		t.Errorf("removing nspawn's state: %v", err)
	}
}
