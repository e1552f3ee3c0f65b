package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/cgroups"
	"github.com/smesh-dev/smesh/pkg/sandbox"
)

// world is everything the demo makes, so that close can remove it again:
// a temporary directory, one cgroup tree (smesh-test-demo-HEX below the
// cgroup v2 mount), the cluster nodes with their pods, and every process
// started in them.
type world struct {
	exe    string // smeshd: the daemon, and the pods' pause process
	prefix string // smesh-test-demo-HEX: the namespaces' names start with it
	dir    string
	mount  string
	cgroup string // the top of the demo's cgroup tree

	mu     sync.Mutex
	nodes  []*node
	procs  []*proc
	closed bool
}

// node is a cluster node: a network namespace with the pods' bridge, a
// cgroup for its smeshd and one, enrolled, for its pods' cgroups.
type node struct {
	name     string // a, b
	cn       *sandbox.ClusterNode
	wire     netip.Addr // the node's end of the wire to the other node
	smeshdCg string
	podsCg   string
	dir      string
	smeshd   *smeshd
	pods     []*pod
}

// pod is a pod on a node: a network namespace with eth0 on the node's
// bridge, a cgroup below the node's enrolled one, and a pause process.
type pod struct {
	*sandbox.Pod
	short string // client-a, web-b, ...
	node  *node
	inode uint64 // of the network namespace, as /debug/namespaces names it
}

func newWorld(exe string) (_ *world, err error) {
	w := &world{exe: exe}
	defer func() {
		if err != nil {
			err = errors.Join(err, w.close())
		}
	}()
	id := make([]byte, 3)
	rand.Read(id)
	w.prefix = "smesh-test-demo-" + hex.EncodeToString(id)
	if w.mount, err = cgroups.Mount(); err != nil {
		return nil, err
	}
	if w.dir, err = os.MkdirTemp("", "smesh-demo-"); err != nil {
		return nil, err
	}
	cg := filepath.Join(w.mount, w.prefix)
	if err := os.Mkdir(cg, 0o755); err != nil {
		return nil, fmt.Errorf("creating cgroup: %w", err)
	}
	w.cgroup = cg
	return w, nil
}

// addNode creates node name with the given pod subnets, and its cgroups.
func (w *world) addNode(name string, podNet4, podNet6 netip.Prefix) (*node, error) {
	cn, err := sandbox.NewClusterNode(w.prefix+"-"+name, podNet4, podNet6)
	if err != nil {
		return nil, err
	}
	n := &node{name: name, cn: cn, dir: filepath.Join(w.dir, "node-"+name)}
	w.mu.Lock()
	w.nodes = append(w.nodes, n)
	w.mu.Unlock()
	n.smeshdCg = filepath.Join(w.cgroup, "node-"+name+"-smeshd")
	n.podsCg = filepath.Join(w.cgroup, "node-"+name+"-pods")
	for _, cg := range []string{n.smeshdCg, n.podsCg} {
		if err := os.Mkdir(cg, 0o755); err != nil {
			return nil, fmt.Errorf("creating cgroup: %w", err)
		}
	}
	if err := os.Mkdir(n.dir, 0o755); err != nil {
		return nil, err
	}
	return n, nil
}

// join wires nodes a and b together and routes each one's pod subnets to
// the other.
func join(a, b *node, wire4, wire6 netip.Prefix) error {
	endA, endB, err := sandbox.JoinNodes(a.cn, b.cn, wire4, wire6)
	if err != nil {
		return err
	}
	a.wire, b.wire = endA.Addr4, endB.Addr4
	return nil
}

// addPod adds pod short to node n, its cgroup below the node's enrolled
// one, and starts its pause process: smeshd serves the network namespaces
// its enrolled processes live in, so a pod needs one for its whole life, as
// a Kubernetes pod has its pause container.
func (w *world) addPod(n *node, short string) (*pod, error) {
	sp, err := n.cn.AddPod(w.prefix+"-"+short, filepath.Join(n.podsCg, short))
	if err != nil {
		return nil, err
	}
	p := &pod{Pod: sp, short: short, node: n}
	n.pods = append(n.pods, p)
	var st unix.Stat_t
	if err := unix.Fstat(int(sp.Netns()), &st); err != nil {
		return nil, fmt.Errorf("pod %s: reading its network namespace's inode: %w", short, err)
	}
	p.inode = st.Ino
	if _, err := w.start("pause process of pod "+short, exec.Command(w.exe, "bench-agent", "pause", "-"), sp.Cgroup, sp.Name); err != nil {
		return nil, err
	}
	return p, nil
}

// proc is a process the demo started; it is stopped by its PID.
type proc struct {
	name   string
	cmd    *exec.Cmd
	stderr output // unless the caller set cmd.Stderr
	done   chan struct{}
	err    error
}

// output collects what a running process writes.
type output struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (o *output) Write(b []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.Write(b)
}

func (o *output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

// start starts cmd in cgroup and network namespace netnsName (see
// sandbox.Start), in a process group of its own: Ctrl-C reaches the demo
// only, which then stops everything in order.
func (w *world) start(name string, cmd *exec.Cmd, cgroup, netnsName string) (*proc, error) {
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	if cmd.Stderr == nil {
		cmd.Stderr = &p.stderr
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return nil, fmt.Errorf("starting %s: the demo is being removed", name)
	}
	if err := sandbox.Start(cmd, cgroup, netnsName); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	w.procs = append(w.procs, p)
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// wait waits for the process to exit, for at most timeout.
func (p *proc) wait(ctx context.Context, timeout time.Duration) error {
	select {
	case <-p.done:
		if p.err != nil {
			return fmt.Errorf("%s: %w", p.name, p.err)
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(timeout):
		return fmt.Errorf("%s still running after %v", p.name, timeout)
	}
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM, and SIGKILL if the process is still there after
// timeout.
func (p *proc) stop(timeout time.Duration) {
	if p.exited() {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(timeout):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// close stops every process the demo started (by PID, the last started
// first), deletes the pods and nodes, the cgroup tree (which SIGKILLs
// anything left in it) and the directory. Closing again does nothing.
func (w *world) close() error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return nil
	}
	w.closed = true
	procs, nodes := w.procs, w.nodes
	w.mu.Unlock()

	var errs []error
	for i := len(procs) - 1; i >= 0; i-- {
		procs[i].stop(5 * time.Second)
	}
	for _, n := range nodes {
		if err := n.cn.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if w.cgroup != "" {
		if err := cgroups.Remove(w.cgroup, 5*time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	if w.dir != "" {
		if err := os.RemoveAll(w.dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// leftovers lists what of the world is still there after close: network
// namespaces named with the demo's prefix, its cgroup, its directory.
func (w *world) leftovers() ([]string, error) {
	var left []string
	ents, err := os.ReadDir("/run/netns")
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), w.prefix) {
			left = append(left, "network namespace "+e.Name())
		}
	}
	for _, path := range []string{w.cgroup, w.dir} {
		if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
			left = append(left, path)
		}
	}
	return left, nil
}

// request makes one HTTP request from inside network namespace ns and
// returns the status code and the body. Only the connection is made on a
// thread switched into ns; sockets keep their namespace, so the rest runs
// here. The demo itself is in no enrolled cgroup: its connections are never
// captured.
func request(ctx context.Context, ns netns.NsHandle, method, url string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return 0, nil, err
	}
	req.Close = true
	var conn net.Conn
	err = sandbox.InNetns(ns, func() error {
		d := net.Dialer{Timeout: 5 * time.Second}
		var err error
		conn, err = d.DialContext(ctx, "tcp", req.URL.Host)
		return err
	})
	if err != nil {
		return 0, nil, fmt.Errorf("%s %s: %w", method, url, err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if err := req.Write(conn); err != nil {
		return 0, nil, fmt.Errorf("%s %s: %w", method, url, err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		return 0, nil, fmt.Errorf("%s %s: %w", method, url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, nil, fmt.Errorf("%s %s: %w", method, url, err)
	}
	return resp.StatusCode, body, nil
}
