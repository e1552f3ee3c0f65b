package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/smesh-dev/smesh/pkg/cgroups"
	"github.com/smesh-dev/smesh/pkg/procmem"
	"github.com/smesh-dev/smesh/pkg/testenv"
	"github.com/smesh-dev/smesh/pkg/testenv/kubecp"
)

// smeshd is one smeshd process, alone in a cgroup the benchmark made, so
// that the cgroup's cpu.stat is its CPU and /proc/PID its memory.
type smeshd struct {
	cmd     *exec.Cmd
	cgroup  string
	admin   string // host:port
	started time.Time
	exited  chan struct{}
	listed  chan time.Time // when smeshd logged its first set of pods
}

// smeshdConfig is the ConfigMap's smesh.toml (deploy/kubernetes/configmap.yaml)
// with what must differ on a shared machine: loopback ports of its own, a
// pin directory of its own, the development certificates' paths.
const smeshdConfig = `[capture]
cgroups = []
include_cidrs = ["198.18.0.0/15"]
on_failure = "open"
pin_dir = "/sys/fs/bpf/%[1]s"

[outbound]
listen = "127.0.0.1:%[2]d"
listen6 = "[::1]:%[2]d"

[tunnel]
listen = "127.0.0.1:%[3]d"

[tunnel.tls]
source = "files"
cert = "%[4]s/node.crt"
key = "%[4]s/node.key"
ca = "%[4]s/ca.crt"

[admin]
listen = "127.0.0.1:%[5]d"

[log]
format = "json"

[kubernetes]
enabled = true
node_name_env = "NODE_NAME"
label = "smesh.dev/mesh=enabled"
`

// startSmeshd starts smeshd as the DaemonSet runs it: NODE_NAME set, the
// service account's token, ca.crt and namespace where client-go's
// in-cluster configuration reads them (a tmpfs on /run in a mount
// namespace of its own: the host's /run is not touched), and the API
// server at KUBERNETES_SERVICE_HOST:PORT, here the counting proxy.
func startSmeshd(o options, dir, token string, caPEM []byte, apiAddr string) (*smeshd, error) {
	name := testenv.Unique("smesh-test-kubescale")
	sdir := filepath.Join(dir, name)
	if err := os.MkdirAll(filepath.Join(sdir, "sa"), 0o755); err != nil {
		return nil, err
	}
	if err := kubecp.WriteServiceAccount(filepath.Join(sdir, "sa"), "smesh-system", token, caPEM); err != nil {
		return nil, err
	}
	tls := filepath.Join(sdir, "tls")
	if out, err := exec.Command(o.smeshd, "certs", "init", "--dir", tls, "--nodes", "node").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("smeshd certs init: %w: %s", err, out)
	}
	ports := make([]int, 3)
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ports[i] = l.Addr().(*net.TCPAddr).Port
		l.Close()
	}
	cfg := filepath.Join(sdir, "smesh.toml")
	if err := os.WriteFile(cfg, fmt.Appendf(nil, smeshdConfig, name, ports[0], ports[1], tls, ports[2]), 0o644); err != nil {
		return nil, err
	}
	mount, err := cgroups.Mount()
	if err != nil {
		return nil, err
	}
	s := &smeshd{cgroup: filepath.Join(mount, name), admin: "127.0.0.1:" + strconv.Itoa(ports[2]),
		exited: make(chan struct{}), listed: make(chan time.Time, 1)}
	if err := os.Mkdir(s.cgroup, 0o755); err != nil {
		return nil, err
	}
	cg, err := os.Open(s.cgroup)
	if err != nil {
		os.Remove(s.cgroup)
		return nil, err
	}
	defer cg.Close()
	host, port, err := net.SplitHostPort(apiAddr)
	if err != nil {
		os.Remove(s.cgroup)
		return nil, err
	}
	apiPort, err := strconv.Atoi(port)
	if err != nil {
		os.Remove(s.cgroup)
		return nil, fmt.Errorf("API server port %q: %w", port, err)
	}
	// The PID started is smeshd's (see kubecp.InPod).
	args := append(kubecp.InPod("unshare", filepath.Join(sdir, "sa"), ownNode, host, apiPort), o.smeshd, "-c", cfg)
	s.cmd = exec.Command(args[0], args[1:]...)
	s.cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd()), Pdeathsig: syscall.SIGKILL}
	logFile, err := os.Create(filepath.Join(sdir, "smeshd.log"))
	if err != nil {
		os.Remove(s.cgroup)
		return nil, err
	}
	stderr, err := s.cmd.StderrPipe()
	if err != nil {
		os.Remove(s.cgroup)
		return nil, err
	}
	s.cmd.Stdout = logFile
	s.started = time.Now()
	if err := s.cmd.Start(); err != nil {
		os.Remove(s.cgroup)
		return nil, fmt.Errorf("starting smeshd: %w", err)
	}
	// os/exec: Wait closes the pipe, so it must not run before the reader
	// has read everything; otherwise smeshd's last lines can be lost.
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		defer logFile.Close()
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		seen := false
		for sc.Scan() {
			line := sc.Text()
			fmt.Fprintln(logFile, line)
			if !seen && strings.Contains(line, `"pods in the mesh changed"`) {
				seen = true
				s.listed <- time.Now()
			}
		}
		io.Copy(io.Discard, stderr)
	}()
	go func() {
		<-drained
		s.cmd.Wait()
		close(s.exited)
	}()
	return s, nil
}

func (s *smeshd) pid() int { return s.cmd.Process.Pid }

// waitReady polls /readyz until it answers 200 and returns how long
// smeshd took from its start.
func (s *smeshd) waitReady(ctx context.Context, timeout time.Duration) (time.Duration, error) {
	hc := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case <-s.exited:
			return 0, fmt.Errorf("smeshd exited before it was ready: %v", s.cmd.ProcessState)
		case <-ctx.Done():
			return 0, ctx.Err()
		default:
		}
		resp, err := hc.Get("http://" + s.admin + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return time.Since(s.started), nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return 0, fmt.Errorf("smeshd not ready after %s", timeout)
}

// stop ends smeshd by its PID (SIGTERM, then SIGKILL) and removes its
// cgroup, killing whatever is left in it.
func (s *smeshd) stop() error {
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(45 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
	if err := cgroups.Remove(s.cgroup, 10*time.Second); err != nil {
		return fmt.Errorf("removing smeshd's cgroup: %w", err)
	}
	return nil
}

// cpu is the CPU time smeshd's cgroup used so far.
func (s *smeshd) cpu() (time.Duration, error) {
	data, err := os.ReadFile(filepath.Join(s.cgroup, "cpu.stat"))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "usage_usec "); ok {
			us, err := strconv.ParseInt(v, 10, 64)
			return time.Duration(us) * time.Microsecond, err
		}
	}
	return 0, errors.New("no usage_usec in cpu.stat")
}

// memory is smeshd's resident set and its peak, from /proc/PID/status.
func (s *smeshd) memory() (rss, peak int64, err error) {
	m, err := procmem.Of(s.pid())
	return m.RSS, m.Peak, err
}

// heap is smeshd's Go heap in use, from its own /metrics.
func (s *smeshd) heap() int64 {
	resp, err := http.Get("http://" + s.admin + "/metrics")
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "go_memstats_heap_inuse_bytes "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return int64(f)
		}
	}
	return 0
}

// measure starts smeshd in the cluster as it is and fills r.
func measure(ctx context.Context, o options, w *world, cp *kubecp.ControlPlane, token string,
	proxy *countingProxy, audit *audit, dir string, r *result) error {
	auditFrom, err := audit.offset()
	if err != nil {
		return err
	}
	bytes0 := proxy.down.Load()
	s, err := startSmeshd(o, dir, token, cp.CA(), proxy.addr())
	if err != nil {
		return err
	}
	defer func() {
		if err := s.stop(); err != nil {
			w.logf("%v", err)
		}
	}()
	if r.ready, err = s.waitReady(ctx, 2*time.Minute); err != nil {
		return err
	}
	select {
	case t := <-s.listed:
		r.listed = t.Sub(s.started)
	default:
	}
	// What the first list brought, before anything changes.
	time.Sleep(2 * time.Second)
	r.readyBytes = proxy.down.Load() - bytes0
	m, err := procmem.Of(s.pid())
	if err != nil {
		return err
	}
	r.readyRSS, r.readyFile = m.RSS, m.File
	r.readyHeap = s.heap()
	w.logf("smeshd ready in %s, RSS %s", r.ready.Round(time.Millisecond), mib(r.readyRSS))

	phases := []struct {
		name string
		refs []podRef
		out  *phase
	}{
		{"idle", nil, &r.idle},
		{"churn on other nodes", w.other, &r.other},
		{"churn on smeshd's node", w.own, &r.own},
	}
	for _, p := range phases {
		w.logf("%s for %s", p.name, o.window)
		b0, cpu0 := proxy.down.Load(), must(s.cpu())
		if p.refs == nil {
			select {
			case <-time.After(o.window):
			case <-ctx.Done():
				return ctx.Err()
			}
		} else {
			n, err := w.churn(ctx, p.refs, o.rate, o.window)
			if err != nil {
				return fmt.Errorf("%s: %w", p.name, err)
			}
			p.out.changes = n
		}
		// Events in flight when the window closed.
		time.Sleep(500 * time.Millisecond)
		p.out.cpu = must(s.cpu()) - cpu0
		p.out.bytes = proxy.down.Load() - b0
		rss, _, err := s.memory()
		if err != nil {
			return err
		}
		p.out.rss = rss
		w.logf("%s: %d changes, smeshd CPU %s, %d bytes received, RSS %s", p.name, p.out.changes, p.out.cpu, p.out.bytes, mib(rss))
	}
	_, r.peakRSS, _ = s.memory()
	r.totalBytes = proxy.down.Load() - bytes0
	r.requests, err = audit.requests(auditFrom)
	if err != nil {
		return err
	}
	select {
	case <-s.exited:
		return errors.New("smeshd exited during the measurement")
	default:
	}
	return nil
}

func must(d time.Duration, err error) time.Duration {
	if err != nil {
		return 0
	}
	return d
}
