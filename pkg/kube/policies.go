package kube

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/smesh-dev/smesh/pkg/policy"
)

// AuthorizationPolicies is Istio's AuthorizationPolicy resource, read
// through the dynamic client as unstructured objects: smeshd links no
// Istio Go module, and pkg/policy.FromIstio converts the spec.
var AuthorizationPolicies = schema.GroupVersionResource{Group: "security.istio.io", Version: "v1", Resource: "authorizationpolicies"}

// PolicyOptions configures a PolicyWatcher.
type PolicyOptions struct {
	Client dynamic.Interface
	// RootNamespace holds the mesh-wide policies; "" is
	// policy.DefaultRootNamespace, Istio's default.
	RootNamespace string
	// Retry is how often a missing AuthorizationPolicy CRD (or a refused
	// list) is looked for again; 0 is 10 s.
	Retry  time.Duration
	Logger zerolog.Logger
}

// PolicyWatcher follows the AuthorizationPolicy objects of every namespace
// and keeps a current policy.Set compiled from them.
//
// Without the AuthorizationPolicy CRD (a cluster without Istio's CRDs) there
// are no policies: it says so once and looks again every Retry, so that
// installing the CRD later is picked up without restarting smeshd.
type PolicyWatcher struct {
	o       PolicyOptions
	log     zerolog.Logger
	set     atomic.Pointer[policy.Set]
	changed chan struct{}
	synced  chan struct{}
	done    chan struct{}
	wake    chan struct{}

	syncOnce sync.Once
	// reported are the problems logged for the current generation, so
	// that a problem is logged once, not at every change of another
	// policy. Owned by Run.
	reported map[policy.Problem]bool
}

// NewPolicyWatcher prepares a watcher; Run starts it.
func NewPolicyWatcher(o PolicyOptions) *PolicyWatcher {
	if o.RootNamespace == "" {
		o.RootNamespace = policy.DefaultRootNamespace
	}
	if o.Retry == 0 {
		o.Retry = 10 * time.Second
	}
	w := &PolicyWatcher{
		o:        o,
		log:      o.Logger.With().Str("component", "kubernetes-policies").Logger(),
		changed:  make(chan struct{}, 1),
		synced:   make(chan struct{}),
		done:     make(chan struct{}),
		wake:     make(chan struct{}, 1),
		reported: make(map[policy.Problem]bool),
	}
	w.set.Store(policy.NewSet(nil, o.RootNamespace))
	return w
}

// StartPolicies starts watching the AuthorizationPolicies of the cluster rc
// reaches until ctx is done.
func StartPolicies(ctx context.Context, rc *rest.Config, rootNamespace string, log zerolog.Logger) (*PolicyWatcher, error) {
	c, err := dynamic.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes dynamic client: %w", err)
	}
	w := NewPolicyWatcher(PolicyOptions{Client: c, RootNamespace: rootNamespace, Logger: log})
	go w.Run(ctx)
	return w, nil
}

// InClusterConfig is the REST configuration of the cluster smeshd runs in,
// for StartPolicies.
func InClusterConfig() (*rest.Config, error) {
	rc, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("kubernetes.enabled: reaching the API server from inside the cluster: %w", err)
	}
	rc.UserAgent = "smeshd"
	return rc, nil
}

// Set is the current set of policies; empty until the first list.
func (w *PolicyWatcher) Set() *policy.Set { return w.set.Load() }

// Changed receives after Set changed (one value for a burst of changes);
// read Set then.
func (w *PolicyWatcher) Changed() <-chan struct{} { return w.changed }

// WaitSynced returns once the policies have been listed (or found not to
// exist: no CRD), or with an error when ctx ends first.
func (w *PolicyWatcher) WaitSynced(ctx context.Context) error {
	select {
	case <-w.synced:
		return nil
	case <-w.done:
		return errors.New("kubernetes: policy watcher stopped before the policies were listed")
	case <-ctx.Done():
		return fmt.Errorf("waiting for the AuthorizationPolicies from the Kubernetes API: %w", ctx.Err())
	}
}

// Run watches until ctx is done.
func (w *PolicyWatcher) Run(ctx context.Context) {
	defer close(w.done)
	if !w.waitForCRD(ctx) {
		return
	}
	res := w.o.Client.Resource(AuthorizationPolicies)
	inf := cache.NewSharedIndexInformer(&cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			return res.List(ctx, opts)
		},
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			return res.Watch(ctx, opts)
		},
	}, &unstructured.Unstructured{}, 0, cache.Indexers{})
	// Only the spec is read: drop what can be large and is not
	// (managedFields, kubectl's last-applied-configuration annotation).
	_ = inf.SetTransform(func(obj any) (any, error) {
		if u, ok := obj.(*unstructured.Unstructured); ok {
			u.SetManagedFields(nil)
			u.SetAnnotations(nil)
		}
		return obj, nil
	})
	// The CRD removed later: the informer's lists fail until it is back;
	// say so as plainly as at the start, once, instead of client-go's
	// generic log at every retry.
	gone := false
	_ = inf.SetWatchErrorHandlerWithContext(func(ctx context.Context, r *cache.Reflector, err error) {
		if apierrors.IsNotFound(err) {
			if !gone {
				w.log.Warn().Err(err).Msg("AuthorizationPolicy CRD not installed: no policies")
				gone = true
			}
			return
		}
		gone = false
		cache.DefaultWatchErrorHandler(ctx, r, err)
	})
	mark := func() {
		select {
		case w.wake <- struct{}{}:
		default:
		}
	}
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { mark() },
		UpdateFunc: func(_, _ any) { mark() },
		DeleteFunc: func(any) { mark() },
	})
	go inf.RunWithContext(ctx)
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return
	}
	w.rebuild(inf.GetStore())
	w.syncOnce.Do(func() { close(w.synced) })
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.wake:
			w.rebuild(inf.GetStore())
		}
	}
}

// waitForCRD lists once (one object) until the API server knows the
// resource, so that a cluster without Istio's CRDs gets one clear log line
// and no policies, instead of the informer's endless failing relists.
func (w *PolicyWatcher) waitForCRD(ctx context.Context) bool {
	said := ""
	for {
		_, err := w.o.Client.Resource(AuthorizationPolicies).List(ctx, metav1.ListOptions{Limit: 1})
		var msg string
		switch {
		case err == nil:
			if said != "" {
				w.log.Info().Msg("AuthorizationPolicy CRD found: watching policies")
			}
			return true
		case ctx.Err() != nil:
			return false
		case apierrors.IsNotFound(err):
			msg = "AuthorizationPolicy CRD not installed: no policies"
		case apierrors.IsForbidden(err):
			msg = "AuthorizationPolicies may not be listed (RBAC, deploy/kubernetes/rbac.yaml): no policies"
		default:
			msg = "AuthorizationPolicies cannot be listed: no policies"
		}
		if msg != said {
			w.log.Warn().Err(err).Dur("retry", w.o.Retry).Msg(msg)
			said = msg
		}
		// No policies is a decision smeshd can start with: the set stays
		// empty, as in a cluster without any.
		w.syncOnce.Do(func() { close(w.synced) })
		select {
		case <-ctx.Done():
			return false
		case <-time.After(w.o.Retry):
		}
	}
}

// rebuild compiles the store's policies into a new Set, in namespace/name
// order, and signals the change.
func (w *PolicyWatcher) rebuild(store cache.Store) {
	objs := store.List()
	ps := make([]policy.Policy, 0, len(objs))
	for _, obj := range objs {
		u, ok := obj.(*unstructured.Unstructured)
		if !ok {
			continue
		}
		ps = append(ps, policy.FromIstio(u.GetNamespace(), u.GetName(), u.Object["spec"]))
	}
	slices.SortFunc(ps, func(a, b policy.Policy) int {
		return strings.Compare(a.Key(), b.Key())
	})
	set := policy.NewSet(ps, w.o.RootNamespace)
	now := make(map[policy.Problem]bool)
	for _, p := range set.Problems() {
		now[p] = true
		if !w.reported[p] {
			w.log.Error().Str("policy", p.Policy).Str("problem", p.Reason).
				Msg("AuthorizationPolicy cannot be enforced at L4: it denies every connection to the workloads it selects")
		}
	}
	w.reported = now
	w.set.Store(set)
	w.log.Debug().Int("policies", len(ps)).Int("invalid", len(now)).Msg("policies compiled")
	select {
	case w.changed <- struct{}{}:
	default:
	}
}
