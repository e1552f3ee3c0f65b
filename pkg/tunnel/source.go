package tunnel

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/smesh-dev/smesh/pkg/identity"
)

// Source is where a tunnelled connection comes from, as the server knows
// it once the header was checked: the peer node (its certificate's SPIFFE
// ID; zero without TLS), the workload on it (zero when the header asserts
// none, as every v1 and v2 peer, or when it cannot be verified) and the
// source address (the asserted one when verified, else the peer node's).
type Source struct {
	Node, Workload spiffeid.ID
	Addr           netip.Addr
}

// SourceVerifier says whether a node may speak for a workload: node is the
// peer's certificate identity, workload the identity its v3 header asserts
// (zero: none, only an address) and addr the source address it asserts
// (invalid: none). nil accepts; ErrUnverifiable (or an error wrapping it)
// takes the connection as coming from the node itself (no workload, the
// node's address) without refusing it; any other error refuses it
// (identity_not_on_node).
type SourceVerifier interface {
	Verify(node spiffeid.ID, workload spiffeid.ID, addr netip.Addr) error
}

// ErrUnverifiable is a SourceVerifier's answer for a source it has no way
// to check (no [[tunnel.tls.peers]] entry names workloads, say): the
// connection is the node's. (identity.ErrUnverifiable, for verifiers of
// other packages.)
var ErrUnverifiable = identity.ErrUnverifiable

// source checks the source the header h asserts, on a link from node at
// peer. No verifier (ServerOptions.Verifier nil) verifies nothing: every
// connection is its node's.
func (s *Server) source(node spiffeid.ID, peer netip.Addr, h *Header) (Source, *refusal) {
	src := Source{Node: node, Addr: peer}
	if h.Workload.IsZero() && !h.SrcAddr.IsValid() {
		return src, nil
	}
	v := s.o.Verifier
	if v == nil {
		return src, nil
	}
	err := v.Verify(node, h.Workload, h.SrcAddr)
	switch {
	case err == nil:
		src.Workload = h.Workload
		if h.SrcAddr.IsValid() {
			src.Addr = h.SrcAddr
		}
	case errors.Is(err, ErrUnverifiable):
	default:
		return src, &refusal{ReasonIdentityNotOnNode, fmt.Errorf("peer %s may not speak for %s at %s: %w", node, h.Workload, h.SrcAddr, err)}
	}
	return src, nil
}

// authorize asks ServerOptions.Authorize (nil: allow all) whether src may
// connect to dst.
func (s *Server) authorize(src Source, dst netip.AddrPort) *refusal {
	if s.o.Authorize == nil {
		return nil
	}
	policy, ok := s.o.Authorize(src, dst)
	if ok {
		return nil
	}
	return &refusal{ReasonPolicyDenied, fmt.Errorf("policy %q denies %s (workload %s, %s) to %s", policy, src.Node, src.Workload, src.Addr, dst)}
}
