package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/smesh-dev/smesh/pkg/sandbox"
)

// nginxPort is where nginx listens in the web pods.
const nginxPort = 8080

// nginx is nginx in a web pod, serving demo.bin on the pod's address. Its
// access log says which address each request came from.
type nginx struct {
	pod       *pod
	proc      *proc
	url       string // of demo.bin
	accessLog string
	offset    int64
}

// startNginx starts nginx in pod p (its cgroup, so in the mesh, and its
// network namespace), serving blob as demo.bin, and waits until it answers.
func (w *world) startNginx(ctx context.Context, p *pod, blob []byte) (*nginx, error) {
	root := filepath.Join(w.dir, "pod-"+p.short)
	html := filepath.Join(root, "html")
	if err := os.MkdirAll(html, 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(html, "demo.bin"), blob, 0o644); err != nil {
		return nil, err
	}
	listen := netip.AddrPortFrom(p.Addr4, nginxPort)
	x := &nginx{pod: p, url: "http://" + listen.String() + "/demo.bin", accessLog: filepath.Join(root, "access.log")}
	// One process (no master, no daemon), stopped by its PID; every file
	// it writes stays in root.
	confPath, err := sandbox.WriteNginxConfigLogged(root, html, listen.String(), x.accessLog)
	if err != nil {
		return nil, err
	}
	if x.proc, err = w.start("nginx in pod "+p.short, exec.Command("nginx", "-p", root, "-c", confPath), p.Cgroup, p.Name); err != nil {
		return nil, err
	}
	// Ready once it answers a HEAD from the pod's namespace (from the
	// demo, outside the mesh).
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, _, err := request(ctx, p.Netns(), "HEAD", x.url)
		if err == nil && code == 200 {
			break
		}
		if err == nil {
			err = fmt.Errorf("HTTP %d", code)
		}
		if x.proc.exited() {
			return nil, fmt.Errorf("nginx in pod %s exited (%v): %s", p.short, x.proc.err, strings.TrimSpace(x.proc.stderr.String()))
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("nginx in pod %s does not answer after 10s (%v): %s", p.short, err, strings.TrimSpace(x.proc.stderr.String()))
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	if _, err := x.nextRequest(ctx); err != nil { // the HEAD
		return nil, err
	}
	return x, nil
}

// accessEntry is one line of nginx's access log.
type accessEntry struct {
	from    netip.AddrPort
	request string
	status  int
	bytes   int64
}

// nextRequest waits for the next line of the access log (nginx writes it
// when the response is sent), for at most 5 seconds.
func (x *nginx) nextRequest(ctx context.Context) (accessEntry, error) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		line, err := x.readLine()
		if err != nil {
			return accessEntry{}, err
		}
		if line != "" {
			return parseAccess(line)
		}
		if time.Now().After(deadline) {
			return accessEntry{}, fmt.Errorf("nginx in pod %s logged no request within 5s", x.pod.short)
		}
		select {
		case <-ctx.Done():
			return accessEntry{}, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// readLine returns the next complete line of the access log, or "".
func (x *nginx) readLine() (string, error) {
	f, err := os.Open(x.accessLog)
	if err != nil {
		return "", nil // not written yet
	}
	defer f.Close()
	if _, err := f.Seek(x.offset, io.SeekStart); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(f).ReadString('\n')
	if err != nil {
		return "", nil // none yet, or partial
	}
	x.offset += int64(len(line))
	return strings.TrimSuffix(line, "\n"), nil
}

// parseAccess parses a line of the log WriteNginxConfigLogged asks for:
// ADDR:PORT "METHOD PATH PROTO" STATUS BYTES.
func parseAccess(line string) (accessEntry, error) {
	bad := fmt.Errorf("unexpected nginx access log line %q", line)
	from, rest, ok := strings.Cut(line, ` "`)
	if !ok {
		return accessEntry{}, bad
	}
	req, rest, ok := strings.Cut(rest, `" `)
	fields := strings.Fields(rest)
	if !ok || len(fields) != 2 {
		return accessEntry{}, bad
	}
	var e accessEntry
	var err error
	if e.from, err = netip.ParseAddrPort(from); err != nil {
		return accessEntry{}, bad
	}
	if e.status, err = strconv.Atoi(fields[0]); err != nil {
		return accessEntry{}, bad
	}
	if e.bytes, err = strconv.ParseInt(fields[1], 10, 64); err != nil {
		return accessEntry{}, bad
	}
	e.request = req
	return e, nil
}

// curl fetches url n times at once with curl in pod p (its cgroup, so in the
// mesh, and its network namespace), each time on a connection of its own,
// and returns curl's summary and the SHA-256 of what it got, per fetch.
func (w *world) curl(ctx context.Context, p *pod, url string, n int) ([]string, [][32]byte, error) {
	args := []string{"-sS", "--max-time", "30", "-w", "HTTP %{http_code}, %{size_download} bytes in %{time_total} s\\n"}
	if n > 1 {
		args = append(args, "--parallel", "--parallel-immediate")
	}
	var outs []string
	for i := range n {
		out := filepath.Join(w.dir, fmt.Sprintf("got-%s-%d", p.short, i))
		defer os.Remove(out)
		outs = append(outs, out)
		args = append(args, "-o", out, url)
	}
	var stdout output
	cmd := exec.Command("curl", args...)
	cmd.Stdout = &stdout
	c, err := w.start("curl in pod "+p.short, cmd, p.Cgroup, p.Name)
	if err != nil {
		return nil, nil, err
	}
	if err := c.wait(ctx, 40*time.Second); err != nil {
		return nil, nil, fmt.Errorf("curl %s: %w: %s", url, err, strings.TrimSpace(c.stderr.String()))
	}
	res := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	if len(res) != n {
		return nil, nil, fmt.Errorf("curl %s: %d summaries for %d fetches: %q", url, len(res), n, stdout.String())
	}
	for _, r := range res {
		if !strings.HasPrefix(r, "HTTP 200") {
			return nil, nil, fmt.Errorf("curl %s: %s", url, r)
		}
	}
	var sums [][32]byte
	for _, out := range outs {
		got, err := os.ReadFile(out)
		if err != nil {
			return nil, nil, err
		}
		sums = append(sums, sha256.Sum256(got))
	}
	return res, sums, nil
}
