package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netns"

	"github.com/smesh-dev/smesh/pkg/certs"
	"github.com/smesh-dev/smesh/pkg/cgroups"
	"github.com/smesh-dev/smesh/pkg/sandbox"
)

// serverAddr is where each mode's bench server listens, inside the mode's
// own network namespace.
const serverAddr = "127.0.0.1:9000"

// proc is a process the bench started; stop kills it by its PID.
type proc struct {
	name   string
	cmd    *exec.Cmd
	stderr bytes.Buffer // read only after done
	done   chan struct{}
	err    error
}

func startProc(name string, cmd *exec.Cmd, cgroup, nsName string) (*proc, error) {
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	if cmd.Stderr == nil {
		cmd.Stderr = &p.stderr
	}
	if err := sandbox.Start(cmd, cgroup, nsName); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// failed describes how the process ended, with what it wrote to stderr.
func (p *proc) failed() error {
	<-p.done
	return fmt.Errorf("%s: %v: %s", p.name, p.err, strings.TrimSpace(p.stderr.String()))
}

func (p *proc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// modeEnv is one mode's world: a network namespace of its own, cgroups for
// the client, the server and smeshd, and (except for direct) a smeshd in
// that mode with the client's and server's cgroups enrolled.
type modeEnv struct {
	mode   string
	nsName string
	ns     netns.NsHandle
	dir    string // configuration
	mount  string
	// cgroups, all made by the bench and removed by close
	client, server, smeshdCg string
	made                     []string
	smeshd, srv              *proc
}

func newModeEnv(ctx context.Context, exe, mode string) (_ *modeEnv, err error) {
	e := &modeEnv{mode: mode, nsName: fmt.Sprintf("smesh-bench-%d-%s", os.Getpid(), mode), ns: netns.None()}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	if e.mount, err = cgroups.Mount(); err != nil {
		return nil, err
	}
	if e.dir, err = os.MkdirTemp("", e.nsName+"-"); err != nil {
		return nil, err
	}
	if e.ns, err = sandbox.NewNamedNetns(e.nsName); err != nil {
		return nil, err
	}
	// Connection-rate runs open thousands of connections a second: give
	// them the whole port range and let TIME_WAIT ports be reused.
	err = sandbox.InNetns(e.ns, func() error {
		if err := os.WriteFile("/proc/sys/net/ipv4/ip_local_port_range", []byte("1024 65535"), 0); err != nil {
			return err
		}
		return os.WriteFile("/proc/sys/net/ipv4/tcp_tw_reuse", []byte("1"), 0)
	})
	if err != nil {
		return nil, fmt.Errorf("tuning %s: %w", e.nsName, err)
	}
	for i, cg := range []*string{&e.client, &e.server, &e.smeshdCg} {
		*cg = filepath.Join(e.mount, fmt.Sprintf("%s-%s", e.nsName, []string{"client", "server", "smeshd"}[i]))
		if err := os.Mkdir(*cg, 0o755); err != nil {
			return nil, fmt.Errorf("creating cgroup: %w", err)
		}
		e.made = append(e.made, *cg)
	}
	if mode != "direct" {
		if err := e.startSmeshd(ctx, exe); err != nil {
			return nil, err
		}
	}
	if err := e.startServer(exe); err != nil {
		return nil, err
	}
	return e, nil
}

func (e *modeEnv) startSmeshd(ctx context.Context, exe string) error {
	rel := func(p string) string { r, _ := filepath.Rel(e.mount, p); return r }
	// The tunnel needs certificates even where the bench does not use it.
	if _, err := certs.Init(filepath.Join(e.dir, "tls"), []string{"bench"}, certs.DefaultTrustDomain); err != nil {
		return err
	}
	tlsDir := filepath.Join(e.dir, "tls")
	conf := fmt.Sprintf("[capture]\ncgroups = [%q, %q]\n[datapath]\nmode = %q\n[log]\nlevel = \"warn\"\nformat = \"json\"\n"+
		"[tunnel.tls]\ncert = %q\nkey = %q\nca = %q\n",
		rel(e.client), rel(e.server), e.mode,
		filepath.Join(tlsDir, "bench.crt"), filepath.Join(tlsDir, "bench.key"), filepath.Join(tlsDir, "ca.crt"))
	path := filepath.Join(e.dir, "smesh.toml")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		return err
	}
	// smeshd says it is ready the systemd way: READY=1 on NOTIFY_SOCKET.
	sockPath := filepath.Join(e.dir, "notify.sock")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer notify.Close()
	cmd := exec.Command(exe, "-c", path)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+sockPath)
	if e.smeshd, err = startProc("smeshd "+e.mode, cmd, e.smeshdCg, e.nsName); err != nil {
		return err
	}
	ready := make(chan error, 1)
	go func() {
		buf := make([]byte, 512)
		for {
			n, err := notify.Read(buf)
			if err != nil {
				ready <- err
				return
			}
			if strings.Contains(string(buf[:n]), "READY=1") {
				ready <- nil
				return
			}
		}
	}()
	select {
	case err := <-ready:
		return err
	case <-e.smeshd.done:
		return e.smeshd.failed()
	case <-time.After(20 * time.Second):
		return fmt.Errorf("smeshd (%s) not ready after 20s", e.mode)
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (e *modeEnv) startServer(exe string) error {
	cmd := exec.Command(exe, "bench-agent", "server", serverAddr)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if e.srv, err = startProc("bench server", cmd, e.server, e.nsName); err != nil {
		return err
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "ready\n" {
		return e.srv.failed()
	}
	return nil
}

// run runs one client workload and returns its sample.
func (e *modeEnv) run(ctx context.Context, exe, workload string, d time.Duration) (Sample, error) {
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, exe, "bench-agent", "client", workload, serverAddr, d.String())
	cmd.Stdout = &out
	p, err := startProc("bench client "+workload, cmd, e.client, e.nsName)
	if err != nil {
		return Sample{}, err
	}
	<-p.done
	if p.err != nil {
		return Sample{}, fmt.Errorf("%s, %s: %w", e.mode, workload, p.failed())
	}
	var s Sample
	if err := json.Unmarshal(out.Bytes(), &s); err != nil {
		return Sample{}, fmt.Errorf("%s, %s: %w", e.mode, workload, err)
	}
	return s, nil
}

// hold opens n connections from the client to the server and keeps them
// until release is called.
func (e *modeEnv) hold(exe string, n int) (release func() error, err error) {
	cmd := exec.Command(exe, "bench-agent", "hold", serverAddr, strconv.Itoa(n))
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	p, err := startProc("bench hold", cmd, e.client, e.nsName)
	if err != nil {
		return nil, err
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "held\n" {
		in.Close()
		return nil, p.failed()
	}
	return func() error {
		in.Close()
		<-p.done
		if p.err != nil {
			return p.failed()
		}
		return nil
	}, nil
}

// cpuUsage is the CPU time used so far by every process of this mode
// (client, server and smeshd), from cgroup v2's cpu.stat.
func (e *modeEnv) cpuUsage() (time.Duration, error) {
	var total time.Duration
	for _, cg := range e.made {
		data, err := os.ReadFile(filepath.Join(cg, "cpu.stat"))
		if err != nil {
			return 0, err
		}
		for line := range strings.Lines(string(data)) {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "usage_usec "); ok {
				us, err := strconv.ParseInt(v, 10, 64)
				if err != nil {
					return 0, err
				}
				total += time.Duration(us) * time.Microsecond
			}
		}
	}
	return total, nil
}

// smeshdMemory returns smeshd's resident and peak resident memory, in bytes.
func (e *modeEnv) smeshdMemory() (rss, peak int64, err error) {
	if e.smeshd == nil {
		return 0, 0, nil
	}
	return procMemory(e.smeshd.cmd.Process.Pid)
}

func procMemory(pid int) (rss, peak int64, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		k, v, _ := strings.Cut(s.Text(), ":")
		kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "VmRSS":
			rss = kb << 10
		case "VmHWM":
			peak = kb << 10
		}
	}
	return rss, peak, s.Err()
}

// close stops what the environment started and removes what it made.
func (e *modeEnv) close() error {
	var errs []error
	for _, p := range []*proc{e.srv, e.smeshd} {
		if p != nil {
			p.stop()
		}
	}
	for _, cg := range e.made {
		if err := cgroups.Remove(cg, 5*time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	if e.ns.IsOpen() {
		e.ns.Close()
	}
	if err := sandbox.DeleteNamedNetns(e.nsName); err != nil {
		errs = append(errs, err)
	}
	if e.dir != "" {
		os.RemoveAll(e.dir)
	}
	return errors.Join(errs...)
}
