// Command smesh-demo shows smesh at work on one machine (`sudo make demo`):
// two nodes (network namespaces joined by a veth pair), smeshd on each with
// certificates from `smeshd certs init`, nginx on each in the mesh, and curl
// requests across the nodes (captured, relayed by smeshd through the mTLS
// tunnel to the other node's smeshd, which delivers to nginx) and within
// each node (spliced, no proxy).
// It prints what happened from smeshd's own logs and BPF counters, and
// removes everything it made, also when interrupted.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netns"

	"github.com/smesh-dev/smesh/pkg/certs"
	"github.com/smesh-dev/smesh/pkg/cgroups"
	"github.com/smesh-dev/smesh/pkg/sandbox"
)

func main() {
	smeshd := flag.String("smeshd", "bin/smeshd", "the smeshd binary to run on both nodes")
	size := flag.Int("size", 4<<20, "size of the file nginx serves, in bytes")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *smeshd, *size); err != nil {
		fmt.Fprintln(os.Stderr, "smesh-demo:", err)
		os.Exit(1)
	}
}

// node is one demo node.
type node struct {
	name       string
	ns         string
	addr       netip.Addr
	smeshdCg   string
	meshCg     string
	dir        string
	smeshd     *proc
	logPath    string
	logOffset  int64
	splicedWas uint64
	ready      string // smeshd's "smeshd ready" line, summarised
}

type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// demo holds what the demo made, to remove it again.
type demo struct {
	dir     string
	mount   string
	procs   []*proc
	cgroups []string
	netns   []string
}

func run(ctx context.Context, smeshdPath string, size int) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("needs root: it creates network namespaces and cgroups and loads BPF programs (run sudo make demo)")
	}
	smeshdPath, err = filepath.Abs(smeshdPath)
	if err != nil {
		return err
	}
	for _, tool := range []string{"nginx", "curl"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("needs %s (Debian: apt-get install nginx-light curl)", tool)
		}
	}
	d := &demo{}
	defer d.cleanup()
	if d.mount, err = cgroups.Mount(); err != nil {
		return err
	}
	if d.dir, err = os.MkdirTemp("", "smesh-demo-"); err != nil {
		return err
	}
	id := make([]byte, 3)
	rand.Read(id)
	prefix := "smesh-test-demo-" + hex.EncodeToString(id)

	a := &node{name: "a", addr: netip.MustParseAddr("198.18.100.1")}
	b := &node{name: "b", addr: netip.MustParseAddr("198.18.100.2")}
	nodes := []*node{a, b}
	say("smesh demo: two nodes on this machine, each a network namespace with its own smeshd,\n"+
		"joined by a veth pair: node a %s, node b %s. Everything is removed at the end.\n", a.addr, b.addr)

	// Certificates.
	tlsDir := filepath.Join(d.dir, "tls")
	ca, err := certs.Init(tlsDir, []string{"a", "b"}, certs.DefaultTrustDomain)
	if err != nil {
		return err
	}
	say("1. certificates: smeshd certs init --dir %s --nodes a,b", tlsDir)
	say("   a CA for trust domain %s; node a is %s, node b is %s\n", ca.TrustDomain, ca.ID("a"), ca.ID("b"))

	// Nodes: namespaces, veth, cgroups.
	var handles []netns.NsHandle
	defer func() {
		for _, h := range handles {
			h.Close()
		}
	}()
	for _, n := range nodes {
		n.ns = prefix + "-" + n.name
		h, err := sandbox.NewNamedNetns(n.ns)
		if err != nil {
			return err
		}
		d.netns = append(d.netns, n.ns)
		handles = append(handles, h)
		n.dir = filepath.Join(d.dir, n.name)
		if err := os.MkdirAll(n.dir, 0o755); err != nil {
			return err
		}
		for _, cg := range []*string{&n.smeshdCg, &n.meshCg} {
			*cg = filepath.Join(d.mount, fmt.Sprintf("%s-%s-%d", prefix, n.name, len(d.cgroups)))
			if err := os.Mkdir(*cg, 0o755); err != nil {
				return err
			}
			d.cgroups = append(d.cgroups, *cg)
		}
	}
	if err := sandbox.Veth(handles[0], handles[1], "eth0", "eth0", netip.PrefixFrom(a.addr, 24), netip.PrefixFrom(b.addr, 24)); err != nil {
		return err
	}
	say("2. nodes: network namespaces %s-a and %s-b; in each, cgroup %s for smeshd and\n   cgroup %s for the workloads in the mesh\n",
		prefix, prefix, filepath.Base(a.smeshdCg), filepath.Base(a.meshCg))

	// smeshd on each node.
	for _, n := range nodes {
		if err := d.startSmeshd(ctx, n, smeshdPath, tlsDir); err != nil {
			return err
		}
	}
	say("3. smeshd runs on both nodes: %s\n", a.ready)

	// nginx on each node, in the mesh.
	blob := make([]byte, size)
	rand.Read(blob)
	sum := sha256.Sum256(blob)
	for _, n := range nodes {
		if err := d.startNginx(n, blob); err != nil {
			return err
		}
	}
	say("4. nginx runs in the mesh on both nodes, serving a %d-byte random file on port 8080\n", size)
	for _, n := range nodes { // start counting from here
		newLines(n)
		if n.splicedWas, err = splicedBytes(n.smeshd.cmd.Process.Pid); err != nil {
			return err
		}
	}

	steps := []struct {
		title    string
		from, to *node
	}{
		{"curl on node a -> nginx on node b (another node)", a, b},
		{"the same again: a new connection to a known peer resumes its TLS session", a, b},
		{"curl on node b -> nginx on node a (the other way)", b, a},
		{"curl on node a -> nginx on node a (same node)", a, a},
		{"curl on node b -> nginx on node b (same node)", b, b},
	}
	for i, s := range steps {
		if err := ctx.Err(); err != nil {
			return err
		}
		url := fmt.Sprintf("http://%s:8080/demo.bin", s.to.addr)
		say("%d. %s: curl %s", 5+i, s.title, url)
		out := filepath.Join(s.from.dir, "got")
		res, err := d.curl(s.from, url, out)
		if err != nil {
			return err
		}
		got, err := os.ReadFile(out)
		if err != nil {
			return err
		}
		match := "sha256 matches the file nginx serves"
		if sha256.Sum256(got) != sum {
			match = "DIFFERS from the file nginx serves"
		}
		say("   curl: %s; %s", res, match)
		time.Sleep(300 * time.Millisecond) // let smeshd log the connection's end
		if s.from == s.to {
			say("   node %s: curl's connect() to an address of its own node was left alone (no proxy hop);\n"+
				"           sock_ops put both sockets in the sockhash and sk_msg splices them", s.from.name)
			if err := report(s.from); err != nil {
				return err
			}
		} else {
			for _, n := range []*node{s.from, s.to} {
				if err := report(n); err != nil {
					return err
				}
			}
		}
		say("")
	}

	say("%d. stopping: smeshd on each node, nginx, and removing namespaces, cgroups and %s", 5+len(steps), d.dir)
	for _, n := range nodes {
		n.smeshd.cmd.Process.Signal(syscall.SIGTERM)
		if err := n.smeshd.wait(10 * time.Second); err != nil {
			say("   smeshd on node %s: %v", n.name, err)
		}
		for _, line := range newLines(n) {
			// smeshd logs its tunnel counters (the ones /metrics exports)
			// once it has drained.
			tun, ok := line["tunnel"].(map[string]any)
			if line["message"] != "drained" || !ok {
				continue
			}
			refused := "none"
			if m, ok := tun["errors"].(map[string]any); ok && len(m) > 0 {
				refused = fmt.Sprint(m)
			}
			say("   smeshd on node %s at exit: %d tunnel connections out, %d in, %s spliced in the kernel; tunnel errors: %s",
				n.name, num(tun["out"]), num(tun["in"]), bytesOf(n.splicedWas), refused)
		}
	}
	return nil
}

func say(format string, args ...any) { fmt.Printf(format+"\n", args...) }

func (d *demo) start(name string, cmd *exec.Cmd, cgroup, ns string) (*proc, error) {
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	if err := sandbox.Start(cmd, cgroup, ns); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	d.procs = append(d.procs, p)
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) wait(timeout time.Duration) error {
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		return fmt.Errorf("%s still running after %v", p.name, timeout)
	}
}

func (d *demo) startSmeshd(ctx context.Context, n *node, exe, tlsDir string) error {
	rel, _ := filepath.Rel(d.mount, n.meshCg)
	conf := fmt.Sprintf(`[capture]
cgroups = [%q]
[tunnel.tls]
cert = %q
key = %q
ca = %q
[log]
level = "debug"
format = "json"
`, rel, filepath.Join(tlsDir, n.name+".crt"), filepath.Join(tlsDir, n.name+".key"), filepath.Join(tlsDir, "ca.crt"))
	path := filepath.Join(n.dir, "smesh.toml")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		return err
	}
	n.logPath = filepath.Join(n.dir, "smeshd.log")
	logf, err := os.Create(n.logPath)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(exe, "-c", path)
	cmd.Stderr = logf
	if n.smeshd, err = d.start("smeshd on node "+n.name, cmd, n.smeshdCg, n.ns); err != nil {
		return err
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if n.ready = readyLine(n); n.ready != "" {
			return nil
		}
		select {
		case <-n.smeshd.done:
			log, _ := os.ReadFile(n.logPath)
			return fmt.Errorf("smeshd on node %s exited: %v\n%s", n.name, n.smeshd.err, log)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("smeshd on node %s not ready after 20s (log: %s)", n.name, n.logPath)
		}
	}
}

// readyLine summarises smeshd's "smeshd ready" log line, or "" before it.
func readyLine(n *node) string {
	for _, line := range newLines(n) {
		if line["message"] == "smeshd ready" {
			return fmt.Sprintf("data path %v, captured connections arrive at %v, tunnel on %v, mTLS %v",
				line["mode"], line["outbound"], line["tunnel"], line["mtls"])
		}
	}
	return ""
}

func (d *demo) startNginx(n *node, blob []byte) error {
	root := filepath.Join(n.dir, "nginx")
	if err := os.MkdirAll(root, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(root, "demo.bin"), blob, 0o644); err != nil {
		return err
	}
	confPath, err := sandbox.WriteNginxConfig(root, n.addr.String()+":8080")
	if err != nil {
		return err
	}
	var stderr bytes.Buffer
	cmd := exec.Command("nginx", "-p", root, "-c", confPath)
	cmd.Stderr = &stderr
	p, err := d.start("nginx on node "+n.name, cmd, n.meshCg, n.ns)
	if err != nil {
		return err
	}
	// Ready once the port answers (checked with curl, in the mesh).
	for range 50 {
		if _, err := d.curl(n, fmt.Sprintf("http://%s:8080/", n.addr), os.DevNull); err == nil || strings.Contains(err.Error(), "403") || strings.Contains(err.Error(), "404") {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("nginx on node %s exited: %v: %s", n.name, p.err, stderr.String())
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("nginx on node %s does not answer: %s", n.name, stderr.String())
}

// curl runs curl in node n's mesh cgroup and namespace.
func (d *demo) curl(n *node, url, out string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command("curl", "-sS", "-o", out, "-w", "HTTP %{http_code}, %{size_download} bytes in %{time_total} s", url)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	p, err := d.start("curl", cmd, n.meshCg, n.ns)
	if err != nil {
		return "", err
	}
	if err := p.wait(30 * time.Second); err != nil {
		return "", fmt.Errorf("curl %s: %v: %s", url, err, stderr.String())
	}
	if !strings.HasPrefix(stdout.String(), "HTTP 200") {
		return "", fmt.Errorf("curl %s: %s", url, stdout.String())
	}
	return stdout.String(), nil
}

// report prints what smeshd on n logged and spliced since the last report.
func report(n *node) error {
	for _, line := range newLines(n) {
		switch {
		case line["component"] == "outbound" && line["message"] == "connection done":
			say("   node %s: curl's connect() was captured (cgroup/connect4) and sent to smeshd, which learnt the\n"+
				"           original destination %v and tunnelled it: %s out, %s back",
				n.name, line["dst"], bytesOf(num(line["tx"])), bytesOf(num(line["rx"])))
		case line["component"] == "tunnel-in" && line["message"] == "tunnel connection done":
			resumed := "full TLS 1.3 handshake"
			if line["resumed"] == true {
				resumed = "TLS session resumed"
			}
			say("   node %s: tunnel connection from %v (%v, %s, mutual certificates), delivered to %v:\n"+
				"           %s in, %s out",
				n.name, line["peer"], line["peer_id"], resumed, line["dst"], bytesOf(num(line["rx"])), bytesOf(num(line["tx"])))
		case line["component"] == "tunnel-out" || line["component"] == "tunnel-in":
			if line["level"] == "warn" {
				say("   node %s: %v: %v", n.name, line["message"], line["error"])
			}
		}
	}
	total, err := splicedBytes(n.smeshd.cmd.Process.Pid)
	if err != nil {
		return err
	}
	note := ""
	if total == n.splicedWas {
		note = " (the hops through smeshd keep TCP's flow control: datapath.splice_proxy_hops is off)"
	}
	say("   node %s: spliced in the kernel (sk_msg, counted in BPF): %s%s", n.name, bytesOf(total-n.splicedWas), note)
	n.splicedWas = total
	return nil
}

// newLines returns the JSON log lines smeshd wrote since the last call.
func newLines(n *node) []map[string]any {
	f, err := os.Open(n.logPath)
	if err != nil {
		return nil
	}
	defer f.Close()
	f.Seek(n.logOffset, io.SeekStart)
	var lines []map[string]any
	r := bufio.NewReader(f)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			break // a partial line is read again next time
		}
		n.logOffset += int64(len(line))
		var m map[string]any
		if json.Unmarshal(line, &m) == nil {
			lines = append(lines, m)
		}
	}
	return lines
}

func num(v any) uint64 {
	f, _ := v.(float64)
	return uint64(f)
}

func bytesOf(n uint64) string {
	switch {
	case n >= 1<<20:
		return strconv.FormatFloat(float64(n)/(1<<20), 'f', 1, 64) + " MiB"
	case n >= 1<<10:
		return strconv.FormatFloat(float64(n)/(1<<10), 'f', 1, 64) + " KiB"
	}
	return strconv.FormatUint(n, 10) + " bytes"
}

// splicedBytes reads smeshd's splice counters (smesh_stats, per CPU, both
// directions) from the map it holds, found through its file descriptors.
func splicedBytes(pid int) (uint64, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	for _, e := range ents {
		if target, _ := os.Readlink(filepath.Join(dir, e.Name())); target != "anon_inode:bpf-map" {
			continue
		}
		info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, e.Name()))
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(info), "\n") {
			v, ok := strings.CutPrefix(l, "map_id:")
			if !ok {
				continue
			}
			id, _ := strconv.Atoi(strings.TrimSpace(v))
			m, err := ebpf.NewMapFromID(ebpf.MapID(id))
			if err != nil {
				continue
			}
			info, err := m.Info()
			if err != nil || info.Name != "smesh_stats" {
				m.Close()
				continue
			}
			var total uint64
			for slot := uint32(0); slot < 2; slot++ {
				var perCPU []struct{ Bytes, Msgs uint64 }
				if err := m.Lookup(slot, &perCPU); err != nil {
					m.Close()
					return 0, err
				}
				for _, c := range perCPU {
					total += c.Bytes
				}
			}
			m.Close()
			return total, nil
		}
	}
	return 0, fmt.Errorf("smeshd (pid %d) holds no smesh_stats map", pid)
}

// cleanup stops every process the demo started (by PID), then removes its
// cgroups (which kills anything left in them), namespaces and files.
func (d *demo) cleanup() {
	for _, p := range d.procs {
		select {
		case <-p.done:
			continue
		default:
		}
		p.cmd.Process.Signal(syscall.SIGTERM)
		if p.wait(5*time.Second) != nil {
			p.cmd.Process.Kill()
			p.wait(5 * time.Second)
		}
	}
	for i := len(d.cgroups) - 1; i >= 0; i-- {
		if err := cgroups.Remove(d.cgroups[i], 5*time.Second); err != nil {
			fmt.Fprintln(os.Stderr, "smesh-demo: removing cgroup:", err)
		}
	}
	for _, ns := range d.netns {
		if err := sandbox.DeleteNamedNetns(ns); err != nil {
			fmt.Fprintln(os.Stderr, "smesh-demo: removing network namespace:", err)
		}
	}
	if d.dir != "" {
		os.RemoveAll(d.dir)
	}
}
