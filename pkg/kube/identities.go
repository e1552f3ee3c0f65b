package kube

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"

	"github.com/smesh-dev/smesh/pkg/identity"
)

// PodIdentityOptions configure PodIdentities.
type PodIdentityOptions struct {
	// API reaches the API server (NewAPI).
	API API
	// NoWatchList: API cannot stream a list as a watch.
	NoWatchList bool
	// TrustDomain is the mesh's ([tunnel.tls] trust_domain): node
	// certificates are spiffe://TD/node/NAME, pods spiffe://TD/ns/NS/sa/SA.
	TrustDomain spiffeid.TrustDomain
	Logger      zerolog.Logger
}

// PodIdentities follows every pod of the cluster (no field selector: the
// tunnel server must know the pods of all nodes), keeping of each only its
// namespace, service account, node, addresses and whether it runs, and
// answers the tunnel's SourceVerifier question: may the node of a peer
// certificate assert a workload (a service account) at an address? Yes
// when a running pod of that service account, with that address if one is
// asserted, is on that node.
//
// The answer is the informer's view: a connection from a pod that just
// started on its node can be refused until the pod's Running status has
// reached this node's watch (the client's retry then succeeds).
type PodIdentities struct {
	o      PodIdentityOptions
	log    zerolog.Logger
	pods   cache.SharedIndexInformer
	synced chan struct{}
	done   chan struct{}
}

// Index names: "node/namespace/serviceaccount" and "node/address" of
// running pods.
const (
	byIdentity = "identity"
	byNodeAddr = "nodeaddr"
)

// NewPodIdentities prepares the informer; Run starts it.
func NewPodIdentities(o PodIdentityOptions) *PodIdentities {
	p := &PodIdentities{
		o:      o,
		log:    o.Logger.With().Str("component", "kubernetes-identities").Logger(),
		synced: make(chan struct{}),
		done:   make(chan struct{}),
	}
	lw := cache.ToListWatcherWithWatchListSemantics(&cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			return o.API.List(ctx, "pods", opts)
		},
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			return o.API.Watch(ctx, "pods", opts)
		},
	}, watchListSupport(!o.NoWatchList))
	p.pods = cache.NewSharedIndexInformer(lw, &corev1.Pod{}, 0, podIdentityIndexers())
	p.pods.SetTransform(toPodIdentity)
	return p
}

// podIdentityIndexers index running pods by "node/namespace/serviceaccount"
// and by "node/address".
func podIdentityIndexers() cache.Indexers {
	return cache.Indexers{
		byIdentity: func(obj any) ([]string, error) {
			k, ok := obj.(*podIdentity)
			if !ok || !k.running || k.node == "" {
				return nil, nil
			}
			return []string{k.node + "/" + k.Namespace + "/" + k.sa}, nil
		},
		byNodeAddr: func(obj any) ([]string, error) {
			k, ok := obj.(*podIdentity)
			if !ok || !k.running || k.node == "" {
				return nil, nil
			}
			keys := make([]string, 0, len(k.ips))
			for _, a := range k.ips {
				keys = append(keys, k.node+"/"+a.String())
			}
			return keys, nil
		},
	}
}

// podIdentity is what PodIdentities keeps of a pod (toPodIdentity).
type podIdentity struct {
	metav1.ObjectMeta // namespace, name and resourceVersion only
	sa                string
	node              string
	ips               []netip.Addr
	running           bool
}

func (k *podIdentity) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }

// DeepCopyObject copies; stored objects are never changed.
func (k *podIdentity) DeepCopyObject() runtime.Object { c := *k; return &c }

// toPodIdentity is the informer's transform: it drops all but what Verify
// reads. It passes on what is not a *corev1.Pod (idempotent).
func toPodIdentity(obj any) (any, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	k := &podIdentity{
		ObjectMeta: storedMeta(pod.ObjectMeta),
		sa:         pod.Spec.ServiceAccountName,
		node:       pod.Spec.NodeName,
		running:    pod.Status.Phase == corev1.PodRunning,
	}
	if k.sa == "" {
		k.sa = "default"
	}
	for _, ip := range pod.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			k.ips = append(k.ips, a.Unmap())
		}
	}
	return k, nil
}

// StartPodIdentities follows the cluster's pods through api until ctx is
// done, for verifying the sources peers assert in trust domain td. The
// caller waits for WaitSynced before it hands it to the tunnel server
// (until then it refuses every asserted source).
func StartPodIdentities(ctx context.Context, api API, td spiffeid.TrustDomain, log zerolog.Logger) (*PodIdentities, error) {
	if api == nil || td.IsZero() {
		return nil, errors.New("kubernetes pod identities: no API or no trust domain")
	}
	p := NewPodIdentities(PodIdentityOptions{API: api, TrustDomain: td, Logger: log})
	go p.Run(ctx)
	return p, nil
}

// Run follows the pods until ctx is done.
func (p *PodIdentities) Run(ctx context.Context) {
	defer close(p.done)
	go p.pods.RunWithContext(ctx)
	if !cache.WaitForCacheSync(ctx.Done(), p.pods.HasSynced) {
		return
	}
	p.log.Info().Int("pods", len(p.pods.GetStore().ListKeys())).Msg("pods of the cluster synced")
	close(p.synced)
	<-ctx.Done()
}

// WaitSynced waits until the first list is in, or ctx is done.
func (p *PodIdentities) WaitSynced(ctx context.Context) error {
	select {
	case <-p.synced:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for the cluster's pods: %w", ctx.Err())
	}
}

// errNotSynced: Verify refuses until the first list is in.
var errNotSynced = errors.New("the cluster's pods are not listed yet")

// Verify is tunnel.SourceVerifier: node (spiffe://TD/node/NAME) may assert
// workload (spiffe://TD/ns/NS/sa/SA; zero: none) at addr (invalid: none)
// if a running pod of that service account, with that address, runs on
// node NAME. An address asserted alone that is no running pod's on NAME is
// identity.ErrUnverifiable (dropped, not refused). It refuses before the
// first list is in.
func (p *PodIdentities) Verify(node, workload spiffeid.ID, addr netip.Addr) error {
	select {
	case <-p.synced:
	default:
		return errNotSynced
	}
	name, err := p.nodeName(node)
	if err != nil {
		return err
	}
	if workload.IsZero() {
		if !addr.IsValid() {
			return nil
		}
		objs, _ := p.pods.GetIndexer().ByIndex(byNodeAddr, name+"/"+addr.String())
		if len(objs) == 0 {
			// Not a pod's (a process of the node itself, say): it
			// claims no identity, so it is dropped, not refused.
			return fmt.Errorf("no running pod with address %s on node %s: %w", addr, name, identity.ErrUnverifiable)
		}
		return nil
	}
	ns, sa, err := p.serviceAccount(workload)
	if err != nil {
		return err
	}
	objs, _ := p.pods.GetIndexer().ByIndex(byIdentity, name+"/"+ns+"/"+sa)
	for _, obj := range objs {
		k := obj.(*podIdentity)
		if !addr.IsValid() {
			return nil
		}
		for _, a := range k.ips {
			if a == addr {
				return nil
			}
		}
	}
	if addr.IsValid() {
		return fmt.Errorf("no running pod of service account %s/%s with address %s on node %s", ns, sa, addr, name)
	}
	return fmt.Errorf("no running pod of service account %s/%s on node %s", ns, sa, name)
}

// nodeName is NAME of spiffe://TD/node/NAME.
func (p *PodIdentities) nodeName(node spiffeid.ID) (string, error) {
	if node.TrustDomain() == p.o.TrustDomain {
		if segs := strings.Split(node.Path(), "/"); len(segs) == 3 && segs[1] == "node" {
			return segs[2], nil
		}
	}
	return "", fmt.Errorf("peer identity %s is not a node's (spiffe://%s/node/NAME)", node, p.o.TrustDomain.Name())
}

// serviceAccount is NS and SA of spiffe://TD/ns/NS/sa/SA.
func (p *PodIdentities) serviceAccount(w spiffeid.ID) (ns, sa string, err error) {
	if w.TrustDomain() == p.o.TrustDomain {
		if segs := strings.Split(w.Path(), "/"); len(segs) == 5 && segs[1] == "ns" && segs[3] == "sa" {
			return segs[2], segs[4], nil
		}
	}
	return "", "", fmt.Errorf("workload %s is not a service account's (spiffe://%s/ns/NAMESPACE/sa/NAME)", w, p.o.TrustDomain.Name())
}
