package deploy

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
	appsv1 "k8s.io/api/apps/v1"

	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// capsHelperEnv makes the test binary run capsHelper instead of the tests:
// the test starts it through setpriv with a chosen capability set.
const capsHelperEnv = "SMESH_DEPLOY_CAPS_HELPER"

func TestMain(m *testing.M) {
	if mode, ok := os.LookupEnv(capsHelperEnv); ok {
		fmt.Println(capsHelper(mode, os.Args[len(os.Args)-2:]))
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// capsHelper does what smeshd does with its privileges, and says "ok" or
// what failed:
//
//	netns PID _        enter the network namespace of process PID, as smeshd
//	                   does to listen in a pod (enrol: /proc/PID/ns/net, setns)
//	datapath OWN CG    load the data path with OWN as smeshd's cgroup, attach
//	                   it to CG, and probe the bounded splice
func capsHelper(mode string, args []string) string {
	switch mode {
	case "netns":
		pid, _ := strconv.Atoi(args[0])
		fd, err := unix.Open(fmt.Sprintf("/proc/%d/ns/net", pid), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return "open: " + err.Error()
		}
		defer unix.Close(fd)
		res := make(chan string, 1)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
			if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
				res <- "setns: " + err.Error()
				return
			}
			ln, err := net.Listen("tcp4", "127.0.0.1:0")
			if err != nil {
				res <- "listen: " + err.Error()
				return
			}
			ln.Close()
			res <- "ok"
		}()
		return <-res
	case "datapath":
		features := datapath.Probe()
		if err := datapath.Missing(features, "bounded splice"); err != nil {
			return "probe: " + err.Error()
		}
		d, err := datapath.Load(datapath.Options{
			Mode:             datapath.ModeSplice,
			ProxyAddr:        netip.MustParseAddrPort("127.0.0.1:18000"),
			ProxyAddr6:       netip.MustParseAddrPort("[::1]:18000"),
			ProxyCgroup:      args[0],
			IncludeCIDRs:     []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")},
			MapSize:          1024,
			SpliceProxyHops:  true,
			SpliceQueueLimit: 2 << 20,
			Logger:           zerolog.Nop(),
		})
		if err != nil {
			return "load: " + err.Error()
		}
		defer d.Close()
		if err := d.SetCapture([]string{args[1]}, []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}, nil, nil); err != nil {
			return "attach: " + err.Error()
		}
		return "ok"
	}
	return "unknown mode " + mode
}

// TestDaemonSetCapabilities runs, with exactly the DaemonSet's
// capabilities (setpriv's bounding set; root's effective set follows it),
// what smeshd does with them: load and attach the data path, and enter the
// network namespace of a pod's process that runs as another user (the
// pause container's 65535). Then, one capability less at a time, it shows
// each is needed.
func TestDaemonSetCapabilities(t *testing.T) {
	testenv.RequirePrivileged(t)
	setpriv := testenv.RequireCommand(t, "setpriv")
	unshare := testenv.RequireCommand(t, "unshare")
	// The data path's helper loads the bounded sk_msg program, the one
	// that needs CAP_PERFMON.
	if err := datapath.Missing(datapath.ProbeModes(), "bounded splice"); err != nil {
		testenv.SkipOrFail(t, "this kernel cannot bound spliced queues (Linux %s): %v", datapath.KernelRelease(), err)
	}
	ds := find[*appsv1.DaemonSet](t, objects(t), "smeshd")
	var caps []string
	for _, c := range smeshdContainer(t, ds).SecurityContext.Capabilities.Add {
		caps = append(caps, strings.ToLower(string(c)))
	}

	// A pod's process: its own network namespace, another user.
	pod := exec.Command(unshare, "--net", "--", setpriv, "--reuid=65535", "--regid=65535", "--clear-groups", "sleep", "60")
	pod.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := pod.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pod.Process.Kill(); pod.Wait() })
	pid := strconv.Itoa(pod.Process.Pid)
	deadline := time.Now().Add(5 * time.Second)
	for {
		comm, _ := os.ReadFile("/proc/" + pid + "/comm")
		status, _ := os.ReadFile("/proc/" + pid + "/status")
		if string(comm) == "sleep\n" && strings.Contains(string(status), "\nUid:\t65535") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the pod process did not start: %q", comm)
		}
		time.Sleep(10 * time.Millisecond)
	}
	own, enrolled := testenv.NewCgroup(t), testenv.NewCgroup(t)

	run := func(caps []string, mode string, args ...string) string {
		t.Helper()
		bset := "-all"
		for _, c := range caps {
			bset += ",+" + c
		}
		argv := append([]string{"--bounding-set=" + bset, "--inh-caps=-all", "--", os.Args[0], "-test.run=^$"}, args...)
		cmd := exec.Command(setpriv, argv...)
		cmd.Env = append(os.Environ(), capsHelperEnv+"="+mode)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("helper %v: %v\n%s", args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	without := func(set []string, drop ...string) []string {
		return slices.DeleteFunc(slices.Clone(set), func(x string) bool { return slices.Contains(drop, x) })
	}

	if got := run(caps, "netns", pid, "_"); got != "ok" {
		t.Errorf("entering a pod's network namespace with %v: %s", caps, got)
	}
	if got := run(caps, "datapath", own, enrolled); got != "ok" {
		t.Errorf("loading and attaching the data path with %v: %s", caps, got)
	}
	// CAP_SYS_ADMIN also passes the kernel's bpf_capable(),
	// perfmon_capable() and bpf_net_capable() checks, so the data path's
	// own three are shown needed without it (as under the systemd unit,
	// which has no CAP_SYS_ADMIN); the namespace entry's two with all
	// the others.
	dataPath := without(caps, "sys_admin", "sys_ptrace")
	if got := run(dataPath, "datapath", own, enrolled); got != "ok" {
		t.Errorf("loading and attaching the data path with %v: %s", dataPath, got)
	}
	for _, tc := range []struct {
		from       []string
		drop, mode string
		want       string
	}{
		// Opening /proc/PID/ns/net of another user's process is a
		// ptrace access check.
		{caps, "sys_ptrace", "netns", "open: permission denied"},
		{caps, "sys_admin", "netns", "setns: operation not permitted"},
		{dataPath, "bpf", "datapath", "probe: "},
		{dataPath, "net_admin", "datapath", "probe: "},
		// The bounded splice's program reads kernel structures.
		{dataPath, "perfmon", "datapath", "probe: bounded splice"},
	} {
		args := []string{pid, "_"}
		if tc.mode == "datapath" {
			args = []string{own, enrolled}
		}
		set := without(tc.from, tc.drop)
		if got := run(set, tc.mode, args...); !strings.HasPrefix(got, tc.want) {
			t.Errorf("with %v (no %s), %s: %q, want %q...: is %s still needed?", set, tc.drop, tc.mode, got, tc.want, tc.drop)
		}
	}
}
