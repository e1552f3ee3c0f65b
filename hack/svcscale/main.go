// Command svcscale measures smeshd's Service watcher (pkg/kube
// ServiceWatcher) at cluster scale (make svc-scale; a benchmark, not a
// test): it starts a real kube-apiserver and etcd (pkg/testenv/kubecp),
// applies deploy/kubernetes/namespace.yaml and rbac.yaml as shipped, creates
// Services with one EndpointSlice each (as the EndpointSlice controller
// writes them), then runs the watcher in a child process of its own (this
// binary again, with smeshd's ServiceAccount token) and reports:
//   - the child's time to WaitSynced, its RSS (anonymous and file pages)
//     and Go heap after sync, and its peak RSS at the end;
//   - the latency from an EndpointSlice update (the moment the API write
//     starts) to the Sink's Update for that Service in the child, over
//     -updates updates at -rate per second to Services picked at random.
//
// The child holds what smeshd would: the watcher's informer stores and its
// view of what the Sink holds; its Sink keeps nothing (a data path keeps
// its Services in BPF maps, kernel memory). Only the Go code the watcher
// needs runs in the child, but the binary is this one (with the typed
// client the filler uses): its file pages are not smeshd's.
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

	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/kube"
	"github.com/smesh-dev/smesh/pkg/services"
	"github.com/smesh-dev/smesh/pkg/testenv/kubecp"
)

const childEnv = "SVCSCALE_CHILD"

// node is the child's node name: a tenth of the endpoints are on it.
const node = "node-0"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	var err error
	if os.Getenv(childEnv) != "" {
		err = child(ctx, os.Stdin, os.Stdout)
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
	if err := fs.Parse(args); err != nil {
		return err
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

	c, err := startChild(ctx, sa)
	if err != nil {
		return err
	}
	defer c.stop()
	synced, err := c.synced(ctx)
	if err != nil {
		return err
	}
	logf("child synced: %+v", synced)

	lat, err := timeUpdates(ctx, admin, c, slicesByService, o, logf)
	if err != nil {
		return err
	}
	end, err := c.report(ctx)
	if err != nil {
		return err
	}
	printTable(stdout, o, cp.Version, fillTook, synced, end, lat)
	return nil
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
	SyncTook     time.Duration `json:"sync_took"`
	RSS          int64         `json:"rss"`
	RSSAnon      int64         `json:"rss_anon"`
	RSSFile      int64         `json:"rss_file"`
	PeakRSS      int64         `json:"peak_rss"`
	HeapInuse    uint64        `json:"heap_inuse"`
	HeapAlloc    uint64        `json:"heap_alloc"`
	Sys          uint64        `json:"sys"`
	ServicePorts int           `json:"service_ports"`
	Backends     int           `json:"backends"`
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

func startChild(ctx context.Context, sa *rest.Config) (*childProc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), childEnv+"=1")
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

// printSink reports each Update once synced.
type printSink struct {
	live atomic.Bool
	mu   sync.Mutex
	out  *bufio.Writer
}

func (p *printSink) Update(s services.Service) error {
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

func (p *printSink) Delete(services.Key) error { return nil }

// child runs the watcher as smeshd would, reads its configuration from in,
// and reports on out.
func child(ctx context.Context, in io.Reader, out io.Writer) error {
	start := time.Now()
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
	sink := &printSink{out: bw}
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
		s := measure(w)
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

func measure(w *kube.ServiceWatcher) stats {
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	s := stats{HeapInuse: m.HeapInuse, HeapAlloc: m.HeapAlloc, Sys: m.Sys}
	all := w.Services()
	s.ServicePorts = len(all)
	for _, x := range all {
		s.Backends += len(x.Backends)
	}
	status, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(status), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			s.RSS = kb << 10
		case "RssAnon:":
			s.RSSAnon = kb << 10
		case "RssFile:":
			s.RSSFile = kb << 10
		case "VmHWM:":
			s.PeakRSS = kb << 10
		}
	}
	return s
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

func printTable(out io.Writer, o options, version string, fill time.Duration, synced, end stats, lat []time.Duration) {
	q := func(p float64) time.Duration {
		return lat[min(len(lat)-1, int(p*float64(len(lat))))].Round(100 * time.Microsecond)
	}
	fmt.Fprintf(out, "| Service watcher, kube-apiserver %s | |\n|---|---:|\n", version)
	fmt.Fprintf(out, "| Services (one TCP port, one slice each) / endpoints | %d / %d |\n", o.services, o.services*o.endpoints)
	fmt.Fprintf(out, "| Filling (Services and slices) | %s |\n", fill.Round(time.Second))
	fmt.Fprintf(out, "| Service ports and backends the Sink was given | %d, %d |\n", synced.ServicePorts, synced.Backends)
	fmt.Fprintf(out, "| Start to WaitSynced | %s |\n", synced.SyncTook.Round(time.Millisecond))
	fmt.Fprintf(out, "| RSS after sync (anonymous; file) | %s (%s; %s) |\n", mib(synced.RSS), mib(synced.RSSAnon), mib(synced.RSSFile))
	fmt.Fprintf(out, "| Go heap in use after sync and GC (live objects) | %s (%s) |\n", mib(int64(synced.HeapInuse)), mib(int64(synced.HeapAlloc)))
	fmt.Fprintf(out, "| RSS at the end, peak RSS | %s, %s |\n", mib(end.RSS), mib(end.PeakRSS))
	fmt.Fprintf(out, "| Slice update to Sink Update (%d at %d/s): p50, p99, max | %s, %s, %s |\n",
		len(lat), o.rate, q(0.50), q(0.99), lat[len(lat)-1].Round(100*time.Microsecond))
}
