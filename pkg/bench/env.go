package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
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
	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/procmem"
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

// modeEnv is one mode's world: its own network namespaces ("nodes"),
// cgroups for the client, the server and smeshd, and the smeshd(s) of the
// mode. Same-node modes (direct, copy, splice) have one node, the server on
// its loopback; cross-node modes (veth, tunnel) two nodes joined by a veth,
// the client on the first and the server on the second.
type modeEnv struct {
	mode string
	// nodes are where the client (first) and the server (last) run; for
	// the pod modes, the client's and the server's pods.
	nodes      []benchNode
	dir        string // configuration, certificates
	mount      string
	client     string // cgroups
	server     string
	serverAddr string // where the server listens
	// dialAddr is what the client connects to: serverAddr, or the
	// Service address in front of it (the service modes).
	dialAddr string
	// smeshdConf is added to the configuration of the mode's smeshd
	// (the service modes' [[services]]).
	smeshdConf string
	// intruder is a cgroup beside the client's, in its network
	// namespace, whose identity the policy modes' rules do not allow:
	// its probe shows they are in force ("" outside the policy worlds).
	intruder string
	made     []string // every cgroup made, removed by close
	smeshds  []*proc
	srv      *proc
	cluster  *sandbox.ClusterNode // of the pod modes
	clusterB *sandbox.ClusterNode // the server's node (tunnel-pods modes)
	pauses   []*proc              // the pods' pause processes (pods mode)
}

type benchNode struct {
	name string
	ns   netns.NsHandle
	pod  bool // a pod's namespace: the cluster node deletes it
}

// crossNode says whether a mode runs between two nodes.
func crossNode(mode string) bool { return mode == "veth" || mode == "tunnel" || podsAcross(mode) }

// podsAcross says whether a mode runs between pods of two nodes, through
// the tunnel: the client's pod on one node, the server's on the other.
func podsAcross(mode string) bool { return mode == "tunnel-pods" || mode == "tunnel-pods-policy" }

// podMode says whether a mode runs between two pods on one node's bridge.
func podMode(mode string) bool {
	return mode == "bridge" || mode == "pods" || mode == "pods-policy" || serviceMode(mode)
}

// serviceMode says whether the client of a pod mode connects to a
// ClusterIP in front of the server pod rather than to the pod itself.
func serviceMode(mode string) bool { return mode == "bridge-svc" || mode == "pods-svc" }

// serviceVIP is the ClusterIP of the service modes: in 198.18.0.0/15, apart
// from the pod subnets (198.18.250.0-198.19.246.0) and the cross-node /24s.
// Every mode has its own node, maps and rules, so runs side by side do not
// meet on it.
var serviceVIP = netip.MustParseAddrPort("198.19.255.10:80")

// IdlePods is how many idle enrolled pods the pods mode adds, so that its
// smeshd serves as many namespaces as a busy Kubernetes node has pods.
const IdlePods = 100

// identities says whether a mode's workloads get identities: the policy
// modes' and, in a run that has them, their bases', so that the rules are
// all that differs between the two.
func identities(mode string, opts Options) bool {
	return opts.PolicyRules > 0 && (policyMode(mode) || mode == "pods" || mode == "tunnel-pods")
}

func newModeEnv(ctx context.Context, exe, mode string, opts Options) (_ *modeEnv, err error) {
	kubeProxy := opts.KubeProxy
	e := &modeEnv{mode: mode, serverAddr: serverAddr}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	if e.mount, err = cgroups.Mount(); err != nil {
		return nil, err
	}
	base := fmt.Sprintf("smesh-bench-%d-%s", os.Getpid(), mode)
	if e.dir, err = os.MkdirTemp("", base+"-"); err != nil {
		return nil, err
	}
	if podsAcross(mode) {
		if err := e.setUpPodsAcross(ctx, exe, base, opts); err != nil {
			return nil, err
		}
		return e, nil
	}
	if podMode(mode) {
		if err := e.setUpPods(ctx, exe, base, kubeProxy, opts); err != nil {
			return nil, err
		}
		return e, nil
	}
	names := []string{base}
	if crossNode(mode) {
		names = []string{base + "-a", base + "-b"}
	}
	for _, name := range names {
		if err := e.addNode(name); err != nil {
			return nil, err
		}
	}
	client, server := e.nodes[0], e.nodes[len(e.nodes)-1]
	if crossNode(mode) {
		// A /24 of 198.18.0.0/15 (reserved for benchmarks) per bench run.
		subnet := 100 + os.Getpid()%150
		a := netip.MustParsePrefix(fmt.Sprintf("198.18.%d.1/24", subnet))
		b := netip.MustParsePrefix(fmt.Sprintf("198.18.%d.2/24", subnet))
		if err := sandbox.Veth(client.ns, server.ns, "eth0", "eth0", a, b); err != nil {
			return nil, fmt.Errorf("linking the bench nodes: %w", err)
		}
		e.serverAddr = netip.AddrPortFrom(b.Addr(), 9000).String()
	}
	if e.client, err = e.cgroup("client"); err != nil {
		return nil, err
	}
	if e.server, err = e.cgroup("server"); err != nil {
		return nil, err
	}
	switch mode {
	case "copy", "splice":
		err = e.startSmeshd(ctx, exe, client, "smeshd", mode, e.client, e.server)
	case "tunnel":
		// Both ends splice their local hop; the bytes between the nodes
		// cross the mTLS tunnel.
		if _, err = certs.Init(filepath.Join(e.dir, "tls"), []string{"a", "b"}, certs.DefaultTrustDomain); err != nil {
			return nil, err
		}
		if err = e.startSmeshd(ctx, exe, client, "a", "splice", e.client); err == nil {
			err = e.startSmeshd(ctx, exe, server, "b", "splice", e.server)
		}
	}
	if err != nil {
		return nil, err
	}
	if err := e.startServer(exe, server); err != nil {
		return nil, err
	}
	e.dialAddr = e.serverAddr
	return e, nil
}

func (e *modeEnv) addNode(name string) error {
	ns, err := sandbox.NewNamedNetns(name)
	if err != nil {
		return err
	}
	e.nodes = append(e.nodes, benchNode{name: name, ns: ns})
	// Connection-rate runs open thousands of connections a second: give
	// them the whole port range and let TIME_WAIT ports be reused.
	err = sandbox.InNetns(ns, func() error {
		if err := os.WriteFile("/proc/sys/net/ipv4/ip_local_port_range", []byte("1024 65535"), 0); err != nil {
			return err
		}
		return os.WriteFile("/proc/sys/net/ipv4/tcp_tw_reuse", []byte("1"), 0)
	})
	if err != nil {
		return fmt.Errorf("tuning %s: %w", name, err)
	}
	return nil
}

func (e *modeEnv) cgroup(role string) (string, error) {
	cg := filepath.Join(e.mount, fmt.Sprintf("smesh-bench-%d-%s-%s", os.Getpid(), e.mode, role))
	if err := os.Mkdir(cg, 0o755); err != nil {
		return "", fmt.Errorf("creating cgroup: %w", err)
	}
	e.made = append(e.made, cg)
	return cg, nil
}

// startSmeshd starts a smeshd on node n in datapath mode dpMode with the
// given cgroups enrolled, and waits until it is ready. name is its
// certificate's name in e.dir/tls (made here if missing).
func (e *modeEnv) startSmeshd(ctx context.Context, exe string, n benchNode, name, dpMode string, enrolled ...string) error {
	own, err := e.cgroup(name + "-smeshd")
	if err != nil {
		return err
	}
	tlsDir := filepath.Join(e.dir, "tls")
	if _, err := os.Stat(filepath.Join(tlsDir, name+".crt")); err != nil {
		// The tunnel needs certificates even where the bench does not use it.
		if _, err := certs.Init(tlsDir, []string{name}, certs.DefaultTrustDomain); err != nil {
			return err
		}
	}
	var cgs []string
	for _, cg := range enrolled {
		rel, _ := filepath.Rel(e.mount, cg)
		cgs = append(cgs, fmt.Sprintf("%q", rel))
	}
	conf := fmt.Sprintf("[capture]\ncgroups = [%s]\n[datapath]\nmode = %q\n[log]\nlevel = \"warn\"\nformat = \"json\"\n"+
		"[tunnel]\nmax_connections = 65536\n[tunnel.tls]\ncert = %q\nkey = %q\nca = %q\n%s",
		strings.Join(cgs, ", "), dpMode,
		filepath.Join(tlsDir, name+".crt"), filepath.Join(tlsDir, name+".key"), filepath.Join(tlsDir, "ca.crt"), e.smeshdConf)
	path := filepath.Join(e.dir, name+".toml")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		return err
	}
	// smeshd says it is ready the systemd way: READY=1 on NOTIFY_SOCKET.
	sockPath := filepath.Join(e.dir, name+".sock")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer notify.Close()
	cmd := exec.Command(exe, "-c", path)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+sockPath)
	p, err := startProc("smeshd "+e.mode+" "+name, cmd, own, n.name)
	if err != nil {
		return err
	}
	e.smeshds = append(e.smeshds, p)
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
	case <-p.done:
		return p.failed()
	case <-time.After(20 * time.Second):
		return fmt.Errorf("smeshd (%s) not ready after 20s", e.mode)
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (e *modeEnv) startServer(exe string, n benchNode) error {
	cmd := exec.Command(exe, "bench-agent", "server", e.serverAddr)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if e.srv, err = startProc("bench server", cmd, e.server, n.name); err != nil {
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
	cmd := exec.CommandContext(ctx, exe, "bench-agent", "client", workload, e.dialAddr, d.String())
	cmd.Stdout = &out
	p, err := startProc("bench client "+workload, cmd, e.client, e.nodes[0].name)
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
	cmd := exec.Command(exe, "bench-agent", "hold", e.dialAddr, strconv.Itoa(n))
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	p, err := startProc("bench hold", cmd, e.client, e.nodes[0].name)
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

// spliceStats reads the splice counters of the mode's first smeshd (the
// client side's) from the maps it holds: the bench asks smeshd nothing.
// Zero without one.
func (e *modeEnv) spliceStats() (datapath.Stats, error) {
	if len(e.smeshds) == 0 {
		return datapath.Stats{}, nil
	}
	return datapath.StatsOf(e.smeshds[0].cmd.Process.Pid)
}

// smeshdMemory returns the resident and peak resident memory of the mode's
// first smeshd (the client side's), in bytes; zero without one.
func (e *modeEnv) smeshdMemory() (rss, peak int64, err error) {
	if len(e.smeshds) == 0 {
		return 0, 0, nil
	}
	m, err := procmem.Of(e.smeshds[0].cmd.Process.Pid)
	return m.RSS, m.Peak, err
}

// smeshdsMemory returns the memory of every smeshd of the mode, the
// client's node first (cross-node modes: the sending node, then the
// receiving one).
func (e *modeEnv) smeshdsMemory() ([]procmem.Memory, error) {
	var out []procmem.Memory
	for _, p := range e.smeshds {
		m, err := procmem.Of(p.cmd.Process.Pid)
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, nil
}

// close stops what the environment started and removes what it made.
func (e *modeEnv) close() error {
	var errs []error
	if e.srv != nil {
		e.srv.stop()
	}
	for _, p := range e.smeshds {
		p.stop()
	}
	for _, p := range e.pauses {
		p.stop()
	}
	for _, cg := range e.made {
		if err := cgroups.Remove(cg, 5*time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	for _, n := range e.nodes {
		if n.pod {
			continue
		}
		n.ns.Close()
		if err := sandbox.DeleteNamedNetns(n.name); err != nil {
			errs = append(errs, err)
		}
	}
	if e.cluster != nil {
		errs = append(errs, e.cluster.Close())
	}
	if e.clusterB != nil {
		errs = append(errs, e.clusterB.Close())
	}
	if e.dir != "" {
		os.RemoveAll(e.dir)
	}
	return errors.Join(errs...)
}

// setUpPods builds the world of the pod modes: a node with a bridge and
// two pods on it, the client's and the server's, as a CNI bridge plugin
// makes them. "bridge" leaves them out of the mesh: the no-mesh baseline a
// Kubernetes user has. "pods" enrols both, and IdlePods more pods that only
// wait, under a smeshd in the node's namespace. The service modes are the
// same two worlds with the client dialling serviceVIP: "bridge-svc"
// through kube-proxy's DNAT on the node (kubeProxyRules), "pods-svc"
// translated by smesh in connect4 (a [[services]] entry). kubeProxy puts
// kube-proxy's rules on the node of the other pod modes too.
func (e *modeEnv) setUpPods(ctx context.Context, exe, base string, kubeProxy bool, opts Options) (err error) {
	// A /24 of 198.18.0.0/15 (reserved for benchmarks) per run and mode,
	// apart from the cross-node modes' (100-249).
	subnet := 250 + os.Getpid()%250
	switch e.mode {
	case "pods":
		subnet = (subnet + 1) % 512
	case "bridge-svc":
		subnet = (subnet + 2) % 512
	case "pods-svc":
		subnet = (subnet + 3) % 512
	case "pods-policy":
		subnet = (subnet + 4) % 512
	}
	v4 := netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18 + byte(subnet/256), byte(subnet % 256), 0}), 24)
	v6 := netip.MustParsePrefix(fmt.Sprintf("fd00:5e:be:%x::/64", subnet))
	if e.cluster, err = sandbox.NewClusterNode(base, v4, v6); err != nil {
		return err
	}
	parent, err := e.cgroup("pods")
	if err != nil {
		return err
	}
	var pods []*sandbox.Pod
	for _, role := range []string{"client", "server"} {
		p, err := e.cluster.AddPod(base+"-"+role, filepath.Join(parent, role))
		if err != nil {
			return err
		}
		pods = append(pods, p)
		e.nodes = append(e.nodes, benchNode{name: p.Name, ns: p.Netns(), pod: true})
	}
	e.client, e.server = pods[0].Cgroup, pods[1].Cgroup
	e.serverAddr = netip.AddrPortFrom(pods[1].Addr4, 9000).String()
	e.dialAddr = e.serverAddr
	if serviceMode(e.mode) {
		e.dialAddr = serviceVIP.String()
	}
	if e.mode == "bridge-svc" || kubeProxy {
		if err := e.kubeProxyRules(pods[1].Addr4); err != nil {
			return err
		}
	}
	if e.mode == "pods-svc" {
		e.smeshdConf = fmt.Sprintf("[[services]]\nname = \"bench\"\nvip = %q\nport = %d\nbackends = [%q]\n",
			serviceVIP.Addr(), serviceVIP.Port(), e.serverAddr)
	}
	// Connection-rate runs: the whole port range, TIME_WAIT ports reused.
	for _, kv := range [][2]string{{"net/ipv4/ip_local_port_range", "1024 65535"}, {"net/ipv4/tcp_tw_reuse", "1"}} {
		if err := sandbox.SetSysctl(pods[0].Netns(), kv[0], kv[1]); err != nil {
			return err
		}
	}
	if identities(e.mode, opts) {
		// The intruder lives in the client's pod, in a cgroup of its own;
		// the server's pod keeps one identity, so that smeshd knows its
		// address as the server workload's (docs/identity.md 5.2).
		e.intruder = filepath.Join(parent, "intruder")
		if err := os.Mkdir(e.intruder, 0o755); err != nil {
			return fmt.Errorf("creating cgroup: %w", err)
		}
		e.smeshdConf += workloadConf(e.client, clientIdentity) + workloadConf(e.server, serverIdentity) +
			workloadConf(e.intruder, intruderIdentity)
		if policyMode(e.mode) {
			e.smeshdConf += PolicyRules(opts.PolicyRules, opts.PolicyDenyClient)
		}
	}
	if e.mode == "pods" || e.mode == "pods-svc" || e.mode == "pods-policy" {
		for i := range IdlePods {
			p, err := e.cluster.AddPod(fmt.Sprintf("%s-idle%d", base, i), filepath.Join(parent, fmt.Sprintf("idle%d", i)))
			if err != nil {
				return err
			}
			pods = append(pods, p)
		}
		// Every pod has a process from start to end, as a Kubernetes
		// pod has its pause container: smeshd serves the namespaces its
		// enrolled processes live in, also between two client runs.
		for _, p := range pods {
			pause, err := startProc("pause", exec.Command(exe, "bench-agent", "pause", "-"), p.Cgroup, p.Name)
			if err != nil {
				return err
			}
			e.pauses = append(e.pauses, pause)
		}
		node := benchNode{name: e.cluster.Name, ns: e.cluster.Netns(), pod: true}
		if err := e.startSmeshd(ctx, exe, node, "smeshd", "splice", parent); err != nil {
			return err
		}
	}
	return e.startServer(exe, e.nodes[1])
}

// setUpPodsAcross builds the world of the tunnel-pods modes: two cluster
// nodes joined by a wire, the client's pod on the first, the server's on
// the second, each node's pods enrolled under a smeshd of its own, as
// pods on two Kubernetes nodes. The connection crosses the mTLS tunnel to
// the smeshd of the server's node, which serves the tunnel inside the
// server's pod (a namespace of one workload: a policy destination, unlike
// the tunnel mode's server, which shares its node's namespace with smeshd
// and so is no workload). Every workload has an identity; node a may
// assert the bench's (a [[tunnel.tls.peers]] entry of node b), and the
// policy mode puts the rules in node b's smesh.toml.
func (e *modeEnv) setUpPodsAcross(ctx context.Context, exe, base string, opts Options) (err error) {
	// Two /24s of 198.18.0.0/15 apart from the other pod modes' (they
	// take 250-503 and their offsets), a wire /30 below the service VIP.
	subnet := 250 + os.Getpid()%250
	var nodes [2]*sandbox.ClusterNode
	for i, name := range []string{"a", "b"} {
		s := (subnet + 5 + i) % 512
		v4 := netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18 + byte(s/256), byte(s % 256), 0}), 24)
		v6 := netip.MustParsePrefix(fmt.Sprintf("fd00:5e:be:%x::/64", s))
		if nodes[i], err = sandbox.NewClusterNode(base+"-"+name, v4, v6); err != nil {
			return err
		}
		if i == 0 {
			e.cluster = nodes[i]
		} else {
			e.clusterB = nodes[i]
		}
	}
	k := os.Getpid() % 60
	wire4 := netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, 254, byte(4 * k)}), 30)
	wire6 := netip.MustParsePrefix(fmt.Sprintf("fd00:5e:bf:%x::/126", os.Getpid()%4096))
	if _, _, err := sandbox.JoinNodes(nodes[0], nodes[1], wire4, wire6); err != nil {
		return err
	}
	parentA, err := e.cgroup("pods-a")
	if err != nil {
		return err
	}
	parentB, err := e.cgroup("pods-b")
	if err != nil {
		return err
	}
	client, err := nodes[0].AddPod(base+"-client", filepath.Join(parentA, "client"))
	if err != nil {
		return err
	}
	server, err := nodes[1].AddPod(base+"-server", filepath.Join(parentB, "server"))
	if err != nil {
		return err
	}
	e.nodes = []benchNode{{name: client.Name, ns: client.Netns(), pod: true}, {name: server.Name, ns: server.Netns(), pod: true}}
	e.client, e.server = client.Cgroup, server.Cgroup
	e.serverAddr = netip.AddrPortFrom(server.Addr4, serverPort).String()
	e.dialAddr = e.serverAddr
	for _, kv := range [][2]string{{"net/ipv4/ip_local_port_range", "1024 65535"}, {"net/ipv4/tcp_tw_reuse", "1"}} {
		if err := sandbox.SetSysctl(client.Netns(), kv[0], kv[1]); err != nil {
			return err
		}
	}
	// smeshd serves the namespaces its enrolled processes live in: each
	// pod has one from start to end, as a Kubernetes pod has its pause
	// container.
	for _, p := range []*sandbox.Pod{client, server} {
		pause, err := startProc("pause", exec.Command(exe, "bench-agent", "pause", "-"), p.Cgroup, p.Name)
		if err != nil {
			return err
		}
		e.pauses = append(e.pauses, pause)
	}
	if _, err = certs.Init(filepath.Join(e.dir, "tls"), []string{"a", "b"}, certs.DefaultTrustDomain); err != nil {
		return err
	}
	var confB string
	if identities(e.mode, opts) {
		e.intruder = filepath.Join(parentA, "intruder")
		if err := os.Mkdir(e.intruder, 0o755); err != nil {
			return fmt.Errorf("creating cgroup: %w", err)
		}
		e.smeshdConf = workloadConf(e.client, clientIdentity) + workloadConf(e.intruder, intruderIdentity)
		// Node b takes the source identity from the tunnel header only
		// if node a may speak for it, with an address of a's pods.
		confB = workloadConf(e.server, serverIdentity) + fmt.Sprintf(
			"[[tunnel.tls.peers]]\ncidrs = [%q]\nidentities = [%q]\nworkloads = [%q]\n\n",
			nodes[0].PodNet4, "spiffe://"+certs.DefaultTrustDomain+"/node/a", "spiffe://"+certs.DefaultTrustDomain+"/ns/bench/")
		if policyMode(e.mode) {
			confB += PolicyRules(opts.PolicyRules, opts.PolicyDenyClient)
		}
	}
	nodeA := benchNode{name: nodes[0].Name, ns: nodes[0].Netns(), pod: true}
	if err := e.startSmeshd(ctx, exe, nodeA, "a", "splice", parentA); err != nil {
		return err
	}
	e.smeshdConf = confB
	nodeB := benchNode{name: nodes[1].Name, ns: nodes[1].Netns(), pod: true}
	if err := e.startSmeshd(ctx, exe, nodeB, "b", "splice", parentB); err != nil {
		return err
	}
	return e.startServer(exe, e.nodes[1])
}

// workloadConf is a [[capture.workloads]] table naming cgroup's identity.
func workloadConf(cgroup, id string) string {
	return fmt.Sprintf("[[capture.workloads]]\ncgroup = %q\nidentity = %q\n\n", cgroup, id)
}

// probe connects from cgroup (in the client's network namespace) to the
// server, asks for one byte and says what it met: "allowed", or "refused:"
// and why.
func (e *modeEnv) probe(ctx context.Context, exe, cgroup string) (string, error) {
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, exe, "bench-agent", "probe", e.dialAddr)
	cmd.Stdout = &out
	p, err := startProc("bench probe", cmd, cgroup, e.nodes[0].name)
	if err != nil {
		return "", err
	}
	<-p.done
	if p.err != nil {
		return "", fmt.Errorf("%s: %w", e.mode, p.failed())
	}
	return strings.TrimSpace(out.String()), nil
}

// probeRefused probes from cgroup until the probe is refused or a few
// seconds passed (a policy is applied to new connections within a
// second), and returns the last result.
func (e *modeEnv) probeRefused(ctx context.Context, exe, cgroup string) (string, error) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		r, err := e.probe(ctx, exe, cgroup)
		if err != nil || strings.HasPrefix(r, "refused") || time.Now().After(deadline) {
			return r, err
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// kubeProxyRules writes, in the node's network namespace, the nftables
// rules kube-proxy's nftables mode writes for a ClusterIP (serviceVIP) with
// one endpoint (backend:9000): the service-ips verdict map, the service
// chain with its masquerade mark for traffic from outside the cluster, a
// random choice among the endpoints, the endpoint chain's DNAT, and the
// masquerading chain. The client pod's SYN to the VIP goes to the node (its
// default route), is DNATed in prerouting and forwarded back onto the
// bridge to the server pod; the replies are bridged, and conntrack (which
// sees bridged packets: bridge-nf-call-iptables, on by default as every
// Kubernetes node has it) reverses the translation. The rules go away with
// the node's namespace.
func (e *modeEnv) kubeProxyRules(backend netip.Addr) error {
	nft, err := exec.LookPath("nft")
	if err != nil {
		return fmt.Errorf("mode %s needs nft (Debian package nftables) for its kube-proxy-style DNAT: %w", e.mode, err)
	}
	// Without it, replies bridged from the server pod to the client pod
	// would skip conntrack and reach the client from the pod address,
	// not the VIP.
	if err := sandbox.SetSysctl(e.cluster.Netns(), "net/bridge/bridge-nf-call-iptables", "1"); err != nil {
		return fmt.Errorf("mode %s: the node's bridge must pass packets to conntrack as a Kubernetes node's does: %w", e.mode, err)
	}
	vip, port := serviceVIP.Addr(), serviceVIP.Port()
	rules := fmt.Sprintf(`table ip kube-proxy {
	map service-ips {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { %[1]s . tcp . %[2]d : goto service-bench-tcp }
	}
	chain nat-prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		jump services
	}
	chain nat-output {
		type nat hook output priority -100; policy accept;
		jump services
	}
	chain nat-postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		jump masquerading
	}
	chain services {
		ip daddr . meta l4proto . th dport vmap @service-ips
	}
	chain mark-for-masquerade {
		meta mark set meta mark or 0x4000
	}
	chain masquerading {
		meta mark & 0x4000 == 0 return
		meta mark set meta mark xor 0x4000
		masquerade fully-random
	}
	chain service-bench-tcp {
		ip daddr %[1]s tcp dport %[2]d ip saddr != %[3]s jump mark-for-masquerade
		numgen random mod 1 vmap { 0 : goto endpoint-bench }
	}
	chain endpoint-bench {
		ip saddr %[4]s jump mark-for-masquerade
		meta l4proto tcp dnat to %[4]s:9000
	}
}
`, vip, port, e.cluster.PodNet4, backend)
	cmd := exec.Command(nft, "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	p, err := startProc("nft", cmd, "", e.cluster.Name)
	if err != nil {
		return err
	}
	<-p.done
	if p.err != nil {
		return fmt.Errorf("mode %s: loading kube-proxy's rules with nft: %v: %s", e.mode, p.err, strings.TrimSpace(out.String()))
	}
	return nil
}
