// Package policy is smesh's L4 authorization: Istio's AuthorizationPolicy
// semantics (https://istio.io/latest/docs/reference/config/security/authorization-policy/)
// restricted to what a TCP connection carries: the source workload's
// identity and address, the destination workload and port.
//
// Policies come from Kubernetes (security.istio.io AuthorizationPolicy
// objects, converted by FromIstio) or from smesh.toml ([[policy]], converted
// by pkg/config). A Set compiles them once; Decide answers for a connection
// without allocating, for the tunnel server and the BPF compiler alike
// (docs/identity.md, sections 4 and 5).
//
// A policy that uses anything this package cannot enforce at L4 (HTTP
// methods, paths, hosts, request principals, when conditions, CUSTOM or
// AUDIT actions, unknown fields) is never ignored: it is listed by
// Problems and denies every connection to the workloads it selects, so that
// a policy meant to restrict never silently allows.
package policy

import (
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Action is what a policy does to the connections its rules match.
type Action string

const (
	Allow Action = "ALLOW"
	Deny  Action = "DENY"
)

// Policy is one authorization policy, shaped as Istio's AuthorizationPolicy.
type Policy struct {
	// Name and Namespace name it in verdicts, logs and metrics. Namespace
	// is "" for smesh.toml policies.
	Name      string `json:"name"`
	Namespace string `json:"namespace,omitempty"`
	// Selector is selector.matchLabels: the policy applies to the
	// workloads of its namespace (of every namespace in the root
	// namespace) carrying all these labels; empty selects all of them.
	Selector map[string]string `json:"selector,omitempty"`
	// Workloads, for smesh.toml policies, are the destination identities
	// the policy applies to; empty applies it to every workload.
	Workloads []spiffeid.ID `json:"workloads,omitempty"`
	Action    Action        `json:"action"`
	// Rules: a connection matches the policy when it matches one of them.
	// No rules match nothing: an ALLOW policy without rules denies every
	// connection to what it selects, a DENY policy without rules does
	// nothing. One empty rule matches everything.
	Rules []Rule `json:"rules,omitempty"`
	// Invalid, when set, says why the policy cannot be enforced as
	// written; the converters set it, NewSet adds its own checks. Such a
	// policy denies everything to the workloads it selects.
	Invalid string `json:"invalid,omitempty"`
}

// Rule matches a connection when one of From matches its source (or From
// is empty) and one of To matches its port (or To is empty).
type Rule struct {
	From []Peer      `json:"from,omitempty"`
	To   []Operation `json:"to,omitempty"`
}

// Peer is Istio's rules.from.source: every field that is set must match.
// Principals and namespaces are Istio's patterns: exact, "prefix*",
// "*suffix", or "*" (any source that has one). A principal is a SPIFFE ID
// without "spiffe://" ("cluster.local/ns/default/sa/sleep"); the full
// spiffe:// form is accepted too. A source's namespace is NS of its
// identity's path /ns/NS/... A source with no identity matches no
// principal and no namespace (and so every notPrincipals and
// notNamespaces). IP blocks are CIDRs or single addresses, IPv4 or IPv6.
type Peer struct {
	Principals    []string `json:"principals,omitempty"`
	NotPrincipals []string `json:"notPrincipals,omitempty"`
	Namespaces    []string `json:"namespaces,omitempty"`
	NotNamespaces []string `json:"notNamespaces,omitempty"`
	IPBlocks      []string `json:"ipBlocks,omitempty"`
	NotIPBlocks   []string `json:"notIpBlocks,omitempty"`
}

// Operation is Istio's rules.to.operation, its L4 part: destination ports
// (1-65535).
type Operation struct {
	Ports    []uint16 `json:"ports,omitempty"`
	NotPorts []uint16 `json:"notPorts,omitempty"`
}

// Source is the source of a connection.
type Source struct {
	// ID is the source workload's identity; zero when unknown (the
	// connection speaks as its node only): it matches no principal and
	// no namespace.
	ID spiffeid.ID
	// IP is the source address; it may be invalid (unknown), which
	// matches no ipBlocks.
	IP netip.Addr
}

// Workload is the destination of a connection.
type Workload struct {
	ID spiffeid.ID
	// Namespace is the Kubernetes namespace; "" on systemd nodes.
	Namespace string
	Labels    map[string]string
}

// Reasons of a denying Verdict.
const (
	ReasonDenied     = "denied_by_policy" // a DENY policy matched
	ReasonNotAllowed = "not_allowed"      // ALLOW policies select the workload, none matched
	ReasonInvalid    = "invalid_policy"   // an invalid policy selects the workload
)

// Verdict is the decision for one connection.
type Verdict struct {
	Allow bool
	// Policy is "namespace/name" ("name" for smesh.toml policies) of the
	// policy that decided; "" when none did (no policy selects the
	// workload, or ALLOW policies select it and none matched).
	Policy string
	// Reason is "" when allowed, else one of the Reason constants.
	Reason string
}

// Problem is an invalid policy and why.
type Problem struct {
	Policy string `json:"policy"`
	Reason string `json:"reason"`
}
