// Command kubescale measures what a cluster's size does to smeshd (make
// kube-scale; a benchmark, not a test): it starts a real kube-apiserver and
// etcd (pkg/testenv/kubecp), applies deploy/kubernetes/namespace.yaml and
// rbac.yaml as shipped, fills the server with Node objects and Pods, starts
// smeshd for one node as the DaemonSet runs it (its ServiceAccount token,
// NODE_NAME, [kubernetes] enabled) and reports, for each cluster size, how
// long smeshd takes to be ready, its memory, what it received from the API
// server and its CPU while pods change on other nodes and on its own.
//
// The sizes grow in one run: the objects of the first size stay, the second
// adds to them, and a fresh smeshd is started for each. The table goes to
// stdout (Markdown), progress to stderr.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"

	"github.com/smesh-dev/smesh/pkg/testenv/kubecp"
)

// size is one cluster the benchmark measures smeshd in.
type size struct {
	Nodes int // Node objects
	Extra int // pods spread over the nodes that are not busy
}

// options are the flags.
type options struct {
	smeshd      string
	manifests   string
	sizes       []size
	busyNodes   int // the first nodes, smeshd's own among them,
	busyPods    int // carry this many pods each
	namespaces  int
	workers     int
	fillTimeout time.Duration
	window      time.Duration // of each CPU measurement
	rate        int           // pod changes per second while churning
	keep        bool
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubescale:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return errors.New("run as root: smeshd loads its BPF programs and runs in a cgroup of its own")
	}
	logf := func(format string, args ...any) {
		fmt.Fprintf(stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
	}
	dir, err := os.MkdirTemp("", "smesh-kubescale-")
	if err != nil {
		return err
	}
	if o.keep {
		logf("keeping %s (logs of kube-apiserver, etcd and smeshd)", dir)
	} else {
		defer os.RemoveAll(dir)
	}
	cp, err := kubecp.New(kubecp.Options{Dir: dir, Logf: logf, AuditPolicy: auditPolicy})
	if err != nil {
		return err
	}
	defer cp.Close()
	audit := &audit{path: cp.AuditLog}

	// The filling and the churn: as many requests at once as the pool
	// has workers, no client-side rate limit.
	adminCfg := *cp.Admin
	adminCfg.QPS, adminCfg.Burst = -1, 0
	admin, err := kubernetes.NewForConfig(&adminCfg)
	if err != nil {
		return err
	}
	sa, err := cp.SmeshdToken(ctx, o.manifests)
	if err != nil {
		return err
	}
	proxy, err := newCountingProxy(strings.TrimPrefix(cp.Admin.Host, "https://"))
	if err != nil {
		return err
	}
	defer proxy.Close()
	world := &world{cs: admin, o: o, logf: logf}
	if err := world.prepare(ctx); err != nil {
		return err
	}

	var results []result
	for _, s := range o.sizes {
		r := result{size: s}
		if err := world.fill(ctx, s, &r); err != nil {
			return err
		}
		logf("cluster: %d nodes, %d pods, %d on %s; starting smeshd", r.nodes, r.pods, r.ownPods, ownNode)
		if err := measure(ctx, o, world, cp, sa.BearerToken, proxy, audit, dir, &r); err != nil {
			return err
		}
		results = append(results, r)
	}
	printTable(stdout, o, cp.Version, results)
	return nil
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	fs := flag.NewFlagSet("kubescale", flag.ContinueOnError)
	fs.SetOutput(stderr)
	o := options{}
	fs.StringVar(&o.smeshd, "smeshd", "bin/smeshd", "the smeshd binary to measure")
	fs.StringVar(&o.manifests, "manifests", "deploy/kubernetes", "directory of namespace.yaml and rbac.yaml")
	sizes := fs.String("sizes", "100:1000,5000:100000",
		"cluster sizes, in growing order: NODES:PODS, PODS spread over the nodes beyond the busy ones")
	fs.IntVar(&o.busyNodes, "busy-nodes", 50, "nodes with -busy-pods pods each, smeshd's node among them")
	fs.IntVar(&o.busyPods, "busy-pods", 30, "pods on each busy node")
	fs.IntVar(&o.namespaces, "namespaces", 20, "namespaces the pods are spread over")
	fs.IntVar(&o.workers, "workers", 48, "requests in flight while filling")
	fs.DurationVar(&o.fillTimeout, "fill-timeout", 10*time.Minute, "stop filling a size after this long and measure what was made")
	fs.DurationVar(&o.window, "window", 20*time.Second, "length of each CPU measurement (idle, churn elsewhere, churn on smeshd's node)")
	fs.IntVar(&o.rate, "rate", 100, "pod changes per second while churning")
	fs.BoolVar(&o.keep, "keep", false, "keep the working directory with the logs")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	for _, s := range strings.Split(*sizes, ",") {
		n, p, ok := strings.Cut(s, ":")
		nodes, err1 := strconv.Atoi(n)
		pods, err2 := strconv.Atoi(p)
		if !ok || err1 != nil || err2 != nil || nodes <= o.busyNodes || pods < 0 {
			return o, fmt.Errorf("-sizes: %q: want NODES:PODS with NODES above -busy-nodes (%d)", s, o.busyNodes)
		}
		if len(o.sizes) > 0 {
			last := o.sizes[len(o.sizes)-1]
			if nodes < last.Nodes || pods < last.Extra {
				return o, fmt.Errorf("-sizes: %q is smaller than the size before it: sizes only grow", s)
			}
		}
		o.sizes = append(o.sizes, size{Nodes: nodes, Extra: pods})
	}
	if o.busyNodes < 1 || o.busyPods < 1 || o.namespaces < 1 || o.workers < 1 || o.rate < 1 || o.window <= 0 {
		return o, errors.New("-busy-nodes, -busy-pods, -namespaces, -workers, -rate and -window must be positive")
	}
	return o, nil
}
