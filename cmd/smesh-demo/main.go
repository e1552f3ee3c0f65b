// Command smesh-demo shows smesh at work on one machine (`sudo make demo`),
// in a world that looks like a Kubernetes cluster: two nodes, each a network
// namespace with a bridge for its pods and a smeshd (certificates from
// `smeshd certs init`), and four pods, each a network namespace with a veth
// on its node's bridge, a cgroup below the node's enrolled one and a pause
// process. curl in the client pods fetches a file from nginx in the web
// pods: across the nodes (captured, carried by the mTLS tunnel, delivered by
// the other node's smeshd inside the destination pod) and between two pods
// of one node (not captured, spliced in the kernel across the two pods'
// namespaces). Across the nodes it shows the tunnel's links at work: a new
// link's full TLS handshake, the next connection riding that link from the
// pool, and, for two connections at once, a new link whose handshake
// resumes the session.
//
// It prints what happened from smeshd's own JSON logs, its admin endpoint
// and its BPF counters (and from curl and nginx), and removes everything it
// made, also on Ctrl-C and on any error.
//
// The files follow what it shows: this one the flags and the list of steps,
// steps.go what the other steps do and print, world.go the nodes, pods and
// processes and their removal, smeshd.go starting smeshd and reading its
// logs, counters and admin endpoint, workloads.go nginx and curl, fetch.go
// the steps in which curl fetches and what they print, links.go which
// tunnel link a connection rode and smeshd's handshake counters.
package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
)

func main() {
	smeshdPath := flag.String("smeshd", "bin/smeshd", "the smeshd binary: the daemon on both nodes, and the pods' pause process")
	size := flag.Int("size", 4<<20, "size of the file nginx serves, in bytes")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := run(ctx, *smeshdPath, *size)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "smesh-demo:", err)
		os.Exit(1)
	}
}

// The address plan, inside 198.18.0.0/15 and fd00:5e::/32 as the tests'
// (see /work/shared/docs/testing.md): a /24 and a /64 of pod addresses per
// node, and one pair for the wire between the nodes. The world lives in
// network namespaces of its own, so it meets no other that uses the same
// addresses.
var (
	podNetA4 = netip.MustParsePrefix("198.18.1.0/24")
	podNetA6 = netip.MustParsePrefix("fd00:5e:0:1::/64")
	podNetB4 = netip.MustParsePrefix("198.18.2.0/24")
	podNetB6 = netip.MustParsePrefix("fd00:5e:0:2::/64")
	wire4    = netip.MustParsePrefix("198.18.0.0/24")
	wire6    = netip.MustParsePrefix("fd00:5e::/64")
)

// demo is what the steps share.
type demo struct {
	w      *world
	size   int
	sum    [32]byte // of the file nginx serves
	tlsDir string
	a, b   *node
	// On node a a client and a web pod, on node b a web and a client pod.
	clientA, webA, webB, clientB *pod
	nginx                        map[*pod]*nginx
	// step is the number of the step running; links are the tunnel links
	// the steps' tunnelled connections rode, by their address on the
	// client node (links.go).
	step  int
	links map[string]*linkUse
}

func run(ctx context.Context, smeshdPath string, size int) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("needs root: it creates network namespaces and cgroups and loads BPF programs (run sudo make demo)")
	}
	if smeshdPath, err = filepath.Abs(smeshdPath); err != nil {
		return err
	}
	if _, err := os.Stat(smeshdPath); err != nil {
		return fmt.Errorf("smeshd: %w (make build makes it)", err)
	}
	for _, tool := range []string{"nginx", "curl"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("needs %s (Debian: apt-get install nginx-light curl)", tool)
		}
	}
	w, err := newWorld(smeshdPath)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			fmt.Fprintln(os.Stderr, "smesh-demo: stopping; removing everything it made")
		}
		if cerr := w.close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("removing what the demo made: %w", cerr))
		}
	}()
	d := &demo{w: w, size: size, nginx: make(map[*pod]*nginx), links: make(map[string]*linkUse)}
	blob := make([]byte, size)
	rand.Read(blob)
	d.sum = sha256.Sum256(blob)

	say("smesh demo: a cluster on this machine that looks like Kubernetes. Two nodes, each a network\n" +
		"namespace with a bridge for its pods and a smeshd; four pods, each a network namespace and a\n" +
		"cgroup; nginx and curl in the pods. What follows is read from smeshd's JSON logs, its admin\n" +
		"endpoint and its BPF counters, and from curl and nginx. Everything is removed at the end.\n")
	steps := []struct {
		title string
		run   func(context.Context) error
	}{
		{"certificates", d.certificates},
		{"nodes: a network namespace each, with a bridge for its pods, joined by a wire", d.nodes},
		{"smeshd on each node: in the node's namespace, in a cgroup of its own, enrolling the node's pods' parent cgroup", d.smeshds},
		{"pods: a network namespace each, eth0 on the node's br0, a cgroup below the enrolled one, a pause process", func(ctx context.Context) error { return d.pods(ctx, blob) }},
		{"pod client-a (node a) -> nginx in pod web-b (node b): another node", d.fetcher(&d.clientA, &d.webB, 1)},
		{"the same again: the new connection rides the tunnel link the previous step left idle in node a's pool", d.fetcher(&d.clientA, &d.webB, 1)},
		{"twice at once: one connection takes the pooled link, the other needs a new link, whose TLS handshake resumes the session", d.fetcher(&d.clientA, &d.webB, 2)},
		{"pod client-a (node a) -> nginx in pod web-a (node a): the same node, another pod", d.fetcher(&d.clientA, &d.webA, 1)},
		{"pod client-b (node b) -> nginx in pod web-a (node a): the other way", d.fetcher(&d.clientB, &d.webA, 1)},
		{"what smeshd serves: GET /debug/namespaces on each node's admin endpoint (" + adminAddr + " in the node's namespace)", d.served},
		{"stop: SIGTERM to each smeshd, then remove the pods, nodes, cgroups and files", d.stop},
	}
	for i, s := range steps {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("interrupted before step %d", i+1)
		}
		d.step = i + 1
		say("%d. %s", d.step, s.title)
		if err := s.run(ctx); err != nil {
			if ctx.Err() != nil {
				err = errors.New("interrupted")
			}
			return fmt.Errorf("step %d (%s): %w", i+1, s.title, err)
		}
		say("")
	}
	return nil
}

func say(format string, args ...any) { fmt.Printf(format+"\n", args...) }
