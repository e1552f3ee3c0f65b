package kube

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"

	"github.com/smesh-dev/smesh/pkg/identity"
	"github.com/smesh-dev/smesh/pkg/policy"
)

// Options configure a Watcher.
type Options struct {
	// API reaches the API server (NewAPI).
	API API
	// NoWatchList: API cannot stream a list as a watch (client-go's fake
	// clientset), so the informers list and then watch.
	NoWatchList bool
	// NodeName is the node whose pods are watched.
	NodeName string
	// TrustDomain is the mesh's ([tunnel.tls] trust_domain): an enrolled
	// pod's identity is spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT.
	TrustDomain spiffeid.TrustDomain
	// LabelKey and LabelValue are the mesh label.
	LabelKey, LabelValue string
	// StrictKey and StrictValue are the strict label ("" key: none).
	StrictKey, StrictValue string
	// Resolver finds pods' cgroups.
	Resolver *Resolver
	// Retry is how often the cgroups of enrolled pods that were not found
	// are looked for again (the kubelet makes a pod's cgroup after the
	// pod is scheduled); 0 means 1s.
	Retry time.Duration
	// Recheck is how often the cgroups found are checked to still exist
	// (a pod's cgroup can go before its object, which then brings no
	// event); 0 means 30s.
	Recheck time.Duration
	Logger  zerolog.Logger
}

// Pod is one pod of this node as /debug/pods shows it.
type Pod struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	UID       string `json:"uid"`
	// Enrolled: the pod or its namespace carries the mesh label.
	Enrolled bool `json:"enrolled"`
	// Why is what decided Enrolled: "pod label", "namespace label", ...
	Why    string `json:"why"`
	Cgroup string `json:"cgroup,omitempty"`
	// ServiceAccount is the pod's (spec.serviceAccountName), Identity the
	// SPIFFE ID it speaks as (identity.Kubernetes), for enrolled pods.
	ServiceAccount string `json:"serviceAccount,omitempty"`
	Identity       string `json:"identity,omitempty"`
	// Strict: an enrolled pod that accepts TCP only through the mesh (it
	// or its namespace carries the strict label), but on ExemptPorts, the
	// ports its containers' probes name (the kubelet's probes come from
	// the node, outside the mesh).
	Strict      bool     `json:"strict,omitempty"`
	ExemptPorts []uint16 `json:"exemptPorts,omitempty"`
	// Error says why an enrolled pod's cgroup was not found.
	Error string `json:"error,omitempty"`
}

// Watcher follows the pods scheduled to one node and the namespaces, and
// keeps the set of cgroups of the pods in the mesh. It implements
// daemon.PodSource.
type Watcher struct {
	o       Options
	log     zerolog.Logger
	pods    cache.SharedIndexInformer
	ns      cache.SharedIndexInformer
	dirty   chan struct{} // an informer changed something
	changed chan struct{} // the set of cgroups changed
	synced  chan struct{} // closed once the first set is computed
	done    chan struct{} // closed when Run returns

	mu      sync.Mutex
	first   bool                       // update ran once
	cgroups []string                   // sorted
	ids     map[string]spiffeid.ID     // enrolled pod cgroup -> identity
	wls     map[string]policy.Workload // enrolled pod cgroup -> as policy sees it
	strict  map[string][]uint16        // strict pod cgroup -> exempt ports
	view    []Pod                      // for /debug/pods
	known   map[string]string          // pod UID -> cgroup found; owned by Run
}

// NewWatcher prepares a watcher; Run starts it.
func NewWatcher(o Options) *Watcher {
	if o.Retry == 0 {
		o.Retry = time.Second
	}
	if o.Recheck == 0 {
		o.Recheck = 30 * time.Second
	}
	w := &Watcher{
		o:       o,
		log:     o.Logger.With().Str("component", "kubernetes").Str("node", o.NodeName).Logger(),
		dirty:   make(chan struct{}, 1),
		changed: make(chan struct{}, 1),
		synced:  make(chan struct{}),
		done:    make(chan struct{}),
		known:   make(map[string]string),
	}
	// Only this node's pods: the API server filters by spec.nodeName, so
	// a node's smeshd never holds the cluster's pods.
	onNode := NodeSelector(o.NodeName)
	w.pods = cache.NewSharedIndexInformer(w.listWatcher(&cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			opts.FieldSelector = onNode
			return o.API.List(ctx, "pods", opts)
		},
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			opts.FieldSelector = onNode
			return o.API.Watch(ctx, "pods", opts)
		},
	}), &corev1.Pod{}, 0, cache.Indexers{})
	w.ns = cache.NewSharedIndexInformer(w.listWatcher(&cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			return o.API.List(ctx, "namespaces", opts)
		},
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			return o.API.Watch(ctx, "namespaces", opts)
		},
	}), &corev1.Namespace{}, 0, cache.Indexers{})
	// Keep only what the decision needs: a node's pods carry large specs
	// and statuses that smeshd never reads.
	w.pods.SetTransform(trimPod)
	w.ns.SetTransform(trimNamespace)
	poke := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { w.poke() },
		UpdateFunc: func(any, any) { w.poke() },
		DeleteFunc: func(any) { w.poke() },
	}
	w.pods.AddEventHandler(poke)
	w.ns.AddEventHandler(poke)
	return w
}

// listWatcher tells the reflector whether the client can stream lists.
func (w *Watcher) listWatcher(lw *cache.ListWatch) cache.ListerWatcher {
	return cache.ToListWatcherWithWatchListSemantics(lw, watchListSupport(!w.o.NoWatchList))
}

// watchListSupport answers client-go's question
// (watchlist.DoesClientNotSupportWatchListSemantics).
type watchListSupport bool

func (s watchListSupport) IsWatchListSemanticsUnSupported() bool { return !bool(s) }

func (w *Watcher) poke() {
	select {
	case w.dirty <- struct{}{}:
	default:
	}
}

// Run watches until ctx is done.
func (w *Watcher) Run(ctx context.Context) {
	defer close(w.done)
	go w.pods.RunWithContext(ctx)
	go w.ns.RunWithContext(ctx)
	if !cache.WaitForCacheSync(ctx.Done(), w.pods.HasSynced, w.ns.HasSynced) {
		return
	}
	w.update()
	close(w.synced)
	retry := time.NewTicker(w.o.Retry)
	defer retry.Stop()
	recheck := time.NewTicker(w.o.Recheck)
	defer recheck.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.dirty:
			w.update()
		case <-retry.C:
			if w.unresolved() {
				w.update()
			}
		case <-recheck.C:
			w.update()
		}
	}
}

// WaitSynced returns once the pods and namespaces have been listed and the
// first set of cgroups is known, or with an error when ctx ends first.
func (w *Watcher) WaitSynced(ctx context.Context) error {
	select {
	case <-w.synced:
		return nil
	case <-w.done:
		return errors.New("kubernetes: watcher stopped before the pods were listed")
	case <-ctx.Done():
		return fmt.Errorf("waiting for the pods of node %s from the Kubernetes API: %w", w.o.NodeName, ctx.Err())
	}
}

// Cgroups are the cgroup directories of the pods in the mesh, sorted.
func (w *Watcher) Cgroups() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.cgroups)
}

// Identities are the identities of the pods in the mesh, by cgroup (the
// cgroups of Cgroups whose pod's identity is valid).
func (w *Watcher) Identities() map[string]spiffeid.ID {
	w.mu.Lock()
	defer w.mu.Unlock()
	return maps.Clone(w.ids)
}

// Strict are the strict pods in the mesh, by cgroup (of Cgroups), with
// their exempt ports (those their probes name).
func (w *Watcher) Strict() map[string][]uint16 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return maps.Clone(w.strict)
}

// Workloads are the pods in the mesh as authorization policy sees them
// (identity, namespace, labels), by cgroup (those of Identities).
func (w *Watcher) Workloads() map[string]policy.Workload {
	w.mu.Lock()
	defer w.mu.Unlock()
	return maps.Clone(w.wls)
}

// Changed receives a value after Cgroups, Identities, Workloads or Strict
// changed.
func (w *Watcher) Changed() <-chan struct{} { return w.changed }

// Pods describes this node's pods for /debug/pods.
func (w *Watcher) Pods() any {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.view)
}

func (w *Watcher) unresolved() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, p := range w.view {
		if p.Enrolled && p.Cgroup == "" {
			return true
		}
	}
	return false
}

// update recomputes the set from the informers' stores. It runs only on
// Run's goroutine.
func (w *Watcher) update() {
	nsLabels := make(map[string]map[string]string)
	for _, obj := range w.ns.GetStore().List() {
		if ns, ok := obj.(*corev1.Namespace); ok {
			nsLabels[ns.Name] = ns.Labels
		}
	}
	var view []Pod
	var cgroups []string
	ids := make(map[string]spiffeid.ID)
	strict := make(map[string][]uint16)
	wls := make(map[string]policy.Workload)
	seen := make(map[string]bool)
	for _, obj := range w.pods.GetStore().List() {
		pod, ok := obj.(*corev1.Pod)
		if !ok {
			continue
		}
		in, why := w.decide(pod, nsLabels[pod.Namespace])
		p := Pod{Namespace: pod.Namespace, Name: pod.Name, UID: string(pod.UID), Enrolled: in, Why: why}
		if in {
			p.ServiceAccount = pod.Spec.ServiceAccountName
			if p.ServiceAccount == "" {
				p.ServiceAccount = "default" // what the API server fills in
			}
			// Without a trust domain (tests of the enrolment alone)
			// pods have no identity.
			var id spiffeid.ID
			idErr := errors.New("no trust domain")
			if !w.o.TrustDomain.IsZero() {
				id, idErr = identity.Kubernetes(w.o.TrustDomain, pod.Namespace, p.ServiceAccount)
			}
			if idErr == nil {
				p.Identity = id.String()
			}
			uid := string(pod.UID)
			seen[uid] = true
			cg, err := w.cgroupOf(uid, string(pod.Status.QOSClass))
			if err != nil {
				p.Error = err.Error()
			} else {
				p.Cgroup = cg
				cgroups = append(cgroups, cg)
				if p.Strict, p.Why = w.decideStrict(pod, nsLabels[pod.Namespace], p.Why); p.Strict {
					p.ExemptPorts = ProbePorts(pod)
					strict[cg] = p.ExemptPorts
				}
				if idErr == nil {
					ids[cg] = id
					wls[cg] = policy.Workload{ID: id, Namespace: pod.Namespace, Labels: pod.Labels}
				} else if !w.o.TrustDomain.IsZero() {
					// A name no SPIFFE ID can hold: captured, but
					// speaking as the node.
					p.Error = fmt.Sprintf("no workload identity: %v", idErr)
				}
			}
		}
		view = append(view, p)
	}
	for uid := range w.known {
		if !seen[uid] {
			delete(w.known, uid)
		}
	}
	sort.Slice(view, func(i, j int) bool {
		if view[i].Namespace != view[j].Namespace {
			return view[i].Namespace < view[j].Namespace
		}
		return view[i].Name < view[j].Name
	})
	sort.Strings(cgroups)
	cgroups = slices.Compact(cgroups)

	w.mu.Lock()
	old, oldIDs, oldWls, oldStrict, first := w.cgroups, w.ids, w.wls, w.strict, !w.first
	w.cgroups, w.ids, w.wls, w.strict, w.view, w.first = cgroups, ids, wls, strict, view, true
	w.mu.Unlock()
	sameWls := maps.EqualFunc(oldWls, wls, func(a, b policy.Workload) bool {
		return a.ID == b.ID && a.Namespace == b.Namespace && maps.Equal(a.Labels, b.Labels)
	})
	if slices.Equal(old, cgroups) && maps.Equal(oldIDs, ids) && sameWls && maps.EqualFunc(oldStrict, strict, slices.Equal) && !first {
		return
	}
	w.log.Info().Int("pods", len(view)).Strs("cgroups", cgroups).Msg("pods in the mesh changed")
	select {
	case w.changed <- struct{}{}:
	default:
	}
}

// decide says whether a pod of this node is in the mesh, and why. The pod's
// own label wins over its namespace's, so a pod can opt out of a meshed
// namespace (or into an unmeshed one).
func (w *Watcher) decide(pod *corev1.Pod, nsLabels map[string]string) (bool, string) {
	switch {
	case pod.Spec.NodeName != w.o.NodeName:
		// The API server filters by node; this is only a second line.
		return false, "on node " + pod.Spec.NodeName
	case pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed:
		return false, "phase " + string(pod.Status.Phase)
	}
	if v, ok := pod.Labels[w.o.LabelKey]; ok {
		if v == w.o.LabelValue {
			return true, "pod label"
		}
		return false, "pod label " + w.o.LabelKey + "=" + v
	}
	if v, ok := nsLabels[w.o.LabelKey]; ok && v == w.o.LabelValue {
		return true, "namespace label"
	}
	return false, "no label"
}

// decideStrict says whether a pod in the mesh is strict, adding the reason
// to why. As with the mesh label, the pod's own label wins over its
// namespace's.
func (w *Watcher) decideStrict(pod *corev1.Pod, nsLabels map[string]string, why string) (bool, string) {
	if w.o.StrictKey == "" {
		return false, why
	}
	if v, ok := pod.Labels[w.o.StrictKey]; ok {
		if v == w.o.StrictValue {
			return true, why + ", strict by pod label"
		}
		return false, why
	}
	if v, ok := nsLabels[w.o.StrictKey]; ok && v == w.o.StrictValue {
		return true, why + ", strict by namespace label"
	}
	return false, why
}

// ProbePorts are the TCP ports the probes of a pod's containers (readiness,
// liveness, startup; httpGet, tcpSocket, grpc) name, a named port looked
// up in the probe's own container's ports, sorted. The kubelet probes from
// the node, outside the mesh: a strict pod accepts plaintext there.
func ProbePorts(pod *corev1.Pod) []uint16 {
	var out []uint16
	for _, containers := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for _, c := range containers {
			for _, pr := range []*corev1.Probe{c.ReadinessProbe, c.LivenessProbe, c.StartupProbe} {
				if pr == nil {
					continue
				}
				var port int
				switch {
				case pr.HTTPGet != nil:
					port = containerPort(c, pr.HTTPGet.Port.IntValue(), pr.HTTPGet.Port.StrVal)
				case pr.TCPSocket != nil:
					port = containerPort(c, pr.TCPSocket.Port.IntValue(), pr.TCPSocket.Port.StrVal)
				case pr.GRPC != nil:
					port = int(pr.GRPC.Port)
				}
				if port > 0 && port <= 65535 {
					out = append(out, uint16(port))
				}
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// containerPort is a probe's port: num, or the container's port named name.
func containerPort(c corev1.Container, num int, name string) int {
	if name == "" {
		return num
	}
	for _, p := range c.Ports {
		if p.Name == name && (p.Protocol == "" || p.Protocol == corev1.ProtocolTCP) {
			return int(p.ContainerPort)
		}
	}
	return 0
}

// cgroupOf finds the cgroup of an enrolled pod, remembering it while it
// exists.
func (w *Watcher) cgroupOf(uid, qos string) (string, error) {
	if cg, ok := w.known[uid]; ok {
		if _, err := os.Stat(cg); err == nil {
			return cg, nil
		}
		delete(w.known, uid)
	}
	cg, err := w.o.Resolver.Resolve(uid, qos)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			w.log.Warn().Err(err).Str("uid", uid).Msg("finding a pod's cgroup")
		}
		return "", err
	}
	w.known[uid] = cg
	return cg, nil
}

// trimPod keeps what decide and Resolve read.
func trimPod(obj any) (any, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID, Labels: pod.Labels,
			ResourceVersion: pod.ResourceVersion,
		},
		Spec: corev1.PodSpec{NodeName: pod.Spec.NodeName, ServiceAccountName: pod.Spec.ServiceAccountName,
			InitContainers: trimContainers(pod.Spec.InitContainers), Containers: trimContainers(pod.Spec.Containers)},
		Status: corev1.PodStatus{Phase: pod.Status.Phase, QOSClass: pod.Status.QOSClass},
	}, nil
}

// trimContainers keeps what ProbePorts reads: the probes' ports and the
// containers' named ports, of containers that have a probe.
func trimContainers(cs []corev1.Container) []corev1.Container {
	var out []corev1.Container
	for _, c := range cs {
		t := corev1.Container{Name: c.Name}
		for _, pr := range []struct{ from, to **corev1.Probe }{
			{&c.ReadinessProbe, &t.ReadinessProbe}, {&c.LivenessProbe, &t.LivenessProbe}, {&c.StartupProbe, &t.StartupProbe},
		} {
			if p := *pr.from; p != nil {
				q := &corev1.Probe{}
				switch {
				case p.HTTPGet != nil:
					q.HTTPGet = &corev1.HTTPGetAction{Port: p.HTTPGet.Port}
				case p.TCPSocket != nil:
					q.TCPSocket = &corev1.TCPSocketAction{Port: p.TCPSocket.Port}
				case p.GRPC != nil:
					q.GRPC = &corev1.GRPCAction{Port: p.GRPC.Port}
				}
				*pr.to = q
			}
		}
		if t.ReadinessProbe == nil && t.LivenessProbe == nil && t.StartupProbe == nil {
			continue
		}
		for _, p := range c.Ports {
			if p.Name != "" {
				t.Ports = append(t.Ports, corev1.ContainerPort{Name: p.Name, ContainerPort: p.ContainerPort, Protocol: p.Protocol})
			}
		}
		out = append(out, t)
	}
	return out
}

func trimNamespace(obj any) (any, error) {
	ns, ok := obj.(*corev1.Namespace)
	if !ok {
		return obj, nil
	}
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
		Name: ns.Name, UID: ns.UID, Labels: ns.Labels, ResourceVersion: ns.ResourceVersion,
	}}, nil
}
