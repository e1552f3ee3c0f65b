// Command svcscale measures smeshd's Service watcher (pkg/kube
// ServiceWatcher) feeding the data path's ServiceTable at cluster scale
// (make svc-scale; a benchmark, not a test): it starts a real
// kube-apiserver and etcd (pkg/testenv/kubecp), applies
// deploy/kubernetes/namespace.yaml and rbac.yaml as shipped, creates
// Services with one EndpointSlice each (as the EndpointSlice controller
// writes them), then runs the watcher in a child process of its own (this
// binary again, with smeshd's ServiceAccount token), once per -sinks entry,
// and reports:
//   - the child's time to WaitSynced, its RSS (anonymous and file pages)
//     and Go heap after sync, and its peak RSS at the end;
//   - with the "bpf" sink, the memory of the data path's BPF maps (memlock
//     in /proc/self/fdinfo, which for these kernels counts the entries in
//     use) and how full the service maps are;
//   - the latency from an EndpointSlice update (the moment the API write
//     starts) to the Sink's Update for that Service having returned in the
//     child, over -updates updates at -rate per second to Services picked
//     at random.
//
// The "bpf" child holds what smeshd would: the watcher's informer stores,
// its view of what the Sink holds, and the data path loaded as smeshd loads
// it (datapath.Load with the default map sizes; nothing is attached to any
// cgroup) with its ServiceTable as the Sink, so the map writes and the
// table's own copy of every Service are in the figures. The "null" child's
// Sink keeps nothing: the difference is what the BPF side costs. Only the
// Go code the watcher and the data path need runs in the child, but the
// binary is this one (with the typed client the filler uses): its file
// pages are not smeshd's.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/smesh-dev/smesh/pkg/cgroups"
	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/kube"
	"github.com/smesh-dev/smesh/pkg/procmem"
	"github.com/smesh-dev/smesh/pkg/services"
	"github.com/smesh-dev/smesh/pkg/testenv/kubecp"
)

// childEnv names the child's Sink: "null" or "bpf".
const childEnv = "SVCSCALE_CHILD"

// node is the child's node name: a tenth of the endpoints are on it.
const node = "node-0"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	var err error
	if os.Getenv(childEnv) != "" {
		err = child(ctx, os.Getenv(childEnv), os.Stdin, os.Stdout)
	} else {
		err = run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	}
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "svcscale:", err)
		os.Exit(1)
	}
}

type options struct {
	services, endpoints, namespaces int
	workers                         int
	updates, rate                   int
	manifests                       string
	sinks                           []string
	keep                            bool
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var o options
	fs := flag.NewFlagSet("svcscale", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.IntVar(&o.services, "services", 10000, "Services, each with one TCP port and one EndpointSlice")
	fs.IntVar(&o.endpoints, "endpoints", 10, "endpoints in each Service's slice")
	fs.IntVar(&o.namespaces, "namespaces", 20, "namespaces the Services are spread over")
	fs.IntVar(&o.workers, "workers", 48, "requests in flight while filling")
	fs.IntVar(&o.updates, "updates", 300, "EndpointSlice updates timed")
	fs.IntVar(&o.rate, "rate", 20, "EndpointSlice updates per second")
	fs.StringVar(&o.manifests, "manifests", "deploy/kubernetes", "directory of namespace.yaml and rbac.yaml")
	fs.BoolVar(&o.keep, "keep", false, "keep the control plane's directory (logs)")
	sinks := fs.String("sinks", "null,bpf", "Sinks to measure, one child each, in this order: null (keeps nothing), bpf (the data path's ServiceTable, BPF maps; needs root)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	for _, k := range strings.Split(*sinks, ",") {
		if k != "null" && k != "bpf" {
			return fmt.Errorf("-sinks: unknown sink %q (want null, bpf)", k)
		}
		o.sinks = append(o.sinks, k)
	}
	logf := func(format string, args ...any) {
		fmt.Fprintf(stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
	}
	dir, err := os.MkdirTemp("", "smesh-svcscale-")
	if err != nil {
		return err
	}
	if !o.keep {
		defer os.RemoveAll(dir)
	}
	// 10,000 ClusterIPs need more than the tests' /24.
	cp, err := kubecp.New(kubecp.Options{Dir: dir, Logf: logf,
		APIServerArgs: []string{"--service-cluster-ip-range=198.19.0.0/16"}})
	if err != nil {
		return err
	}
	defer cp.Close()
	admin, err := kubernetes.NewForConfig(withRate(cp.Admin))
	if err != nil {
		return err
	}
	manifests, err := filepath.Abs(o.manifests)
	if err != nil {
		return err
	}
	sa, err := cp.SmeshdToken(ctx, manifests)
	if err != nil {
		return err
	}

	start := time.Now()
	slicesByService, err := fill(ctx, admin, o, logf)
	if err != nil {
		return err
	}
	fillTook := time.Since(start)
	logf("filled %d Services and %d endpoints in %s", o.services, o.services*o.endpoints, fillTook.Round(time.Second))

	var results []sinkResult
	for _, kind := range o.sinks {
		r, err := measureSink(ctx, admin, sa, kind, slicesByService, o, logf)
		if err != nil {
			return fmt.Errorf("%s sink: %w", kind, err)
		}
		results = append(results, r)
	}
	printTable(stdout, o, cp.Version, fillTook, results)
	return nil
}

// sinkResult is one child's figures.
type sinkResult struct {
	kind        string
	synced, end stats
	lat         []time.Duration
}

// measureSink runs the watcher in a child with the given Sink, times
// o.updates slice updates through it and stops it.
func measureSink(ctx context.Context, admin *kubernetes.Clientset, sa *rest.Config, kind string,
	cur []*discoveryv1.EndpointSlice, o options, logf func(string, ...any)) (sinkResult, error) {
	r := sinkResult{kind: kind}
	c, err := startChild(ctx, sa, kind)
	if err != nil {
		return r, err
	}
	defer c.stop()
	if r.synced, err = c.synced(ctx); err != nil {
		return r, err
	}
	logf("%s child synced: %+v", kind, r.synced)
	if r.lat, err = timeUpdates(ctx, admin, c, cur, o, logf); err != nil {
		return r, err
	}
	r.end, err = c.report(ctx)
	return r, err
}

// withRate lifts client-go's default client-side limit (5 requests/s).
func withRate(rc *rest.Config) *rest.Config {
	rc = rest.CopyConfig(rc)
	rc.QPS, rc.Burst = 2000, 4000
	return rc
}

func nsName(i int) string { return fmt.Sprintf("svcscale-%02d", i) }

// endpointAddr is a pod address in the benchmark range: Services share
// addresses (a pod may back several Services), which changes nothing here.
func endpointAddr(n int) string {
	a := netip.MustParseAddr("198.18.0.0").As4()
	a[2], a[3] = byte(n>>8), byte(n)
	return netip.AddrFrom4(a).String()
}

// fill creates the namespaces, Services and slices, o.workers requests in
// flight, and returns each Service's slice as written.
func fill(ctx context.Context, admin *kubernetes.Clientset, o options, logf func(string, ...any)) ([]*discoveryv1.EndpointSlice, error) {
	for i := 0; i < o.namespaces; i++ {
		if _, err := admin.CoreV1().Namespaces().Create(ctx,
			&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: nsName(i)}}, metav1.CreateOptions{}); err != nil {
			return nil, err
		}
	}
	out := make([]*discoveryv1.EndpointSlice, o.services)
	jobs := make(chan int)
	errc := make(chan error, o.workers)
	var done atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < o.workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				s, err := createService(ctx, admin, o, i)
				if err != nil {
					errc <- err
					return
				}
				out[i] = s
				if n := done.Add(1); n%1000 == 0 {
					logf("%d Services", n)
				}
			}
		}()
	}
	var err error
feed:
	for i := 0; i < o.services; i++ {
		select {
		case jobs <- i:
		case err = <-errc:
			break feed
		case <-ctx.Done():
			err = ctx.Err()
			break feed
		}
	}
	close(jobs)
	wg.Wait()
	if err == nil {
		select {
		case err = <-errc:
		default:
		}
	}
	return out, err
}

func createService(ctx context.Context, admin *kubernetes.Clientset, o options, i int) (*discoveryv1.EndpointSlice, error) {
	ns, name := nsName(i%o.namespaces), fmt.Sprintf("svc-%05d", i)
	if _, err := admin.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": name}},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": name},
			Ports:    []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http"), Protocol: corev1.ProtocolTCP}},
		},
	}, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("service %s/%s: %w", ns, name, err)
	}
	return admin.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice(ns, name, i, o.endpoints, 0), metav1.CreateOptions{})
}

// slice is Service i's slice as the controller writes it (targetRef,
// zone, conditions), generation gen moving its first endpoint.
func slice(ns, name string, i, n, gen int) *discoveryv1.EndpointSlice {
	yes, no := true, false
	s := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name + "-abcde", Labels: map[string]string{
			discoveryv1.LabelServiceName: name, discoveryv1.LabelManagedBy: "endpointslice-controller.k8s.io",
		}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080)), Protocol: ptr(corev1.ProtocolTCP)}},
	}
	for j := 0; j < n; j++ {
		addr := endpointAddr(i*n + j)
		if j == 0 && gen > 0 {
			addr = endpointAddr(i*n + j + gen*7919) // another pod
		}
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{addr},
			Conditions: discoveryv1.EndpointConditions{Ready: &yes, Serving: &yes, Terminating: &no},
			NodeName:   ptr(fmt.Sprintf("node-%d", j)),
			Zone:       ptr("zone-a"),
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: fmt.Sprintf("%s-%d-7d9f8c6b5-x%dk", name, j, j)},
		})
	}
	return s
}

func ptr[T any](v T) *T { return &v }

// timeUpdates moves the first endpoint of random Services' slices, at
// o.rate per second, and times each from the start of its API write to the
// child's Sink Update showing the new address.
func timeUpdates(ctx context.Context, admin *kubernetes.Clientset, c *childProc, cur []*discoveryv1.EndpointSlice,
	o options, logf func(string, ...any)) ([]time.Duration, error) {
	var lat []time.Duration
	tick := time.NewTicker(time.Second / time.Duration(o.rate))
	defer tick.Stop()
	for u := 1; u <= o.updates; u++ {
		<-tick.C
		i := rand.IntN(len(cur))
		s := cur[i]
		svc := s.Labels[discoveryv1.LabelServiceName]
		next := slice(s.Namespace, svc, i, o.endpoints, u)
		next.ResourceVersion = s.ResourceVersion
		want := next.Endpoints[0].Addresses[0] + ":8080"
		key := s.Namespace + "/" + svc + ":http " + want
		wait := c.expect(key)
		start := time.Now()
		got, err := admin.DiscoveryV1().EndpointSlices(s.Namespace).Update(ctx, next, metav1.UpdateOptions{})
		if err != nil {
			return nil, err
		}
		cur[i] = got
		select {
		case at := <-wait:
			lat = append(lat, at.Sub(start))
		case <-time.After(30 * time.Second):
			return nil, fmt.Errorf("no sink update for %s within 30s", key)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	slices.Sort(lat)
	logf("%d updates timed", len(lat))
	return lat, nil
}

// stats is what the child reports.
type stats struct {
	SyncTook time.Duration `json:"sync_took"`
	// Of the bpf sink: the memlock of every map of the data path, of the
	// service maps alone, and the entries the services in force take.
	MapMemlock    int64                 `json:"map_memlock"`
	SvcMapMemlock int64                 `json:"svc_map_memlock"`
	Fill          *datapath.ServiceFill `json:"fill,omitempty"`
	RSS           int64                 `json:"rss"`
	RSSAnon       int64                 `json:"rss_anon"`
	RSSFile       int64                 `json:"rss_file"`
	PeakRSS       int64                 `json:"peak_rss"`
	HeapInuse     uint64                `json:"heap_inuse"`
	HeapAlloc     uint64                `json:"heap_alloc"`
	Sys           uint64                `json:"sys"`
	ServicePorts  int                   `json:"service_ports"`
	Backends      int                   `json:"backends"`
}

// childProc is the watcher's process: its stdout says "synced {json}",
// "update NAME FIRST-BACKEND UNIX-NANOS" after sync, "report {json}".
type childProc struct {
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	lines   chan string
	mu      sync.Mutex
	waiters map[string]chan time.Time
}

func startChild(ctx context.Context, sa *rest.Config, kind string) (*childProc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), childEnv+"="+kind)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	c := &childProc{cmd: cmd, stdin: in, lines: make(chan string, 16), waiters: make(map[string]chan time.Time)}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			line := sc.Text()
			if rest, ok := strings.CutPrefix(line, "update "); ok {
				f := strings.Fields(rest)
				ns, _ := strconv.ParseInt(f[2], 10, 64)
				c.mu.Lock()
				if w, ok := c.waiters[f[0]+" "+f[1]]; ok {
					w <- time.Unix(0, ns)
					delete(c.waiters, f[0]+" "+f[1])
				}
				c.mu.Unlock()
				continue
			}
			c.lines <- line
		}
		close(c.lines)
	}()
	cfg, _ := json.Marshal(childConfig{Host: sa.Host, CA: sa.TLSClientConfig.CAData, Token: sa.BearerToken})
	if _, err := in.Write(append(cfg, '\n')); err != nil {
		c.stop()
		return nil, err
	}
	return c, nil
}

// expect returns a channel that receives the time of the child's Sink
// Update of "NAME FIRST-BACKEND".
func (c *childProc) expect(key string) <-chan time.Time {
	ch := make(chan time.Time, 1)
	c.mu.Lock()
	c.waiters[key] = ch
	c.mu.Unlock()
	return ch
}

func (c *childProc) read(ctx context.Context, prefix string) (stats, error) {
	var s stats
	select {
	case line, ok := <-c.lines:
		if !ok {
			return s, errors.New("the watcher's process ended")
		}
		j, ok := strings.CutPrefix(line, prefix+" ")
		if !ok {
			return s, fmt.Errorf("the watcher's process said %q, want %s", line, prefix)
		}
		return s, json.Unmarshal([]byte(j), &s)
	case <-time.After(10 * time.Minute):
		return s, fmt.Errorf("no %s from the watcher's process in 10 minutes", prefix)
	case <-ctx.Done():
		return s, ctx.Err()
	}
}

func (c *childProc) synced(ctx context.Context) (stats, error) { return c.read(ctx, "synced") }

// report asks the child for its figures at the end (a line on stdin).
func (c *childProc) report(ctx context.Context) (stats, error) {
	if _, err := c.stdin.Write([]byte("report\n")); err != nil {
		return stats{}, err
	}
	return c.read(ctx, "report")
}

// stop ends the child by its PID.
func (c *childProc) stop() {
	c.stdin.Close()
	c.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		c.cmd.Process.Kill()
		<-done
	}
}

type childConfig struct {
	Host  string `json:"host"`
	CA    []byte `json:"ca"`
	Token string `json:"token"`
}

// printSink hands every change to next and, once synced, reports each
// Update when next has taken it: for the ServiceTable, when its map writes
// have returned and a connect() sees the new backends.
type printSink struct {
	next services.Sink
	live atomic.Bool
	mu   sync.Mutex
	out  *bufio.Writer
}

// nullSink keeps nothing.
type nullSink struct{}

func (nullSink) Update(services.Service) error { return nil }
func (nullSink) Delete(services.Key) error     { return nil }

func (p *printSink) Update(s services.Service) error {
	if err := p.next.Update(s); err != nil {
		return err
	}
	if !p.live.Load() {
		return nil
	}
	now := time.Now().UnixNano()
	first := "-"
	for _, b := range s.Backends {
		if b.Node == "node-0" {
			first = b.Addr.String()
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.out, "update %s %s %d\n", s.Name, first, now)
	return p.out.Flush()
}

func (p *printSink) Delete(k services.Key) error { return p.next.Delete(k) }

// loadDatapath loads the data path as smeshd does with the default
// configuration, attaching nothing to any cgroup: only the maps and
// programs exist, and no connection on the machine meets them. The proxy
// cgroup is this process's own; Load only reads its id.
func loadDatapath() (*datapath.Datapath, error) {
	mount, err := cgroups.Mount()
	if err != nil {
		return nil, err
	}
	own, err := cgroups.Of(mount, os.Getpid())
	if err != nil {
		return nil, err
	}
	c := config.Default()
	return datapath.Load(datapath.Options{
		Mode:             datapath.ModeSplice,
		ProxyAddr:        c.Outbound.Listen,
		ProxyAddr6:       c.Outbound.Listen6,
		ProxyCgroup:      own,
		MapSize:          c.Datapath.MapSize,
		ServiceMapSize:   c.Datapath.ServiceMapSize,
		BackendMapSize:   c.Datapath.BackendMapSize,
		SpliceProxyHops:  c.Datapath.SpliceProxyHops,
		SpliceQueueLimit: uint32(c.Datapath.SpliceQueueLimit.Bytes),
		Logger:           zerolog.New(os.Stderr).Level(zerolog.WarnLevel),
	})
}

// child runs the watcher as smeshd would with the Sink kind, reads its
// configuration from in, and reports on out.
func child(ctx context.Context, kind string, in io.Reader, out io.Writer) error {
	start := time.Now()
	var table *datapath.ServiceTable
	var next services.Sink = nullSink{}
	if kind == "bpf" {
		dp, err := loadDatapath()
		if err != nil {
			return fmt.Errorf("loading the data path: %w", err)
		}
		defer dp.Close()
		table = dp.Services()
		next = table
	}
	r := bufio.NewReader(in)
	line, err := r.ReadBytes('\n')
	if err != nil {
		return err
	}
	var cfg childConfig
	if err := json.Unmarshal(line, &cfg); err != nil {
		return err
	}
	api, err := kube.NewAPI(&rest.Config{Host: cfg.Host, BearerToken: cfg.Token,
		TLSClientConfig: rest.TLSClientConfig{CAData: cfg.CA}, UserAgent: "smeshd"})
	if err != nil {
		return err
	}
	bw := bufio.NewWriter(out)
	sink := &printSink{next: next, out: bw}
	k := config.Default().Kubernetes
	w, err := kube.StartServices(ctx, k, api, node, sink, zerolog.New(os.Stderr).Level(zerolog.WarnLevel))
	if err != nil {
		return err
	}
	if err := w.WaitSynced(ctx); err != nil {
		return err
	}
	took := time.Since(start)
	say := func(what string) error {
		runtime.GC()
		s := measure(w, table)
		s.SyncTook = took
		j, _ := json.Marshal(s)
		sink.mu.Lock()
		defer sink.mu.Unlock()
		fmt.Fprintf(bw, "%s %s\n", what, j)
		return bw.Flush()
	}
	if err := say("synced"); err != nil {
		return err
	}
	// SVCSCALE_HEAPPROFILE=FILE: where the memory after sync goes
	// (go tool pprof -sample_index=inuse_space FILE).
	if path := os.Getenv("SVCSCALE_HEAPPROFILE"); path != "" {
		f, err := os.Create(path)
		if err != nil {
			return err
		}
		if err := pprof.WriteHeapProfile(f); err != nil {
			return err
		}
		f.Close()
	}
	sink.live.Store(true)
	if _, err := r.ReadString('\n'); err != nil {
		return err
	}
	return say("report")
}

func measure(w *kube.ServiceWatcher, table *datapath.ServiceTable) stats {
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	s := stats{HeapInuse: m.HeapInuse, HeapAlloc: m.HeapAlloc, Sys: m.Sys}
	if table != nil {
		f := table.Fill()
		s.Fill = &f
		s.MapMemlock, s.SvcMapMemlock = mapMemory()
	}
	all := w.Services()
	s.ServicePorts = len(all)
	for _, x := range all {
		s.Backends += len(x.Backends)
	}
	if m, err := procmem.Of(0); err == nil {
		s.RSS, s.RSSAnon, s.RSSFile, s.PeakRSS = m.RSS, m.Anon, m.File, m.Peak
	}
	return s
}

// serviceMaps are the maps of bpf/connect/service.h, by the names the
// kernel keeps (15 characters at most).
var serviceMaps = map[string]bool{"smesh_services": true, "smesh_backends": true, "smesh_svc_membe": true, "smesh_affinity": true}

// mapMemory sums the memlock of the BPF maps this process holds: all of
// them, and the service maps alone. For hash maps without preallocation
// the kernel counts the entries in use (map_mem_usage, Linux 6.4+), so the
// figure grows with the Services.
func mapMemory() (all, svc int64) {
	ents, _ := os.ReadDir("/proc/self/fdinfo")
	seen := make(map[uint64]bool) // a map may have several fds
	for _, e := range ents {
		data, err := os.ReadFile("/proc/self/fdinfo/" + e.Name())
		if err != nil {
			continue
		}
		var memlock int64
		var id uint64
		for l := range strings.Lines(string(data)) {
			k, v, _ := strings.Cut(l, ":")
			v = strings.TrimSpace(v)
			switch k {
			case "memlock":
				memlock, _ = strconv.ParseInt(v, 10, 64)
			case "map_id":
				id, _ = strconv.ParseUint(v, 10, 32)
			}
		}
		if id == 0 || seen[id] {
			continue
		}
		seen[id] = true
		all += memlock
		if m, err := ebpf.NewMapFromID(ebpf.MapID(id)); err == nil {
			if info, err := m.Info(); err == nil && serviceMaps[info.Name] {
				svc += memlock
			}
			m.Close()
		}
	}
	return all, svc
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

func printTable(out io.Writer, o options, version string, fill time.Duration, rs []sinkResult) {
	row := func(name string, f func(r sinkResult) string) {
		fmt.Fprintf(out, "| %s |", name)
		for _, r := range rs {
			fmt.Fprintf(out, " %s |", f(r))
		}
		fmt.Fprintln(out)
	}
	fmt.Fprintf(out, "| Service watcher, kube-apiserver %s |", version)
	for _, r := range rs {
		fmt.Fprintf(out, " %s sink |", r.kind)
	}
	fmt.Fprint(out, "\n|---|")
	for range rs {
		fmt.Fprint(out, "---:|")
	}
	fmt.Fprintln(out)
	row(fmt.Sprintf("Services (one TCP port, one slice each) / endpoints: %d / %d; filled in %s",
		o.services, o.services*o.endpoints, fill.Round(time.Second)), func(sinkResult) string { return "" })
	row("Service ports and backends the Sink was given", func(r sinkResult) string {
		return fmt.Sprintf("%d, %d", r.synced.ServicePorts, r.synced.Backends)
	})
	row("Start to WaitSynced", func(r sinkResult) string { return r.synced.SyncTook.Round(time.Millisecond).String() })
	row("RSS after sync (anonymous; file)", func(r sinkResult) string {
		return fmt.Sprintf("%s (%s; %s)", mib(r.synced.RSS), mib(r.synced.RSSAnon), mib(r.synced.RSSFile))
	})
	row("Go heap in use after sync and GC (live objects)", func(r sinkResult) string {
		return fmt.Sprintf("%s (%s)", mib(int64(r.synced.HeapInuse)), mib(int64(r.synced.HeapAlloc)))
	})
	row("RSS at the end, peak RSS", func(r sinkResult) string { return mib(r.end.RSS) + ", " + mib(r.end.PeakRSS) })
	row("BPF maps after sync: all of the data path's (service maps)", func(r sinkResult) string {
		if r.synced.Fill == nil {
			return "-"
		}
		return fmt.Sprintf("%s (%s)", mib(r.synced.MapMemlock), mib(r.synced.SvcMapMemlock))
	})
	row("Service map entries in force / size: services; backends", func(r sinkResult) string {
		f := r.synced.Fill
		if f == nil {
			return "-"
		}
		return fmt.Sprintf("%d / %d; %d / %d", f.Services, f.MaxServices, f.Backends, f.MaxBackends)
	})
	row(fmt.Sprintf("Slice update to Sink Update returned (%d at %d/s): p50, p99, max", o.updates, o.rate), func(r sinkResult) string {
		q := func(p float64) time.Duration {
			return r.lat[min(len(r.lat)-1, int(p*float64(len(r.lat))))].Round(100 * time.Microsecond)
		}
		return fmt.Sprintf("%s, %s, %s", q(0.50), q(0.99), r.lat[len(r.lat)-1].Round(100*time.Microsecond))
	})
}
