package kube

import (
	"context"
	"fmt"
	"net/url"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"

	"github.com/smesh-dev/smesh/pkg/testenv/kubecp"
)

// These tests run the watcher in the test process against a real
// kube-apiserver and etcd (pkg/testenv/kubecp), with smeshd's own
// ServiceAccount token bound by deploy/kubernetes/rbac.yaml as shipped, and
// a fake cgroupfs tree (cgroupfs driver) where the test plays the kubelet.
// What they check is what the watcher hands the daemon: Cgroups and Pods.

const (
	realNode  = "node-a"
	otherNode = "node-b"
	// settle bounds every wait for the watcher to catch up. Generous: the
	// machines are shared, and a restarted API server needs a relist.
	settle = 30 * time.Second
	// flipBound bounds the wait for a label change to take effect. The
	// README promises "within a second"; measured here it takes a few
	// milliseconds, logged. The bound is robust to a loaded machine, and
	// far below the watcher's periodic recheck (30s), so a change that
	// only the recheck noticed fails.
	flipBound = 5 * time.Second
)

// apiWorld is a real control plane, smeshd's watcher on it, and a fake
// cgroup tree.
type apiWorld struct {
	t     *testing.T
	cp    *kubecp.ControlPlane
	admin *kubernetes.Clientset // the first API server, as admin
	// writer is who the test changes objects through: admin, or a second
	// API server's admin while the first is down.
	writer *kubernetes.Clientset
	mount  string
	api    *countingAPI
	w      *Watcher
}

func newAPIWorld(t *testing.T, o kubecp.Options) *apiWorld {
	t.Helper()
	cp := kubecp.StartWith(t, o)
	admin, err := kubernetes.NewForConfig(cp.Admin)
	if err != nil {
		t.Fatal(err)
	}
	wd := &apiWorld{t: t, cp: cp, admin: admin, writer: admin, mount: t.TempDir()}
	mkdirs(t, wd.mount, "kubepods/burstable", "kubepods/besteffort", "system.slice")
	return wd
}

// start runs the watcher for realNode with smeshd's ServiceAccount token
// and waits until it has synced.
func (wd *apiWorld) start() {
	t := wd.t
	sa := wd.cp.Smeshd(t)
	sa.UserAgent = "smeshd"
	api, err := NewAPI(sa)
	if err != nil {
		t.Fatal(err)
	}
	wd.api = &countingAPI{API: api}
	ctx, cancel := context.WithCancel(context.Background())
	wd.w = NewWatcher(Options{
		API:        wd.api,
		NodeName:   realNode,
		LabelKey:   labelKey,
		LabelValue: "enabled",
		Resolver:   NewResolver(wd.mount, ""),
		Retry:      20 * time.Millisecond,
		// Recheck stays at its 30s: every change here must come from
		// the watch, not from the periodic pass.
		Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel),
	})
	go wd.w.Run(ctx)
	t.Cleanup(func() {
		cancel()
		select {
		case <-wd.w.done:
		case <-time.After(settle):
			t.Error("the watcher did not stop")
		}
	})
	sctx, scancel := context.WithTimeout(ctx, settle)
	defer scancel()
	if err := wd.w.WaitSynced(sctx); err != nil {
		t.Fatal(err)
	}
}

func (wd *apiWorld) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), settle)
	wd.t.Cleanup(cancel)
	return ctx
}

// namespace creates a namespace and the default ServiceAccount its pods
// need (no controller-manager makes it).
func (wd *apiWorld) namespace(name string, labels map[string]string) {
	wd.t.Helper()
	ctx := wd.ctx()
	if _, err := wd.writer.CoreV1().Namespaces().Create(ctx, namespace(name, labels), metav1.CreateOptions{}); err != nil {
		wd.t.Fatal(err)
	}
	if _, err := wd.writer.CoreV1().ServiceAccounts(name).Create(ctx,
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil {
		wd.t.Fatal(err)
	}
}

func (wd *apiWorld) labelNamespace(name string, labels map[string]string) {
	wd.t.Helper()
	ctx := wd.ctx()
	ns, err := wd.writer.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		wd.t.Fatal(err)
	}
	ns.Labels = labels
	if _, err := wd.writer.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
		wd.t.Fatal(err)
	}
}

// pod creates a pod on nodeName and, as the kubelet of realNode would, its
// cgroup (BestEffort: the pod asks for no resources).
func (wd *apiWorld) pod(ns, name, nodeName string, labels map[string]string) *corev1.Pod {
	wd.t.Helper()
	p, err := wd.writer.CoreV1().Pods(ns).Create(wd.ctx(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
		Spec:       corev1.PodSpec{NodeName: nodeName, Containers: []corev1.Container{{Name: "c", Image: "pause"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		wd.t.Fatal(err)
	}
	if nodeName == realNode {
		mkdirs(wd.t, wd.cgroup(p), ".")
	}
	return p
}

func (wd *apiWorld) cgroup(p *corev1.Pod) string {
	return filepath.Join(wd.mount, "kubepods", "besteffort", "pod"+string(p.UID))
}

func (wd *apiWorld) labelPod(p *corev1.Pod, labels map[string]string) {
	wd.t.Helper()
	ctx := wd.ctx()
	cur, err := wd.writer.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
	if err != nil {
		wd.t.Fatal(err)
	}
	cur.Labels = labels
	if _, err := wd.writer.CoreV1().Pods(p.Namespace).Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		wd.t.Fatal(err)
	}
}

func (wd *apiWorld) deletePod(p *corev1.Pod) {
	wd.t.Helper()
	zero := int64(0)
	if err := wd.writer.CoreV1().Pods(p.Namespace).Delete(wd.ctx(), p.Name,
		metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		wd.t.Fatal(err)
	}
}

// state is what the watcher hands the daemon, in comparable form: the
// cgroups of the pods in the mesh, and every pod it knows of as
// "namespace/name:enrolled".
type state struct {
	cgroups []string
	pods    []string
}

func (wd *apiWorld) state() state {
	var s state
	s.cgroups = wd.w.Cgroups()
	for _, p := range wd.w.Pods().([]Pod) {
		s.pods = append(s.pods, fmt.Sprintf("%s/%s:%t", p.Namespace, p.Name, p.Enrolled))
	}
	return s
}

// want is the state where the pods in enrolled are in the mesh and those
// in out are known and not in it; no other pod may be known, none twice.
func (wd *apiWorld) want(enrolled, out []*corev1.Pod) state {
	var s state
	for _, p := range enrolled {
		s.cgroups = append(s.cgroups, wd.cgroup(p))
		s.pods = append(s.pods, p.Namespace+"/"+p.Name+":true")
	}
	for _, p := range out {
		s.pods = append(s.pods, p.Namespace+"/"+p.Name+":false")
	}
	sort.Strings(s.cgroups)
	sort.Strings(s.pods)
	return s
}

func (s state) equal(o state) bool {
	return slices.Equal(s.cgroups, o.cgroups) && slices.Equal(s.pods, o.pods)
}

// expect waits, at most settle, until the watcher's state is want.
func (wd *apiWorld) expect(why string, enrolled, out []*corev1.Pod) time.Duration {
	wd.t.Helper()
	return wd.expectWithin(settle, why, enrolled, out)
}

// expectWithin waits, at most bound, until the watcher's state is want,
// and returns how long that took.
func (wd *apiWorld) expectWithin(bound time.Duration, why string, enrolled, out []*corev1.Pod) time.Duration {
	wd.t.Helper()
	want := wd.want(enrolled, out)
	start := time.Now()
	for {
		got := wd.state()
		if got.equal(want) {
			return time.Since(start)
		}
		if time.Since(start) > bound {
			wd.t.Fatalf("%s: after %s the watcher has\n  cgroups %v\n  pods    %v\nwant\n  cgroups %v\n  pods    %v",
				why, bound, got.cgroups, got.pods, want.cgroups, want.pods)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// countingAPI is the watcher's API as it receives it: every pod object of
// every list and watch event, and every "410 Gone" (resourceVersion too
// old), whether as a watch request's error or as a watch event.
type countingAPI struct {
	API
	mu      sync.Mutex
	lists   map[string]int // resource -> lists made, plain or streamed
	podsOn  map[string]int // node -> pod objects received
	expired int
	errs    []string // the errors it got, as requests' errors or watch events
	// hold, when not nil, keeps new watches waiting until it is closed
	// (cut and resume); open are the watches running, with their start.
	hold chan struct{}
	open map[*proxyWatch]time.Time
}

// cut ends every running watch, as a dropped connection would, and keeps
// the watcher from watching again until resume. It first waits until each
// has run over a second: client-go takes a shorter watch that ends
// without events for an error and lists again at once, which would hide
// what the test wants to see (a watch resumed from its resourceVersion).
func (c *countingAPI) cut(t *testing.T) {
	t.Helper()
	c.mu.Lock()
	c.hold = make(chan struct{})
	open := c.open
	c.open = nil
	c.mu.Unlock()
	if len(open) == 0 {
		t.Fatal("cut: no watch is running")
	}
	for w, since := range open {
		if d := time.Until(since.Add(1100 * time.Millisecond)); d > 0 {
			time.Sleep(d)
		}
		w.Stop()
	}
}

func (c *countingAPI) resume() {
	c.mu.Lock()
	defer c.mu.Unlock()
	close(c.hold)
	c.hold = nil
}

func (c *countingAPI) failed(what string, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if apierrors.IsResourceExpired(err) || apierrors.IsGone(err) {
		c.expired++
	}
	c.errs = append(c.errs, what+": "+err.Error())
}

func (c *countingAPI) count(obj runtime.Object) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.podsOn == nil {
		c.podsOn = make(map[string]int)
	}
	switch o := obj.(type) {
	case *corev1.Pod:
		c.podsOn[o.Spec.NodeName]++
	case *corev1.PodList:
		for _, p := range o.Items {
			c.podsOn[p.Spec.NodeName]++
		}
	case *metav1.Status:
		if o.Code == 410 {
			c.expired++
		}
		c.errs = append(c.errs, fmt.Sprintf("watch event: %d %s", o.Code, o.Message))
	}
}

func (c *countingAPI) List(ctx context.Context, resource string, opts metav1.ListOptions) (runtime.Object, error) {
	obj, err := c.API.List(ctx, resource, opts)
	c.mu.Lock()
	if c.lists == nil {
		c.lists = make(map[string]int)
	}
	c.lists[resource]++
	c.mu.Unlock()
	if err != nil {
		c.failed("list "+resource, err)
	} else {
		c.count(obj)
	}
	return obj, err
}

func (c *countingAPI) Watch(ctx context.Context, resource string, opts metav1.ListOptions) (watch.Interface, error) {
	if opts.SendInitialEvents != nil && *opts.SendInitialEvents {
		// A list streamed as a watch (client-go's WatchList).
		c.mu.Lock()
		if c.lists == nil {
			c.lists = make(map[string]int)
		}
		c.lists[resource]++
		c.mu.Unlock()
	}
	c.mu.Lock()
	hold := c.hold
	c.mu.Unlock()
	if hold != nil {
		select {
		case <-hold:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	w, err := c.API.Watch(ctx, resource, opts)
	if err != nil {
		c.failed("watch "+resource, err)
		return nil, err
	}
	pw := &proxyWatch{in: w, out: make(chan watch.Event), cut: make(chan struct{}), done: make(chan struct{})}
	go pw.run(c.count)
	c.mu.Lock()
	if c.open == nil {
		c.open = make(map[*proxyWatch]time.Time)
	}
	c.open[pw] = time.Now()
	c.mu.Unlock()
	return pw, nil
}

// proxyWatch hands a watch's events on, counting them, until the server
// ends it or the test cuts it. A cut closes the result channel at once,
// as a watch the server ended cleanly: what the underlying watch says as
// it stops is not passed on.
type proxyWatch struct {
	in   watch.Interface
	out  chan watch.Event
	cut  chan struct{} // closed by Stop or a cut
	once sync.Once
	done chan struct{}
}

func (p *proxyWatch) run(count func(runtime.Object)) {
	defer close(p.done)
	defer close(p.out)
	defer p.in.Stop()
	for {
		select {
		case <-p.cut:
			return
		case ev, ok := <-p.in.ResultChan():
			if !ok {
				return
			}
			// A bookmark's object is an empty pod that carries only a
			// resourceVersion: no pod of any node.
			if ev.Type != watch.Bookmark {
				count(ev.Object)
			}
			select {
			case p.out <- ev:
			case <-p.cut:
				return
			}
		}
	}
}

func (p *proxyWatch) ResultChan() <-chan watch.Event { return p.out }

func (p *proxyWatch) Stop() {
	p.once.Do(func() { close(p.cut) })
	<-p.done
}

func (c *countingAPI) errors() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.errs)
}

func (c *countingAPI) snapshot() (lists map[string]int, podsOn map[string]int, expired int) {
	c.mu.Lock()
	defer c.mu.Unlock()

	lists, podsOn = make(map[string]int), make(map[string]int)
	for k, v := range c.lists {
		lists[k] = v
	}
	for k, v := range c.podsOn {
		podsOn[k] = v
	}
	return lists, podsOn, c.expired
}

// TestWatchAPIServerRestart stops the API server under a running watcher,
// changes pods through a second API server on the same etcd meanwhile (an
// HA control plane's other member), and starts the first again on the same
// port: the pods keep their state during the outage, and the changes are
// there after it.
func TestWatchAPIServerRestart(t *testing.T) {
	wd := newAPIWorld(t, kubecp.Options{})
	second, err := kubernetes.NewForConfig(wd.cp.Second(t))
	if err != nil {
		t.Fatal(err)
	}
	wd.namespace("meshed", meshLabel("enabled"))
	wd.namespace("plain", nil)
	a := wd.pod("meshed", "a", realNode, nil)
	b := wd.pod("plain", "b", realNode, meshLabel("enabled"))
	c := wd.pod("plain", "c", realNode, nil)
	wd.start()
	wd.expect("before the restart", []*corev1.Pod{a, b}, []*corev1.Pod{c})
	before := wd.state()

	var d *corev1.Pod
	wd.cp.RestartAPIServer(t, func() {
		// The watcher's API server is down: what it has stays.
		for i := 0; i < 10; i++ {
			if got := wd.state(); !got.equal(before) {
				t.Fatalf("with the API server down the watcher changed to %+v, from %+v", got, before)
			}
			time.Sleep(100 * time.Millisecond)
		}
		wd.writer = second
		d = wd.pod("meshed", "d", realNode, nil)
		wd.labelPod(c, meshLabel("enabled"))
		wd.labelPod(b, meshLabel("disabled"))
		wd.deletePod(a)
		wd.writer = wd.admin
		// Still the old state: it hears of none of this yet.
		if got := wd.state(); !got.equal(before) {
			t.Fatalf("with the API server down the watcher changed to %+v, from %+v", got, before)
		}
	})
	took := wd.expect("after the restart", []*corev1.Pod{c, d}, []*corev1.Pod{b})
	t.Logf("caught up %s after the API server was ready again", took.Round(time.Millisecond))

	// And it keeps watching.
	wd.labelPod(d, meshLabel("disabled"))
	wd.expect("a change after the restart", []*corev1.Pod{c}, []*corev1.Pod{b, d})
	lists, _, expired := wd.api.snapshot()
	t.Logf("lists %v, 410s %d; errors the watcher got: %q", lists, expired, wd.api.errors())
}

// TestWatchCompacted makes the watcher's resourceVersion too old: its
// watches are cut (as a dropped connection would) and held while pods
// change and etcd's history is compacted past what the watcher has seen.
// The API server runs without its watch cache, so the watch resumed from
// there reaches etcd, which answers "410 Gone". The watcher must list again
// and end with every pod once, none lost, none left over.
func TestWatchCompacted(t *testing.T) {
	wd := newAPIWorld(t, kubecp.Options{NoWatchCache: true})
	wd.namespace("meshed", meshLabel("enabled"))
	var pods []*corev1.Pod
	for i := 0; i < 6; i++ {
		pods = append(pods, wd.pod("meshed", fmt.Sprintf("p%d", i), realNode, nil))
	}
	wd.start()
	wd.expect("before", pods, nil)
	listsBefore, _, _ := wd.api.snapshot()

	wd.api.cut(t)
	wd.deletePod(pods[0])
	wd.deletePod(pods[1])
	wd.labelPod(pods[2], meshLabel("disabled"))
	var added []*corev1.Pod
	for i := 0; i < 3; i++ {
		added = append(added, wd.pod("meshed", fmt.Sprintf("new%d", i), realNode, nil))
	}
	// A pod deleted and made again under the same name: a relist that
	// kept the old one, or added the new one twice, shows.
	wd.deletePod(pods[3])
	pods[3] = wd.pod("meshed", "p3", realNode, nil)
	wd.labelNamespace("meshed", map[string]string{labelKey: "enabled", "changed": "yes"})
	rev := wd.cp.CompactEtcd(t)
	t.Logf("etcd compacted to revision %d", rev)
	wd.api.resume()

	enrolled := append([]*corev1.Pod{pods[3], pods[4], pods[5]}, added...)
	took := wd.expect("after the compaction", enrolled, []*corev1.Pod{pods[2]})
	t.Logf("caught up after %s", took.Round(time.Millisecond))

	lists, _, expired := wd.api.snapshot()
	t.Logf("pod lists %d before, %d after; 410s seen %d; errors: %q", listsBefore["pods"], lists["pods"], expired, wd.api.errors())
	if expired == 0 {
		t.Errorf("the watcher never got a 410 Gone: the test did not compact what it watched")
	}
	if lists["pods"] <= listsBefore["pods"] {
		t.Errorf("the watcher caught up without listing pods again (lists %d before, %d after)", listsBefore["pods"], lists["pods"])
	}
	// A stale entry would stay in the store: its old UID's cgroup is
	// gone, so check the UIDs too.
	for _, p := range wd.w.Pods().([]Pod) {
		if p.Name == "p3" && p.UID != string(pods[3].UID) {
			t.Errorf("p3 has UID %s, want the new pod's %s", p.UID, pods[3].UID)
		}
	}
	// And it keeps watching.
	wd.labelPod(pods[4], meshLabel("disabled"))
	wd.expect("a change after the relist", append([]*corev1.Pod{pods[3], pods[5]}, added...), []*corev1.Pod{pods[2], pods[4]})
}

// TestWatchLabelFlip: a pod's label enrols and unenrols it while the
// watcher runs. The README says "within a second"; the bound here is
// flipBound, the times seen are logged.
func TestWatchLabelFlip(t *testing.T) {
	wd := newAPIWorld(t, kubecp.Options{})
	wd.namespace("plain", nil)
	p := wd.pod("plain", "flip", realNode, nil)
	wd.start()
	wd.expect("unlabelled", nil, []*corev1.Pod{p})
	var took []time.Duration
	flip := func(labels map[string]string, why string, enrolled, out []*corev1.Pod) {
		t.Helper()
		start := time.Now()
		wd.labelPod(p, labels)
		wd.expectWithin(flipBound, why, enrolled, out)
		took = append(took, time.Since(start))
	}
	for i := 0; i < 5; i++ {
		flip(meshLabel("enabled"), fmt.Sprintf("flip %d: labelled", i), []*corev1.Pod{p}, nil)
		flip(nil, fmt.Sprintf("flip %d: unlabelled", i), nil, []*corev1.Pod{p})
	}
	slices.Sort(took)
	t.Logf("from the update (get and update, as admin) to the watcher's new set: min %s, median %s, max %s (%d flips)",
		took[0], took[len(took)/2], took[len(took)-1], len(took))
}

// TestWatchNamespaceLabel: a namespace's label enrols and unenrols its
// pods; a pod's own label still wins.
func TestWatchNamespaceLabel(t *testing.T) {
	wd := newAPIWorld(t, kubecp.Options{})
	wd.namespace("ns", nil)
	wd.namespace("other", nil)
	a := wd.pod("ns", "a", realNode, nil)
	b := wd.pod("ns", "b", realNode, nil)
	optOut := wd.pod("ns", "opt-out", realNode, meshLabel("disabled"))
	own := wd.pod("ns", "own", realNode, meshLabel("enabled"))
	elsewhere := wd.pod("other", "x", realNode, nil)
	wd.start()
	wd.expect("no namespace label", []*corev1.Pod{own}, []*corev1.Pod{a, b, optOut, elsewhere})
	var took []time.Duration
	flip := func(labels map[string]string, why string, enrolled, out []*corev1.Pod) {
		t.Helper()
		start := time.Now()
		wd.labelNamespace("ns", labels)
		wd.expectWithin(flipBound, why, enrolled, out)
		took = append(took, time.Since(start))
	}
	flip(meshLabel("enabled"), "namespace labelled", []*corev1.Pod{a, b, own}, []*corev1.Pod{optOut, elsewhere})
	flip(map[string]string{labelKey: "disabled"}, "namespace label changed", []*corev1.Pod{own}, []*corev1.Pod{a, b, optOut, elsewhere})
	flip(meshLabel("enabled"), "namespace labelled again", []*corev1.Pod{a, b, own}, []*corev1.Pod{optOut, elsewhere})
	flip(nil, "namespace label removed", []*corev1.Pod{own}, []*corev1.Pod{a, b, optOut, elsewhere})
	t.Logf("namespace label changes, from the update to the watcher's new set: %v", took)
}

// TestWatchOnlyThisNode: the real API server honours the field selector.
// Pods of another node, many and changing, never reach the watcher: not in
// what it lists or watches (counted where the watcher receives them), and
// every pod request smeshd's token made carries the selector (the API
// server's audit log).
func TestWatchOnlyThisNode(t *testing.T) {
	wd := newAPIWorld(t, kubecp.Options{})
	wd.namespace("meshed", meshLabel("enabled"))
	mine := wd.pod("meshed", "mine", realNode, nil)
	var others []*corev1.Pod
	for i := 0; i < 20; i++ {
		others = append(others, wd.pod("meshed", fmt.Sprintf("other-%d", i), otherNode, nil))
	}
	wd.start()
	wd.expect("synced", []*corev1.Pod{mine}, nil)
	// Churn on the other node while the watcher runs, then a change on
	// this one, so that everything before it has been delivered.
	for i, p := range others {
		if i%2 == 0 {
			wd.labelPod(p, meshLabel("disabled"))
		} else {
			wd.deletePod(p)
		}
	}
	wd.pod("meshed", "other-new", otherNode, nil)
	wd.labelPod(mine, meshLabel("disabled"))
	wd.expect("own pod opts out", nil, []*corev1.Pod{mine})

	_, podsOn, _ := wd.api.snapshot()
	t.Logf("pod objects the watcher received, by node: %v", podsOn)
	if podsOn[realNode] < 2 {
		t.Errorf("the watcher received %d objects of its own node's pod, want its list and its update", podsOn[realNode])
	}
	for n, count := range podsOn {
		if n != realNode {
			t.Errorf("the watcher received %d pod objects of node %q", count, n)
		}
	}

	user := "system:serviceaccount:smesh-system:smeshd"
	verbs := map[string]int{}
	for _, ev := range wd.cp.Audit(t) {
		if ev.User.Username != user || ev.ObjectRef == nil || ev.ObjectRef.Resource != "pods" {
			continue
		}
		u, err := url.ParseRequestURI(ev.RequestURI)
		if err != nil {
			t.Fatalf("audit: %q: %v", ev.RequestURI, err)
		}
		verbs[ev.Verb]++
		if sel := u.Query().Get("fieldSelector"); sel != NodeSelector(realNode) {
			t.Errorf("smeshd's %s %s: field selector %q, want %q", ev.Verb, ev.RequestURI, sel, NodeSelector(realNode))
		}
	}
	t.Logf("smeshd's pod requests in the audit log, by verb: %v", verbs)
	if verbs["watch"] == 0 {
		t.Errorf("no watch of pods by %s in the audit log", user)
	}
}
