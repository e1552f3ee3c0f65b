package main

import (
	"bufio"
	"encoding/json"
	"io"
	"net"
	"os"
	"sort"
	"strings"
	"sync/atomic"

	"github.com/smesh-dev/smesh/pkg/testenv/kubecp"
)

// countingProxy sits between smeshd and the API server and counts the
// bytes smeshd receives, as they cross the wire (TLS included).
type countingProxy struct {
	ln       net.Listener
	upstream string
	down, up atomic.Int64
	conns    atomic.Int64
}

func newCountingProxy(upstream string) (*countingProxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &countingProxy{ln: ln, upstream: upstream}
	go p.serve()
	return p, nil
}

func (p *countingProxy) addr() string { return p.ln.Addr().String() }

func (p *countingProxy) Close() error { return p.ln.Close() }

func (p *countingProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.conns.Add(1)
		go func() {
			defer c.Close()
			u, err := net.Dial("tcp", p.upstream)
			if err != nil {
				return
			}
			defer u.Close()
			done := make(chan struct{}, 2)
			go func() { io.Copy(countWriter{c, &p.down}, u); c.Close(); done <- struct{}{} }()
			go func() { io.Copy(countWriter{u, &p.up}, c); u.Close(); done <- struct{}{} }()
			<-done
			<-done
		}()
	}
}

type countWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c countWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n.Add(int64(n))
	return n, err
}

// audit is the API server's audit log, with a policy that records smeshd's
// requests only: the server's own count of what smeshd asked for.
type audit struct{ path string }

const smeshdUser = "system:serviceaccount:smesh-system:smeshd"

// auditPolicy is kubecp.Options.AuditPolicy: smeshd's requests only.
const auditPolicy = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  users: ["` + smeshdUser + `"]
- level: None
`

func (a *audit) offset() (int64, error) {
	fi, err := os.Stat(a.path)
	if os.IsNotExist(err) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// requests counts smeshd's requests recorded since offset, by verb and
// path ("watch /api/v1/pods": 2), each once whatever its stages.
func (a *audit) requests(offset int64) (map[string]int, error) {
	f, err := os.Open(a.path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if _, err := f.Seek(offset, io.SeekStart); err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	out := map[string]int{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var ev kubecp.AuditEvent
		if json.Unmarshal(sc.Bytes(), &ev) != nil || ev.User.Username != smeshdUser || seen[ev.AuditID] {
			continue
		}
		seen[ev.AuditID] = true
		path, _, _ := strings.Cut(ev.RequestURI, "?")
		out[ev.Verb+" "+path]++
	}
	return out, sc.Err()
}

// describeRequests is "list /api/v1/pods 1, watch ... 2" in a stable order.
func describeRequests(m map[string]int) (string, int) {
	keys := make([]string, 0, len(m))
	total := 0
	for k, n := range m {
		keys = append(keys, k)
		total += n
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, k+" ×"+itoa(m[k]))
	}
	return strings.Join(parts, ", "), total
}
