package tunnel

import (
	"cmp"
	"crypto/x509"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/identity"
)

// IdentityPolicy says which certificates of the CA are peers, from
// [tunnel.tls]: every peer certificate must carry a SPIFFE ID in TrustDomain
// (a CA shared with other uses, a company CA, signs many certificates that
// are no node of this mesh); Allow, when set, narrows that to a list; Pins
// tie destinations to the identities that may serve them.
type IdentityPolicy struct {
	TrustDomain spiffeid.TrustDomain
	// Allow: the identities a peer may have; empty, any in TrustDomain.
	Allow []spiffeid.ID
	// Pins, most specific prefix first: a tunnel to a destination in a
	// pin's prefix is opened only to a server with one of its IDs.
	Pins []Pin
	// Grants are the [[tunnel.tls.peers]] entries with workloads: which
	// workloads which nodes may assert (Verify).
	Grants []Grant
}

// Grant is one [[tunnel.tls.peers]] entry with workloads: its nodes may
// assert the workloads Exact lists or any below a Prefix (each ends in
// "/"), at the addresses of Prefixes (its cidrs).
type Grant struct {
	Nodes    []spiffeid.ID
	Exact    []spiffeid.ID
	Prefix   []string
	Prefixes []netip.Prefix
}

// Pin is one [[tunnel.tls.peers]] CIDR with the identities that may serve
// it.
type Pin struct {
	Prefix netip.Prefix
	IDs    []spiffeid.ID
}

// NewIdentityPolicy makes the policy [tunnel.tls] describes. config.Validate
// checked it already; the errors here are for callers that did not.
func NewIdentityPolicy(c config.TLS) (*IdentityPolicy, error) {
	td, err := spiffeid.TrustDomainFromString(c.TrustDomain)
	if err != nil || td.Name() != c.TrustDomain {
		return nil, fmt.Errorf("tunnel.tls.trust_domain %q is not a SPIFFE trust domain name", c.TrustDomain)
	}
	p := &IdentityPolicy{TrustDomain: td}
	ids := func(key string, list []string) ([]spiffeid.ID, error) {
		out := make([]spiffeid.ID, 0, len(list))
		for _, s := range list {
			id, err := spiffeid.FromString(s)
			if err != nil {
				return nil, fmt.Errorf("%s: %q: %w", key, s, err)
			}
			if id.TrustDomain() != td {
				return nil, fmt.Errorf("%s: %q is not in tunnel.tls.trust_domain %q", key, s, td.Name())
			}
			out = append(out, id)
		}
		return out, nil
	}
	if p.Allow, err = ids("tunnel.tls.allow_identities", c.AllowIdentities); err != nil {
		return nil, err
	}
	for i, peer := range c.Peers {
		pinned, err := ids(fmt.Sprintf("tunnel.tls.peers[%d].identities", i), peer.Identities)
		if err != nil {
			return nil, err
		}
		for _, prefix := range peer.CIDRs {
			p.Pins = append(p.Pins, Pin{Prefix: prefix.Masked(), IDs: pinned})
		}
		if len(peer.Workloads) == 0 {
			continue
		}
		g := Grant{Nodes: pinned}
		for _, prefix := range peer.CIDRs {
			g.Prefixes = append(g.Prefixes, prefix.Masked())
		}
		for _, w := range peer.Workloads {
			if strings.HasSuffix(w, "/") {
				if !strings.HasPrefix(w, "spiffe://"+td.Name()+"/") {
					return nil, fmt.Errorf("tunnel.tls.peers[%d].workloads: %q is not in tunnel.tls.trust_domain %q", i, w, td.Name())
				}
				g.Prefix = append(g.Prefix, w)
				continue
			}
			id, err := identity.Parse(w)
			if err != nil {
				return nil, fmt.Errorf("tunnel.tls.peers[%d].workloads: %w", i, err)
			}
			if id.TrustDomain() != td {
				return nil, fmt.Errorf("tunnel.tls.peers[%d].workloads: %q is not in tunnel.tls.trust_domain %q", i, w, td.Name())
			}
			g.Exact = append(g.Exact, id)
		}
		p.Grants = append(p.Grants, g)
	}
	slices.SortStableFunc(p.Pins, func(a, b Pin) int { return cmp.Compare(b.Prefix.Bits(), a.Prefix.Bits()) })
	return p, nil
}

// identityError is a peer certificate whose identity is not allowed.
type identityError struct {
	reason Reason
	err    error
}

func (e *identityError) Error() string { return e.err.Error() }

// check applies the trust domain and allow_identities to a verified peer
// certificate.
func (p *IdentityPolicy) check(leaf *x509.Certificate) (spiffeid.ID, error) {
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return spiffeid.ID{}, &identityError{ReasonBadIdentity, fmt.Errorf("peer certificate has no usable SPIFFE ID (every peer needs one in tunnel.tls.trust_domain %q): %w", p.TrustDomain.Name(), err)}
	}
	if id.TrustDomain() != p.TrustDomain {
		return id, &identityError{ReasonWrongTrustDomain, fmt.Errorf("peer identity %s is not in tunnel.tls.trust_domain %q", id, p.TrustDomain.Name())}
	}
	if len(p.Allow) > 0 && !slices.Contains(p.Allow, id) {
		return id, &identityError{ReasonIdentityNotAllowed, fmt.Errorf("peer identity %s is not in tunnel.tls.allow_identities", id)}
	}
	return id, nil
}

// pinned returns the identities that may serve dst, and whether a pin
// covers it at all.
func (p *IdentityPolicy) pinned(dst netip.Addr) (Pin, bool) {
	dst = dst.Unmap()
	for _, pin := range p.Pins {
		if pin.Prefix.Contains(dst) {
			return pin, true
		}
	}
	return Pin{}, false
}

// checkServer applies the policy to the certificate of a server the client
// reached for dst: check, then the pin that covers dst, if any.
func (p *IdentityPolicy) checkServer(leaf *x509.Certificate, dst netip.Addr) error {
	id, err := p.check(leaf)
	if err != nil {
		return err
	}
	if pin, ok := p.pinned(dst); ok && !slices.Contains(pin.IDs, id) {
		return &identityError{ReasonPeerIdentity, fmt.Errorf("the server at %s is %s, which tunnel.tls.peers does not list for %s", dst, id, pin.Prefix)}
	}
	return nil
}

// checkOwn makes sure this node's own certificate passes the policy's
// trust domain: peers with the same policy would refuse it otherwise, and
// that is better said at start or reload than at every handshake.
func (p *IdentityPolicy) checkOwn(certFile string, leaf *x509.Certificate) error {
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return fmt.Errorf("tunnel.tls.cert %s has no usable SPIFFE ID (a spiffe:// URI SAN in tunnel.tls.trust_domain %q), so peers would refuse it: %w",
			certFile, p.TrustDomain.Name(), err)
	}
	if id.TrustDomain() != p.TrustDomain {
		return fmt.Errorf("tunnel.tls.cert %s is %s, not in tunnel.tls.trust_domain %q, so peers would refuse it (set trust_domain = %q if that is the mesh's)",
			certFile, id, p.TrustDomain.Name(), id.TrustDomain().Name())
	}
	return nil
}

// errNoGrant is why a node may not assert a source.
var errNoGrant = errors.New("no [[tunnel.tls.peers]] entry with workloads grants it to this node")

// Verify is the SourceVerifier of nodes whose workloads smesh.toml lists
// ([[tunnel.tls.peers]] workloads, for systemd nodes): node may assert
// workload if an entry listing node in its identities lists workload in its
// workloads (exactly, or below a prefix ending in "/"), and an address with
// it if the address is inside the cidrs of an entry listing node. An
// address asserted without a workload outside those cidrs is dropped
// (ErrUnverifiable: the connection is the node's, at the node's address),
// not refused: it claims no identity. While no entry has workloads (every
// configuration before them), it verifies nothing: ErrUnverifiable, so
// that every connection is its node's, as before.
func (p *IdentityPolicy) Verify(node, workload spiffeid.ID, addr netip.Addr) error {
	if len(p.Grants) == 0 {
		return ErrUnverifiable
	}
	if !workload.IsZero() && !p.mayAssert(node, workload) {
		return fmt.Errorf("workload %s: %w", workload, errNoGrant)
	}
	if addr.IsValid() && !p.addrOf(node, addr) {
		if workload.IsZero() {
			return ErrUnverifiable
		}
		return fmt.Errorf("address %s is in no [[tunnel.tls.peers]] cidrs of this node", addr)
	}
	return nil
}

// addrOf reports whether addr is inside the cidrs of an entry listing node.
func (p *IdentityPolicy) addrOf(node spiffeid.ID, addr netip.Addr) bool {
	for _, pin := range p.Pins {
		if slices.Contains(pin.IDs, node) && pin.Prefix.Contains(addr) {
			return true
		}
	}
	return false
}

func (p *IdentityPolicy) mayAssert(node, workload spiffeid.ID) bool {
	var s string
	for _, g := range p.Grants {
		if !slices.Contains(g.Nodes, node) {
			continue
		}
		if slices.Contains(g.Exact, workload) {
			return true
		}
		if len(g.Prefix) > 0 && s == "" {
			s = workload.String()
		}
		for _, pre := range g.Prefix {
			if len(s) > len(pre) && strings.HasPrefix(s, pre) {
				return true
			}
		}
	}
	return false
}

// SourceVerifier is the identity policy in force as a SourceVerifier
// (IdentityPolicy.Verify): it follows reloads (SetPolicy).
func (c *Credentials) SourceVerifier() SourceVerifier { return credsVerifier{c} }

type credsVerifier struct{ c *Credentials }

func (v credsVerifier) Verify(node, workload spiffeid.ID, addr netip.Addr) error {
	return v.c.policy.Load().Verify(node, workload, addr)
}
