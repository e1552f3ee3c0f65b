// Package identity names the workloads of the mesh: every enrolled workload
// has a SPIFFE ID, the one its node asserts for it across the tunnel and
// the one authorization policies name (docs/identity.md).
//
//   - Kubernetes pods: spiffe://TD/ns/NAMESPACE/sa/SERVICEACCOUNT, Istio's
//     form, so that Istio's policies and dashboards carry over.
//   - Workloads of systemd nodes: set per enrolled cgroup in smesh.toml, by
//     default spiffe://TD/node/NODE/unit/UNIT.
//
// A connection whose source is not a known workload has no workload
// identity: it speaks as its node only, and matches no principal.
package identity

import (
	"context"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Parse checks that s is a SPIFFE ID in its one valid encoding (what
// spiffeid.FromString accepts and String gives back unchanged).
func Parse(s string) (spiffeid.ID, error) {
	id, err := spiffeid.FromString(s)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("workload identity %q: %w", s, err)
	}
	if id.String() != s {
		return spiffeid.ID{}, fmt.Errorf("workload identity %q: not in canonical form (%q)", s, id.String())
	}
	return id, nil
}

// Kubernetes is the identity of a pod running as service account sa in
// namespace ns.
func Kubernetes(td spiffeid.TrustDomain, ns, sa string) (spiffeid.ID, error) {
	if sa == "" {
		sa = "default" // what the API server fills in
	}
	return spiffeid.FromSegments(td, "ns", ns, "sa", sa)
}

// Unit is the default identity of a workload of a systemd node: the unit
// (or, for any cgroup, its last path element) on node.
func Unit(td spiffeid.TrustDomain, node, unit string) (spiffeid.ID, error) {
	return spiffeid.FromSegments(td, "node", node, "unit", unit)
}

type sourceKey struct{}

// WithSource returns ctx carrying the identity of the workload a connection
// comes from, for the tunnel client to assert in its header.
func WithSource(ctx context.Context, id spiffeid.ID) context.Context {
	return context.WithValue(ctx, sourceKey{}, id)
}

// SourceFrom is the identity WithSource put in ctx; false when ctx carries
// none (the connection speaks as its node).
func SourceFrom(ctx context.Context) (spiffeid.ID, bool) {
	id, ok := ctx.Value(sourceKey{}).(spiffeid.ID)
	return id, ok && !id.IsZero()
}
