package main

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// initScript is the guest's PID 1.
//
//go:embed init.sh
var initScript []byte

// step is one test binary the guest runs.
type step struct {
	Name string // shown in the report: the package's last element
	Dir  string // the package's directory in the source tree
	What string // what its tests cover, for the report
}

// steps are the packages whose tests reach the kernel: the capture
// decisions run in the kernel, the harness that builds namespaces, veths,
// bridges and dual-stack pods, smeshd check and bench, and the end-to-end
// tests of a real smeshd.
var steps = []step{
	{"datapath", "pkg/datapath", "connect4's capture decisions, run in the kernel (BPF_PROG_TEST_RUN)"},
	{"cgroups", "pkg/cgroups", "cgroup v2 mounts and removal"},
	{"sandbox", "pkg/sandbox", "network namespaces, veths, bridges, sysctls, IPv4+IPv6 pods"},
	{"testenv", "pkg/testenv", "test nodes, cgroups, linked nodes, dual-stack pod clusters"},
	{"smeshd", "cmd/smeshd", "smeshd check with the default configuration, a short smeshd bench"},
	{"e2e", "e2e", "a real smeshd: capture, splice, SO_ORIGINAL_DST, getpeername, tunnel, namespaces, bounds"},
}

// hiddenApplets are busybox applets left out of the guest: busybox's ip has
// no `ip netns`, so the tests that drive iproute2 must see no ip at all
// (and are then listed as not run) rather than a different one.
var hiddenApplets = map[string]bool{"busybox": true, "ip": true, "setpriv": true}

// modulesNeeded are the modules the tests load (veth pairs between nodes,
// pod bridges), with their dependencies found from the modules themselves.
var modulesNeeded = []string{"veth", "bridge"}

// buildGuest compiles smeshd and the test binaries (static: the guest has
// no C library) and lays out the guest's root file system in dir/root,
// packed into dir/initramfs.cpio.
func buildGuest(ctx context.Context, g guestOptions, k *kernel, logf func(string, ...any)) (string, error) {
	root := filepath.Join(g.Dir, "root")
	if err := os.RemoveAll(root); err != nil {
		return "", err
	}
	for _, d := range []string{"bin", "dev", "proc", "sys", "tmp", "run", "root", "etc", "kerneltest", "lib/modules", "src", "var"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return "", err
		}
	}
	// /var/run is /run, as on every Debian host (client-go reads a pod's
	// service account from /var/run/secrets).
	if err := os.Symlink("../run", filepath.Join(root, "var", "run")); err != nil {
		return "", err
	}

	logf("building smeshd and %d test binaries (CGO_ENABLED=0)", len(steps))
	start := time.Now()
	build := filepath.Join(g.Dir, "build")
	os.RemoveAll(build)
	if err := os.MkdirAll(build, 0o755); err != nil {
		return "", err
	}
	if err := goCmd(ctx, g.Go, "build", "-o", filepath.Join(root, "bin", "smeshd"), "./cmd/smeshd"); err != nil {
		return "", err
	}
	args := []string{"test", "-c", "-o", build + "/"}
	for _, s := range steps {
		args = append(args, "./"+s.Dir)
	}
	if err := goCmd(ctx, g.Go, args...); err != nil {
		return "", err
	}
	for _, s := range steps {
		dst := filepath.Join(root, "src", s.Dir)
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return "", err
		}
		if err := os.Rename(filepath.Join(build, filepath.Base(s.Dir)+".test"), filepath.Join(dst, s.Name+".test")); err != nil {
			return "", err
		}
	}
	logf("built in %s", time.Since(start).Round(time.Second))
	if err := copyFile("smesh.toml", filepath.Join(root, "src", "smesh.toml"), 0o644); err != nil {
		return "", err
	}

	if err := installBusybox(g.Busybox, root); err != nil {
		return "", err
	}
	mods, err := modulesFor(k.Modules, modulesNeeded)
	if err != nil {
		return "", err
	}
	var modList bytes.Buffer
	for _, m := range mods {
		data, err := readModule(filepath.Join(k.Modules, m.path))
		if err != nil {
			return "", err
		}
		if err := os.WriteFile(filepath.Join(root, "lib", "modules", m.name+".ko"), data, 0o644); err != nil {
			return "", err
		}
		fmt.Fprintln(&modList, m.name+".ko")
	}

	var plan bytes.Buffer
	for _, s := range steps {
		fmt.Fprintf(&plan, "%s %s %s.test -test.timeout=%s", s.Name, s.Dir, s.Name, g.TestTimeout)
		if g.Run != "" {
			fmt.Fprintf(&plan, " -test.run=%s", g.Run)
		}
		if skip := skipPattern(s.Name, g.Skip); skip != "" {
			fmt.Fprintf(&plan, " -test.skip=%s", skip)
		}
		fmt.Fprintln(&plan)
	}
	env := fmt.Sprintf("export SMESH_TEST_SCALE=%d\n", g.Scale)
	files := map[string]struct {
		data []byte
		mode os.FileMode
	}{
		"init":               {initScript, 0o755},
		"kerneltest/plan":    {plan.Bytes(), 0o644},
		"kerneltest/modules": {modList.Bytes(), 0o644},
		"kerneltest/env":     {[]byte(env), 0o644},
		"etc/hosts":          {[]byte("127.0.0.1 localhost\n::1 localhost\n"), 0o644},
		"etc/passwd":         {[]byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644},
		"etc/group":          {[]byte("root:x:0:\n"), 0o644},
	}
	for name, f := range files {
		if err := os.WriteFile(filepath.Join(root, name), f.data, f.mode); err != nil {
			return "", err
		}
	}

	image := filepath.Join(g.Dir, "initramfs.cpio")
	// cpio's newc format is what the kernel unpacks into its rootfs.
	cmd := exec.CommandContext(ctx, "sh", "-c", "find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet > "+shellQuote(image))
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("packing the initramfs (cpio): %w\n%s", err, out)
	}
	return image, nil
}

// installBusybox copies a static busybox into root/bin with a link per
// applet, minus hiddenApplets.
func installBusybox(busybox, root string) error {
	f, err := elf.Open(busybox)
	if err != nil {
		return fmt.Errorf("busybox (%s): %w; install busybox-static", busybox, err)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			f.Close()
			return fmt.Errorf("%s is dynamically linked: the guest has no C library; install busybox-static", busybox)
		}
	}
	f.Close()
	if err := copyFile(busybox, filepath.Join(root, "bin", "busybox"), 0o755); err != nil {
		return err
	}
	out, err := exec.Command(busybox, "--list").Output()
	if err != nil {
		return fmt.Errorf("busybox --list: %w", err)
	}
	for _, applet := range strings.Fields(string(out)) {
		if hiddenApplets[applet] {
			continue
		}
		if err := os.Symlink("busybox", filepath.Join(root, "bin", applet)); err != nil {
			return err
		}
	}
	return nil
}

func goCmd(ctx context.Context, goBin string, args ...string) error {
	cmd := exec.CommandContext(ctx, goBin, args...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %w\n%s", goBin, strings.Join(args, " "), err, out)
	}
	return nil
}

func copyFile(src, dst string, mode os.FileMode) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, data, mode)
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// guestOptions are how the guest is built and run.
type guestOptions struct {
	Dir         string // work directory: root tree, initramfs, logs
	Go          string
	Busybox     string
	Run         string // -test.run for every binary, "" for all
	Scale       int    // SMESH_TEST_SCALE
	TestTimeout time.Duration
	Timeout     time.Duration // the whole guest
	Memory      int           // MiB
	CPUs        int
	Accel       string
	Skip        map[string]map[string]string // step -> test -> why it is left out
	CPU         string                       // qemu -cpu
}

// runGuest boots the kernel with the initramfs under qemu and passes every
// line the guest writes to its results port (ttyS1) to line, as it comes.
// The kernel's console (ttyS0) goes to dir/console.log.
func runGuest(ctx context.Context, g guestOptions, k *kernel, initramfs string, line func(string)) error {
	ctx, cancel := context.WithTimeout(ctx, g.Timeout)
	defer cancel()
	console := filepath.Join(g.Dir, "console.log")
	args := []string{
		"-nodefaults", "-no-user-config", "-no-reboot",
		"-machine", "q35", "-accel", g.Accel, "-cpu", g.CPU,
		"-smp", fmt.Sprint(g.CPUs), "-m", fmt.Sprint(g.Memory),
		"-kernel", k.Image, "-initrd", initramfs,
		// panic=-1: a panic reboots, which -no-reboot turns into an exit.
		// tsc=reliable: on a busy host the clocksource watchdog finds the
		// emulated TSC "unstable" and moves to the HPET, where every
		// clock_gettime (the Go runtime makes many) is a slow syscall.
		"-append", "console=ttyS0 panic=-1 rdinit=/init tsc=reliable",
		"-display", "none", "-monitor", "none",
		"-serial", "file:" + console,
		"-chardev", "stdio,id=results,signal=off",
		"-serial", "chardev:results",
	}
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.Stdin = nil
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting qemu-system-x86_64 (install qemu-system-x86): %w", err)
	}
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		line(strings.TrimRight(sc.Text(), "\r"))
	}
	if err := sc.Err(); err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, os.ErrClosed) {
		cmd.Process.Kill()
	}
	err = cmd.Wait()
	if ctx.Err() == context.DeadlineExceeded {
		return fmt.Errorf("the guest did not finish within %s (-timeout); killed", g.Timeout)
	}
	if err != nil {
		return fmt.Errorf("qemu: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

// notInGuest are the tests the guest leaves out, and why. Emulation runs
// everything 15 to 30 times slower than the host, so the whole suite would
// take an hour: the guest runs the tests whose outcome depends on the
// kernel, and leaves those that check smeshd's userspace logic (the tunnel
// protocol, reloads, the admin endpoint, the bench) to `make test` on the
// host. The report lists them by name.
var notInGuest = map[string]map[string]string{
	"smeshd": {
		"TestBenchShort": "a benchmark run; the data paths it measures are tested one by one in e2e",
		"TestHandoverFromOlderBinary": "builds the predecessor smeshd from git with the Go toolchain, which the guest does not have: " +
			"the hand-over between builds is the same on every kernel as between two of this build (TestHandover*, TestUpgrade)",
	},
	"e2e": {
		"TestTunnelBadInput":    "the tunnel protocol's handling of bad input: userspace, and minutes of TLS handshakes under emulation",
		"TestTunnelIdleTimeout": "the tunnel's idle timers: userspace, and 20 s of waiting under emulation",
		"TestTunnelPeerRestart": "the tunnel's pool across a peer's restart: userspace (TLS connections); " +
			"smeshd's own restarts run in the guest as TestKilled*, TestHeartbeatAfterKill, TestUpgradeUnderLoad",
		"TestTunnelNoClearText":     "what crosses the wire is TLS: userspace; capture across nodes runs in the guest as TestTunnel",
		"TestTunnelShortBesideBulk": "the tunnel's scheduling of short connections beside a bulk one: userspace",
		"TestTunnelParked":          "relays parked in smeshd's own epoll set: userspace (TestTunnel covers the tunnel's kernel side)",
		"TestKubernetesLabels": "the pod informer against a real kube-apiserver and etcd, which the guest does not have: " +
			"userspace; pods' cgroups are attached as static ones are (TestPod*)",
		"TestKubernetesServices": "Services from a real kube-apiserver and etcd, which the guest does not have: " +
			"the translation in connect4/6 runs in the guest as TestService* (static services)",
		"TestRolloutInPodsKubernetes": "the rollout against a real kube-apiserver and etcd, which the guest does not have: " +
			"the same rollout with static pods runs in the guest as TestRolloutInPods",
		"TestPolicyKubernetes": "AuthorizationPolicies from a real kube-apiserver and etcd, which the guest does not have: " +
			"userspace; the same enforcement with smesh.toml policies is the host's TestPolicy, its kernel side datapath TestSameNodePolicy",
		"TestKubernetesStrict": "strict pods by label from a real kube-apiserver and etcd, which the guest does not have: " +
			"the kernel side runs in the guest as e2e TestStrictInbound and datapath TestStrict*",
		"TestPolicy": "compiling policies and the tunnel's decisions are userspace: " +
			"the kernel's verdict lookups in connect4/6 run in the guest as datapath TestSameNodePolicy",
		"TestPolicyHostPorts": "finding a unit's ports is userspace: " +
			"the kernel's lookup by namespace and port runs in the guest as datapath TestSameNodePolicyByPort",
		"TestStrictWorkloadAppears": "following cgroups that come and go is userspace: " +
			"the kernel side of strict inbound runs in the guest as datapath TestStrict* and e2e TestStrictInbound",
	},
}

// skipPattern is the -test.skip pattern of a step, "" for none.
func skipPattern(step string, skip map[string]map[string]string) string {
	names := slices.Sorted(maps.Keys(skip[step]))
	if len(names) == 0 {
		return ""
	}
	return "^(" + strings.Join(names, "|") + ")$"
}
