package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/enrol"
)

// adminAddr is smeshd's admin endpoint ([admin] listen's default), in the
// node's network namespace.
const adminAddr = "127.0.0.1:15000"

// smeshd is one node's smeshd: the process, its JSON log (its stderr, in a
// file), its BPF counters and its admin endpoint.
type smeshd struct {
	node *node
	proc *proc
	log  smeshdLog
}

// startSmeshd starts smeshd on node n, in the node's network namespace and
// a cgroup of its own, with the node's pods' parent cgroup enrolled and the
// node's certificate from tlsDir, and waits for its "smeshd ready" line.
func (w *world) startSmeshd(ctx context.Context, n *node, tlsDir string) (*smeshd, error) {
	rel, err := filepath.Rel(w.mount, n.podsCg)
	if err != nil {
		return nil, err
	}
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
		return nil, err
	}
	s := &smeshd{node: n, log: smeshdLog{path: filepath.Join(n.dir, "smeshd.log")}}
	logf, err := os.Create(s.log.path)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(w.exe, "-c", path)
	cmd.Stderr = logf
	if s.proc, err = w.start("smeshd on node "+n.name, cmd, n.smeshdCg, n.cn.Name); err != nil {
		return nil, err
	}
	n.smeshd = s
	if _, err := s.waitLine(ctx, 0, 20*time.Second, `"smeshd ready"`, message("smeshd ready")); err != nil {
		return nil, err
	}
	return s, nil
}

// logLine is one line of smeshd's JSON log.
type logLine map[string]any

func (l logLine) str(key string) string {
	if v, ok := l[key]; ok && v != nil {
		return fmt.Sprint(v)
	}
	return ""
}

func (l logLine) num(key string) uint64 {
	f, _ := l[key].(float64)
	return uint64(f)
}

// message matches the lines with that message (and, if given, component).
func message(msg string, component ...string) func(logLine) bool {
	return func(l logLine) bool {
		return l.str("message") == msg && (len(component) == 0 || l.str("component") == component[0])
	}
}

// smeshdLog reads smeshd's log file as it grows.
type smeshdLog struct {
	path   string
	offset int64
	lines  []logLine
}

// read adds the lines written since the last read; a partial last line is
// read again next time.
func (l *smeshdLog) read() {
	f, err := os.Open(l.path)
	if err != nil {
		return
	}
	defer f.Close()
	if _, err := f.Seek(l.offset, io.SeekStart); err != nil {
		return
	}
	r := bufio.NewReader(f)
	for {
		b, err := r.ReadBytes('\n')
		if err != nil {
			return
		}
		l.offset += int64(len(b))
		var line logLine
		if json.Unmarshal(b, &line) == nil {
			l.lines = append(l.lines, line)
		}
	}
}

// mark returns where the lines logged from now on start, for since.
func (s *smeshd) mark() int {
	s.log.read()
	return len(s.log.lines)
}

// since returns the lines logged since mark, that match.
func (s *smeshd) since(mark int, match func(logLine) bool) []logLine {
	s.log.read()
	var out []logLine
	for _, l := range s.log.lines[mark:] {
		if match(l) {
			out = append(out, l)
		}
	}
	return out
}

// waitLine waits for a line logged since mark that matches, for at most
// timeout; what names the line in the error.
func (s *smeshd) waitLine(ctx context.Context, mark int, timeout time.Duration, what string, match func(logLine) bool) (logLine, error) {
	lines, err := s.waitLines(ctx, mark, 1, timeout, what, match)
	if err != nil {
		return nil, err
	}
	return lines[0], nil
}

// waitLines waits for n lines logged since mark that match, for at most
// timeout, and returns them all (n or more); what names a line in the
// error.
func (s *smeshd) waitLines(ctx context.Context, mark, n int, timeout time.Duration, what string, match func(logLine) bool) ([]logLine, error) {
	deadline := time.After(timeout)
	for {
		if lines := s.since(mark, match); len(lines) >= n {
			return lines, nil
		}
		select {
		case <-s.proc.done:
			status := "exit status 0"
			if s.proc.err != nil {
				status = s.proc.err.Error()
			}
			return nil, fmt.Errorf("smeshd on node %s exited (%s) before logging %d %s; its last lines:\n%s", s.node.name, status, n, what, s.tail(20))
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-deadline:
			return nil, fmt.Errorf("smeshd on node %s logged fewer than %d %s within %v; its last lines:\n%s", s.node.name, n, what, timeout, s.tail(20))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// tail returns the last n lines of the log as written.
func (s *smeshd) tail(n int) string {
	b, _ := os.ReadFile(s.log.path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// namespaces GETs /debug/namespaces from smeshd's admin endpoint, from the
// node's network namespace.
func (s *smeshd) namespaces(ctx context.Context) ([]enrol.Info, error) {
	url := "http://" + adminAddr + "/debug/namespaces"
	code, body, err := request(ctx, s.node.cn.Netns(), "GET", url)
	if err != nil {
		return nil, fmt.Errorf("node %s: %w", s.node.name, err)
	}
	if code != 200 {
		return nil, fmt.Errorf("node %s: GET %s: %d %s", s.node.name, url, code, body)
	}
	var infos []enrol.Info
	if err := json.Unmarshal(body, &infos); err != nil {
		return nil, fmt.Errorf("node %s: GET %s: %w", s.node.name, url, err)
	}
	return infos, nil
}

// waitServed polls /debug/namespaces until smeshd serves the network
// namespaces of pods (listeners up), for at most timeout.
func (s *smeshd) waitServed(ctx context.Context, pods []*pod, timeout time.Duration) ([]enrol.Info, error) {
	deadline := time.Now().Add(timeout)
	for {
		infos, err := s.namespaces(ctx)
		if err != nil {
			return nil, err
		}
		var missing []string
		for _, p := range pods {
			if i := find(infos, p.inode); i == nil || !i.Ready {
				state := "not listed"
				if i != nil {
					state = "not ready: " + i.Error
				}
				missing = append(missing, fmt.Sprintf("pod %s (network namespace %d) %s", p.short, p.inode, state))
			}
		}
		if len(missing) == 0 {
			return infos, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("node %s: after %v smeshd does not serve %s", s.node.name, timeout, strings.Join(missing, "; "))
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func find(infos []enrol.Info, inode uint64) *enrol.Info {
	for i := range infos {
		if infos[i].Inode == inode {
			return &infos[i]
		}
	}
	return nil
}

// stop sends smeshd SIGTERM and waits for it to drain and exit (up to its
// drain_timeout, 30s, and then some). It returns its "drained" line.
func (s *smeshd) stop(ctx context.Context) (logLine, error) {
	mark := s.mark()
	if err := s.proc.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return nil, fmt.Errorf("smeshd on node %s: %w", s.node.name, err)
	}
	if err := s.proc.wait(ctx, 40*time.Second); err != nil {
		return nil, fmt.Errorf("%w; its last lines:\n%s", err, s.tail(20))
	}
	drained := s.since(mark, message("drained"))
	if len(drained) == 0 {
		return nil, fmt.Errorf("smeshd on node %s exited without logging \"drained\"; its last lines:\n%s", s.node.name, s.tail(20))
	}
	return drained[0], nil
}

// spliceCounters are smeshd's splice counters (smesh_stats, both
// directions, all CPUs): bytes spliced by sk_msg, and bytes sent by TCP
// after sk_msg demoted a direction of a spliced hop (its reader's queue
// reached datapath.splice_queue_limit).
type spliceCounters struct {
	spliced, demoted uint64
}

func (c spliceCounters) sub(o spliceCounters) spliceCounters {
	return spliceCounters{c.spliced - o.spliced, c.demoted - o.demoted}
}

// counters reads smeshd's splice counters from the smesh_stats map it
// holds, found through its file descriptors.
func (s *smeshd) counters() (spliceCounters, error) {
	st, err := datapath.StatsOf(s.proc.cmd.Process.Pid)
	if err != nil {
		return spliceCounters{}, err
	}
	return spliceCounters{spliced: st.Bytes(), demoted: st.Demoted()}, nil
}
