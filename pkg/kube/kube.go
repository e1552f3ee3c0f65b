// Package kube enrols the pods of this node in the mesh by label, for
// smeshd running in a Kubernetes cluster as a DaemonSet (deploy/kubernetes).
//
// It watches the pods scheduled to its node (an informer whose list and
// watch carry the field selector spec.nodeName=NODE, so the API server sends
// no other node's pods) and the namespaces, puts in the mesh the pods that
// carry [kubernetes] label or whose namespace does (a pod's own label with
// the same key and another value keeps it out), finds each one's cgroup from
// its UID below the node's cgroup v2 tree (Resolver, for both kubelet cgroup
// drivers), and reports the set of those cgroups. The daemon hands the set to
// the namespace machinery and the data path, as it does [capture] cgroups:
// it sees only PodSource, never a client-go type.
//
// It also watches the cluster's Services and EndpointSlices and hands the
// data path one services.Service per ClusterIP and TCP port
// (ServiceWatcher, StartServices).
//
// And it follows Istio's AuthorizationPolicy objects of every namespace
// into a policy.Set (PolicyWatcher, StartPolicies), through the dynamic
// client: unstructured objects, no Istio Go module (about 0.3 MB more once
// linked).
//
// Only what these need of client-go is linked: a REST client per API group
// with a scheme of that group alone (API: core, discovery.k8s.io), not
// client-go's typed clients, whose scheme registers every API group (about
// 27 MB more).
package kube

import (
	"context"
	"fmt"
	"net/netip"
	"os"

	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/client-go/rest"

	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/policy"
	"github.com/smesh-dev/smesh/pkg/services"
)

// Node is what smeshd follows of its cluster: this node's pods (the
// embedded Watcher) and the Services, which Services keeps in a sink.
type Node struct {
	*Watcher
	Services *ServiceWatcher
	// Peers verify the sources other nodes assert (cluster-wide
	// pods); Authz are the cluster's AuthorizationPolicies.
	Peers *PodIdentities
	Authz *PolicyWatcher
}

// Verify is the tunnel's SourceVerifier: the cluster's pods say which
// node runs which workload.
func (n *Node) Verify(node, workload spiffeid.ID, addr netip.Addr) error {
	return n.Peers.Verify(node, workload, addr)
}

// Policies is the cluster's AuthorizationPolicies in force.
func (n *Node) Policies() *policy.Set { return n.Authz.Set() }

// PoliciesChanged receives after Policies changed.
func (n *Node) PoliciesChanged() <-chan struct{} { return n.Authz.Changed() }

// WaitSynced returns once the first set of pods is known and every Service
// is in the sink, so that a pod in the mesh is translated from its first
// connection on.
func (n *Node) WaitSynced(ctx context.Context) error {
	if err := n.Watcher.WaitSynced(ctx); err != nil {
		return err
	}
	// The cluster's pods and policies too: until then every asserted
	// source would be refused, and a pod in the mesh would be open to
	// everything its policies deny.
	if err := n.Peers.WaitSynced(ctx); err != nil {
		return err
	}
	if err := n.Authz.WaitSynced(ctx); err != nil {
		return err
	}
	return n.Services.WaitSynced(ctx)
}

// Start connects to the API server with the pod's service account and
// starts watching this node's pods, and the Services into sink, until ctx is
// done. The node's name is in the environment variable cfg.NodeNameEnv;
// cgroupMount is where the node's cgroup v2 tree is mounted; td is the
// mesh's trust domain, which the pods' identities are in. The caller
// waits for WaitSynced before it relies on Cgroups.
func Start(ctx context.Context, cfg config.Kubernetes, td spiffeid.TrustDomain, cgroupMount string, sink services.Sink, log zerolog.Logger) (*Node, error) {
	node := os.Getenv(cfg.NodeNameEnv)
	if node == "" {
		return nil, fmt.Errorf("kubernetes.node_name_env: $%s is empty: set it to this node's name "+
			"(the DaemonSet does, from spec.nodeName through the downward API)", cfg.NodeNameEnv)
	}
	rc, err := InClusterConfig()
	if err != nil {
		return nil, err
	}
	api, err := NewAPI(rc)
	if err != nil {
		return nil, err
	}
	key, value := cfg.LabelKeyValue()
	skey, svalue := cfg.StrictLabelKeyValue()
	w := NewWatcher(Options{
		StrictKey:   skey,
		StrictValue: svalue,
		API:         api,
		NodeName:    node,
		TrustDomain: td,
		LabelKey:    key,
		LabelValue:  value,
		Resolver:    NewResolver(cgroupMount, cfg.KubepodsCgroup),
		Logger:      log,
	})
	svcs, err := StartServices(ctx, cfg, api, node, sink, log)
	if err != nil {
		return nil, err
	}
	ids, err := StartPodIdentities(ctx, api, td, log)
	if err != nil {
		return nil, err
	}
	authz, err := StartPolicies(ctx, rc, cfg.PolicyRootNamespace, log)
	if err != nil {
		return nil, err
	}
	go w.Run(ctx)
	return &Node{Watcher: w, Services: svcs, Peers: ids, Authz: authz}, nil
}

// InClusterAPI is the API server of the cluster smeshd runs in, reached
// with the pod's service account.
func InClusterAPI() (API, error) {
	rc, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("kubernetes.enabled: reaching the API server from inside the cluster: %w", err)
	}
	rc.UserAgent = "smeshd"
	return NewAPI(rc)
}
