package kube

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unique"

	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"

	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/services"
)

// The [kubernetes] prefer_local_backends values.
const (
	PreferClose  = "prefer_close"
	PreferAlways = "always"
	PreferNever  = "never"
)

const (
	// topologyModeAnnotation = Auto asks for topology-aware routing (the
	// annotation trafficDistribution replaces).
	topologyModeAnnotation = "service.kubernetes.io/topology-mode"
	// defaultAffinityTimeout is sessionAffinityConfig.clientIP's default
	// (3 hours), which the API server also fills in.
	defaultAffinityTimeout = 10800 * time.Second
	// byService is the EndpointSlice index by "namespace/service".
	byService = "service"
)

// ServiceOptions configure a ServiceWatcher.
type ServiceOptions struct {
	API API
	// NoWatchList: API cannot stream a list as a watch.
	NoWatchList bool
	// NodeName is this node: its backends are Local.
	NodeName string
	// PreferLocal is [kubernetes] prefer_local_backends.
	PreferLocal string
	Sink        services.Sink
	// Retry is how long a Service whose Sink call failed waits before it
	// is applied again; 0 means 1s.
	Retry  time.Duration
	Logger zerolog.Logger
}

// ServiceWatcher follows the cluster's Services and EndpointSlices and
// keeps a Sink holding one services.Service per ClusterIP and TCP port.
//
// Events only name the Service they concern ("namespace/name", from the
// object or from a slice's kubernetes.io/service-name label) in a pending
// set; Run recomputes those Services alone from the informers' stores and
// gives the Sink the difference from what it gave before. A burst of
// events for one Service (its slices rewritten one by one) collapses into
// one recomputation while Run is busy, and a relist that changes nothing
// (an API server restart) calls the Sink not at all.
type ServiceWatcher struct {
	o      ServiceOptions
	log    zerolog.Logger
	svcs   cache.SharedIndexInformer
	slices cache.SharedIndexInformer
	wake   chan struct{}
	synced chan struct{}
	done   chan struct{}

	pmu     sync.Mutex
	pending map[string]struct{} // Services to recompute

	mu sync.Mutex // guards given, for Services
	// given is what the Sink holds, by Service "namespace/name": only
	// what it accepted. A slice, not a map, per Service: most have one to
	// four keys, and a small map costs more than all of them.
	given map[string][]services.Service
	// owner is the Service whose entry the Sink holds for a key: a
	// ClusterIP freed by one Service and taken by another must not be
	// deleted when the first one's deletion is applied after the second's
	// update. Owned by Run.
	owner map[services.Key]string
	// failed are the Services whose last apply had a Sink error, retried
	// after Retry. Owned by Run.
	failed map[string]struct{}
	// failing are the Services whose Sink errors were logged: a Service
	// that keeps failing (a full map) is logged once at error level and
	// then at debug level on every retry, not every second. Owned by Run.
	failing map[string]bool
}

// StartServices starts watching the cluster's Services and EndpointSlices
// through api until ctx is done, handing sink one Service per ClusterIP and
// TCP port; node is this node's name (its backends are Local). The caller
// waits for WaitSynced before it relies on the sink being complete.
func StartServices(ctx context.Context, cfg config.Kubernetes, api API, node string, sink services.Sink, log zerolog.Logger) (*ServiceWatcher, error) {
	switch {
	case api == nil || sink == nil:
		return nil, errors.New("kubernetes services: no API or no sink")
	case node == "":
		return nil, errors.New("kubernetes services: this node's name is empty")
	}
	switch cfg.PreferLocalBackends {
	case PreferClose, PreferAlways, PreferNever:
	default:
		return nil, fmt.Errorf("kubernetes.prefer_local_backends: %q is not allowed (want one of %q, %q, %q)",
			cfg.PreferLocalBackends, PreferClose, PreferAlways, PreferNever)
	}
	w := NewServiceWatcher(ServiceOptions{API: api, NodeName: node, PreferLocal: cfg.PreferLocalBackends, Sink: sink, Logger: log})
	go w.Run(ctx)
	return w, nil
}

// NewServiceWatcher prepares a watcher; Run starts it.
func NewServiceWatcher(o ServiceOptions) *ServiceWatcher {
	if o.Retry == 0 {
		o.Retry = time.Second
	}
	w := &ServiceWatcher{
		o:       o,
		log:     o.Logger.With().Str("component", "kubernetes-services").Logger(),
		wake:    make(chan struct{}, 1),
		synced:  make(chan struct{}),
		done:    make(chan struct{}),
		pending: make(map[string]struct{}),
		given:   make(map[string][]services.Service),
		owner:   make(map[services.Key]string),
		failed:  make(map[string]struct{}),
		failing: make(map[string]bool),
	}
	lw := func(resource string) cache.ListerWatcher {
		return cache.ToListWatcherWithWatchListSemantics(&cache.ListWatch{
			ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
				return o.API.List(ctx, resource, opts)
			},
			WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
				return o.API.Watch(ctx, resource, opts)
			},
		}, watchListSupport(!o.NoWatchList))
	}
	w.svcs = cache.NewSharedIndexInformer(lw("services"), &corev1.Service{}, 0, cache.Indexers{})
	w.slices = cache.NewSharedIndexInformer(lw("endpointslices"), &discoveryv1.EndpointSlice{}, 0,
		cache.Indexers{byService: func(obj any) ([]string, error) {
			if name := sliceService(obj); name != "" {
				return []string{name}, nil
			}
			return nil, nil
		}})
	// Every Service and slice of the cluster is held: the stores keep
	// only what serviceSet reads, in types of their own.
	w.svcs.SetTransform(toService)
	w.slices.SetTransform(toSlice)
	w.svcs.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { w.mark(serviceName(obj)) },
		UpdateFunc: func(_, obj any) { w.mark(serviceName(obj)) },
		DeleteFunc: func(obj any) { w.mark(serviceName(obj)) },
	})
	w.slices.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) { w.mark(sliceService(obj)) },
		// A slice relabelled to another Service changes both.
		UpdateFunc: func(old, obj any) { w.mark(sliceService(old), sliceService(obj)) },
		DeleteFunc: func(obj any) { w.mark(sliceService(obj)) },
	})
	return w
}

// serviceName is "namespace/name" of a Service or its tombstone.
func serviceName(obj any) string {
	name, _ := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	return name
}

// sliceService is "namespace/service" of the Service a slice (or its
// tombstone) belongs to, or "" when it names none.
func sliceService(obj any) string {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	if s, ok := obj.(*kubeSlice); ok {
		return s.service
	}
	return ""
}

func (w *ServiceWatcher) mark(names ...string) {
	w.pmu.Lock()
	for _, n := range names {
		if n != "" {
			w.pending[n] = struct{}{}
		}
	}
	w.pmu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// Run watches until ctx is done.
func (w *ServiceWatcher) Run(ctx context.Context) {
	defer close(w.done)
	go w.svcs.RunWithContext(ctx)
	go w.slices.RunWithContext(ctx)
	// Both stores complete before the first pass: a Service applied before
	// its slices were listed would reach the Sink with no backends.
	if !cache.WaitForCacheSync(ctx.Done(), w.svcs.HasSynced, w.slices.HasSynced) {
		return
	}
	for _, name := range w.svcs.GetStore().ListKeys() {
		w.mark(name)
	}
	w.apply()
	w.log.Info().Int("services", len(w.svcs.GetStore().ListKeys())).Int("endpointslices", len(w.slices.GetStore().ListKeys())).
		Int("service_ports", len(w.Services())).Msg("services synced")
	close(w.synced)
	retry := time.NewTicker(w.o.Retry)
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.wake:
			w.apply()
		case <-retry.C:
			if len(w.failed) > 0 {
				for name := range w.failed {
					w.mark(name)
				}
				clear(w.failed)
			}
		}
	}
}

// WaitSynced returns once the Services and EndpointSlices have been listed
// and the Sink given them all, or with an error when ctx ends first.
func (w *ServiceWatcher) WaitSynced(ctx context.Context) error {
	select {
	case <-w.synced:
		return nil
	case <-w.done:
		return errors.New("kubernetes: service watcher stopped before the services were listed")
	case <-ctx.Done():
		return fmt.Errorf("waiting for the Services and EndpointSlices from the Kubernetes API: %w", ctx.Err())
	}
}

// Services are what the Sink holds, sorted by name, VIP and port (for
// /debug/services).
func (w *ServiceWatcher) Services() []services.Service {
	w.mu.Lock()
	var all []services.Service
	for _, set := range w.given {
		all = append(all, set...)
	}
	w.mu.Unlock()
	slices.SortFunc(all, func(a, b services.Service) int {
		return cmp.Or(strings.Compare(a.Name, b.Name), a.VIP.Compare(b.VIP), cmp.Compare(a.Port, b.Port))
	})
	return all
}

// apply recomputes the pending Services. It runs only on Run's goroutine.
func (w *ServiceWatcher) apply() {
	w.pmu.Lock()
	pending := w.pending
	w.pending = make(map[string]struct{}, len(pending))
	w.pmu.Unlock()
	for name := range pending {
		w.applyOne(name)
	}
}

// applyOne gives the Sink the difference between what it holds for the
// Service name and what the stores say now.
func (w *ServiceWatcher) applyOne(name string) {
	var want []services.Service
	if obj, ok, _ := w.svcs.GetStore().GetByKey(name); ok {
		var eps []*kubeSlice
		objs, _ := w.slices.GetIndexer().ByIndex(byService, name)
		for _, o := range objs {
			if s, ok := o.(*kubeSlice); ok {
				eps = append(eps, s)
			}
		}
		if svc, ok := obj.(*kubeService); ok {
			want = serviceSet(svc, eps, w.o.NodeName, w.o.PreferLocal)
		}
	}
	w.mu.Lock()
	had := w.given[name]
	w.mu.Unlock()
	now := make([]services.Service, 0, len(want))
	failed := false
	for _, s := range want {
		old, ok := find(had, s.Key)
		if ok && sameService(old, s) {
			now = append(now, old)
			continue
		}
		if err := w.o.Sink.Update(s); err != nil {
			w.sinkError(name, err).Str("service", s.Name).Stringer("key", s.Key).Msg("giving the data path a service; retrying")
			failed = true
			if ok {
				now = append(now, old) // still what the Sink holds
			}
			continue
		}
		now = append(now, s)
		w.owner[s.Key] = name
	}
	for _, old := range had {
		if _, ok := find(want, old.Key); ok || w.owner[old.Key] != name {
			continue // still wanted, or another Service holds the key now
		}
		if err := w.o.Sink.Delete(old.Key); err != nil {
			w.sinkError(name, err).Str("service", old.Name).Stringer("key", old.Key).Msg("removing a service from the data path; retrying")
			failed = true
			now = append(now, old)
			continue
		}
		delete(w.owner, old.Key)
	}
	if failed {
		w.failed[name] = struct{}{}
		w.failing[name] = true
	} else if w.failing[name] {
		delete(w.failing, name)
		w.log.Info().Str("service", name).Msg("the data path took the service after errors")
	}
	w.mu.Lock()
	if len(now) == 0 {
		delete(w.given, name)
	} else {
		w.given[name] = now
	}
	w.mu.Unlock()
}

// sinkError starts the log event of a Sink error for the Service name:
// at error level the first time, at debug level while it keeps failing.
func (w *ServiceWatcher) sinkError(name string, err error) *zerolog.Event {
	if w.failing[name] {
		return w.log.Debug().Err(err)
	}
	return w.log.Error().Err(err).Dur("retry", w.o.Retry).Str("repeats", "logged at debug level until it succeeds")
}

// find looks k up in the few keys of one Service.
func find(set []services.Service, k services.Key) (services.Service, bool) {
	for _, s := range set {
		if s.Key == k {
			return s, true
		}
	}
	return services.Service{}, false
}

func sameService(a, b services.Service) bool {
	return a.Key == b.Key && a.Name == b.Name && a.AffinityTimeout == b.AffinityTimeout &&
		a.LocalOnly == b.LocalOnly && a.PreferLocal == b.PreferLocal && slices.Equal(a.Backends, b.Backends)
}

// kubeService is what the watcher keeps of a Service: its informer's
// transform (toService) makes it from the API object, which is then
// dropped. A Service object takes about 1.5 KB in memory, an EndpointSlice
// endpoint some 300 bytes; these keep a tenth of that, which is most of
// smeshd's memory in a cluster of 10,000 Services (README, Kubernetes).
type kubeService struct {
	metav1.ObjectMeta // namespace, name and resourceVersion only
	// vips are the ClusterIPs (spec.clusterIPs, unmapped); none for a
	// headless or ExternalName Service, which have no address to
	// translate.
	vips []netip.Addr
	// ports are the TCP ports: connect4/6 balance TCP only.
	ports     []namedPort
	affinity  time.Duration
	localOnly bool
	// asksClose: trafficDistribution or the topology annotation asks for
	// close endpoints.
	asksClose bool
}

// kubeSlice is what the watcher keeps of an EndpointSlice (toSlice).
type kubeSlice struct {
	metav1.ObjectMeta // namespace, name and resourceVersion only
	// service is the "namespace/name" of its Service (label
	// kubernetes.io/service-name); "" for none.
	service string
	// is6: an IPv6 slice; FQDN slices are kept with no endpoints.
	is6       bool
	ports     []namedPort // TCP only
	endpoints []endpoint
	// hinted: an endpoint carries topology hints (the controller wrote
	// them for a Service that asks for close endpoints).
	hinted bool
}

type namedPort struct {
	name string
	port uint16
}

type endpoint struct {
	addr                        netip.Addr // the first address: consumers use that one alone (the API's rule)
	node                        string     // interned: a cluster has far fewer nodes than endpoints
	ready, serving, terminating bool
}

func (s *kubeService) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }
func (s *kubeSlice) GetObjectKind() schema.ObjectKind   { return schema.EmptyObjectKind }

// DeepCopyObject copies; stored objects are never changed, so the slices
// are shared.
func (s *kubeService) DeepCopyObject() runtime.Object { c := *s; return &c }
func (s *kubeSlice) DeepCopyObject() runtime.Object   { c := *s; return &c }

func storedMeta(m metav1.ObjectMeta) metav1.ObjectMeta {
	return metav1.ObjectMeta{Namespace: m.Namespace, Name: m.Name, ResourceVersion: m.ResourceVersion}
}

// toService is the Services informer's transform. It passes on what is
// not a *corev1.Service (the transform must be idempotent).
func toService(obj any) (any, error) {
	svc, ok := obj.(*corev1.Service)
	if !ok {
		return obj, nil
	}
	k := &kubeService{ObjectMeta: storedMeta(svc.ObjectMeta)}
	if svc.Spec.Type != corev1.ServiceTypeExternalName {
		ips := svc.Spec.ClusterIPs
		if len(ips) == 0 && svc.Spec.ClusterIP != "" {
			ips = []string{svc.Spec.ClusterIP}
		}
		for _, s := range ips {
			if a, err := netip.ParseAddr(s); err == nil { // "None" (headless) does not parse
				k.vips = append(k.vips, a.Unmap())
			}
		}
	}
	for _, p := range svc.Spec.Ports {
		if (p.Protocol == corev1.ProtocolTCP || p.Protocol == "") && p.Port > 0 && p.Port <= 65535 {
			k.ports = append(k.ports, namedPort{name: p.Name, port: uint16(p.Port)})
		}
	}
	if svc.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		k.affinity = defaultAffinityTimeout
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			k.affinity = time.Duration(*c.ClientIP.TimeoutSeconds) * time.Second
		}
	}
	k.localOnly = svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
	if td := svc.Spec.TrafficDistribution; td != nil {
		switch *td {
		case corev1.ServiceTrafficDistributionPreferClose, corev1.ServiceTrafficDistributionPreferSameZone,
			corev1.ServiceTrafficDistributionPreferSameNode:
			k.asksClose = true
		}
	}
	if strings.EqualFold(svc.Annotations[topologyModeAnnotation], "auto") {
		k.asksClose = true
	}
	return k, nil
}

// toSlice is the EndpointSlices informer's transform.
func toSlice(obj any) (any, error) {
	s, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return obj, nil
	}
	k := &kubeSlice{ObjectMeta: storedMeta(s.ObjectMeta), is6: s.AddressType == discoveryv1.AddressTypeIPv6}
	if svc := s.Labels[discoveryv1.LabelServiceName]; svc != "" {
		k.service = s.Namespace + "/" + svc
	}
	if s.AddressType != discoveryv1.AddressTypeIPv4 && s.AddressType != discoveryv1.AddressTypeIPv6 {
		return k, nil
	}
	for _, p := range s.Ports {
		if p.Port == nil || *p.Port <= 0 || *p.Port > 65535 || (p.Protocol != nil && *p.Protocol != corev1.ProtocolTCP) {
			continue
		}
		name := ""
		if p.Name != nil {
			name = *p.Name
		}
		k.ports = append(k.ports, namedPort{name: name, port: uint16(*p.Port)})
	}
	k.endpoints = make([]endpoint, 0, len(s.Endpoints))
	for _, e := range s.Endpoints {
		if e.Hints != nil && (len(e.Hints.ForZones) > 0 || len(e.Hints.ForNodes) > 0) {
			k.hinted = true
		}
		if len(e.Addresses) == 0 {
			continue
		}
		a, err := netip.ParseAddr(e.Addresses[0])
		if err != nil {
			continue
		}
		// ready nil means ready; serving nil means as ready; terminating
		// nil means not (the API's documented defaults).
		ep := endpoint{addr: a.Unmap(), ready: e.Conditions.Ready == nil || *e.Conditions.Ready}
		ep.serving = ep.ready
		if e.Conditions.Serving != nil {
			ep.serving = *e.Conditions.Serving
		}
		ep.terminating = e.Conditions.Terminating != nil && *e.Conditions.Terminating
		if e.NodeName != nil {
			ep.node = unique.Make(*e.NodeName).Value()
		}
		k.endpoints = append(k.endpoints, ep)
	}
	return k, nil
}

// serviceSet is what the data path needs of one Kubernetes Service: a
// services.Service per ClusterIP (both families when dual-stack) and TCP
// port, its backends from the Service's EndpointSlices of that family.
func serviceSet(svc *kubeService, eps []*kubeSlice, node, prefer string) []services.Service {
	preferLocal := false
	switch prefer {
	case PreferAlways:
		preferLocal = true
	case PreferClose:
		preferLocal = svc.asksClose || slices.ContainsFunc(eps, func(s *kubeSlice) bool { return s.hinted })
	}
	var out []services.Service
	for _, vip := range svc.vips {
		for _, p := range svc.ports {
			portName := p.name
			if portName == "" {
				portName = strconv.Itoa(int(p.port))
			}
			out = append(out, services.Service{
				Key:             services.Key{VIP: vip, Port: p.port},
				Name:            svc.Namespace + "/" + svc.Name + ":" + portName,
				Backends:        backends(eps, vip.Is6(), p.name, node),
				AffinityTimeout: svc.affinity,
				LocalOnly:       svc.localOnly,
				PreferLocal:     preferLocal,
			})
		}
	}
	return out
}

// backends are the endpoints of the slices of one family for the service
// port named portName. A slice's port of that name carries the port the
// endpoints listen on: the Service's targetPort, resolved per pod when it
// is a named port. An endpoint listed in two slices (the controller moving
// it) is taken once, ready if either says so.
func backends(eps []*kubeSlice, is6 bool, portName, node string) []services.Backend {
	n := 0
	for _, s := range eps {
		if s.is6 == is6 {
			n += len(s.endpoints)
		}
	}
	out := make([]services.Backend, 0, n) // held as long as the Service is: no spare capacity
	for _, s := range eps {
		if s.is6 != is6 {
			continue
		}
		i := slices.IndexFunc(s.ports, func(p namedPort) bool { return p.name == portName })
		if i < 0 {
			continue
		}
		for _, e := range s.endpoints {
			out = append(out, services.Backend{
				Addr: netip.AddrPortFrom(e.addr, s.ports[i].port), Node: e.node, Local: e.node != "" && e.node == node,
				Ready: e.ready, Serving: e.serving, Terminating: e.terminating,
			})
		}
	}
	// Ordered by address, the readiest first, so that a duplicate keeps
	// its best and the Sink sees a stable order (an unchanged set compares
	// equal).
	rank := func(b services.Backend) int {
		switch {
		case b.Ready:
			return 0
		case b.Serving:
			return 1
		}
		return 2
	}
	slices.SortFunc(out, func(a, b services.Backend) int {
		return cmp.Or(a.Addr.Compare(b.Addr), cmp.Compare(rank(a), rank(b)), strings.Compare(a.Node, b.Node))
	})
	return slices.CompactFunc(out, func(a, b services.Backend) bool { return a.Addr == b.Addr })
}
