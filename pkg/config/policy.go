package config

import (
	"fmt"
	"net/netip"
	"regexp"
	"slices"

	"github.com/smesh-dev/smesh/pkg/identity"
	"github.com/smesh-dev/smesh/pkg/policy"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Policy is one [[policy]] entry: an L4 authorization policy for the
// workloads of a node without Kubernetes, with the fields and semantics of
// Istio's AuthorizationPolicy (pkg/policy), named in snake_case.
type Policy struct {
	// Name names it in logs, metrics and /debug/policy; unique.
	Name string `toml:"name"`
	// Action is "ALLOW" (the default, as in Istio) or "DENY".
	Action string `toml:"action"`
	// Workloads are the destination identities (spiffe:// IDs) it
	// applies to; empty applies it to every workload of the node.
	Workloads []string `toml:"workloads"`
	// Rules: a connection matches the policy when it matches one. No
	// rules match nothing (an ALLOW policy without rules denies all);
	// rules = [{}] matches everything.
	Rules []PolicyRule `toml:"rules"`
}

// PolicyRule is one of a [[policy]]'s rules: one of From must match the
// source (when set) and one of To the destination port (when set).
type PolicyRule struct {
	From []PolicyFrom `toml:"from"`
	To   []PolicyTo   `toml:"to"`
}

// PolicyFrom is Istio's rules.from.source: every key that is set must
// match. Principals and namespaces are exact, "prefix*", "*suffix" or "*";
// ip_blocks are CIDRs or single addresses.
type PolicyFrom struct {
	Principals    []string `toml:"principals"`
	NotPrincipals []string `toml:"not_principals"`
	Namespaces    []string `toml:"namespaces"`
	NotNamespaces []string `toml:"not_namespaces"`
	IPBlocks      []string `toml:"ip_blocks"`
	NotIPBlocks   []string `toml:"not_ip_blocks"`
}

// PolicyTo is Istio's rules.to.operation, its ports.
type PolicyTo struct {
	Ports    []uint16 `toml:"ports"`
	NotPorts []uint16 `toml:"not_ports"`
}

func validatePolicies(p *problems, ps []Policy) {
	names := make(map[string]int)
	for i, pol := range ps {
		key := fmt.Sprintf("policy[%d]", i)
		if pol.Name == "" {
			p.addf(key+".name", "is empty (want a name for logs, metrics and /debug/policy)")
		} else if j, dup := names[pol.Name]; dup {
			p.addf(key+".name", "%q is also the name of policy[%d]", pol.Name, j)
		} else {
			names[pol.Name] = i
		}
		if pol.Action != "" {
			checkOneOf(p, key+".action", pol.Action, "ALLOW", "DENY")
		}
		for _, w := range pol.Workloads {
			if _, err := identity.Parse(w); err != nil {
				p.addf(key+".workloads", "%v (want e.g. \"spiffe://smesh.local/node/a/unit/web.service\")", err)
			}
		}
		for j, r := range pol.Rules {
			rkey := fmt.Sprintf("%s.rules[%d]", key, j)
			for k, f := range r.From {
				fkey := fmt.Sprintf("%s.from[%d]", rkey, k)
				if len(f.Principals)+len(f.NotPrincipals)+len(f.Namespaces)+len(f.NotNamespaces)+len(f.IPBlocks)+len(f.NotIPBlocks) == 0 {
					p.addf(fkey, "is empty (want at least one of principals, not_principals, namespaces, not_namespaces, ip_blocks, not_ip_blocks; leave out from to match every source)")
				}
				checkPatterns(p, fkey+".principals", f.Principals)
				checkPatterns(p, fkey+".not_principals", f.NotPrincipals)
				checkPatterns(p, fkey+".namespaces", f.Namespaces)
				checkPatterns(p, fkey+".not_namespaces", f.NotNamespaces)
				checkBlocks(p, fkey+".ip_blocks", f.IPBlocks)
				checkBlocks(p, fkey+".not_ip_blocks", f.NotIPBlocks)
			}
			for k, t := range r.To {
				tkey := fmt.Sprintf("%s.to[%d]", rkey, k)
				if len(t.Ports)+len(t.NotPorts) == 0 {
					p.addf(tkey, "is empty (want ports or not_ports; leave out to to match every port)")
				}
				checkPolicyPorts(p, tkey+".ports", t.Ports)
				checkPolicyPorts(p, tkey+".not_ports", t.NotPorts)
			}
		}
	}
}

func checkPatterns(p *problems, key string, vs []string) {
	if slices.Contains(vs, "") {
		p.addf(key, `"" matches nothing (want a value, "prefix*", "*suffix" or "*")`)
	}
}

func checkBlocks(p *problems, key string, vs []string) {
	for _, v := range vs {
		if pr, err := netip.ParsePrefix(v); err == nil && pr.Addr().Zone() == "" {
			continue
		}
		if a, err := netip.ParseAddr(v); err == nil && a.Zone() == "" {
			continue
		}
		p.addf(key, "%q is not a CIDR or an IP address (want e.g. \"10.0.0.0/8\", \"fd00::/8\" or \"198.18.0.7\")", v)
	}
}

func checkPolicyPorts(p *problems, key string, ports []uint16) {
	if slices.Contains(ports, 0) {
		p.addf(key, "port 0 is not a port (want 1 to 65535)")
	}
}

// namespaceName is a DNS-1123 label, what Kubernetes allows as a namespace.
var namespaceName = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)

func checkRootNamespace(p *problems, key, ns string) {
	if len(ns) > 63 || !namespaceName.MatchString(ns) {
		p.addf(key, "%q is not a namespace name (at most 63 lowercase letters, digits or '-', starting and ending with a letter or digit; Istio's default is \"istio-system\")", ns)
	}
}

// ToPolicy converts a validated [[policy]] entry into pkg/policy's model.
// Should it not be valid, the result is marked invalid (denying to what it
// selects), never dropped.
func (c Policy) ToPolicy() policy.Policy {
	out := policy.Policy{Name: c.Name, Action: policy.Action(c.Action)}
	if c.Action == "" {
		out.Action = policy.Allow
	}
	for _, w := range c.Workloads {
		id, err := spiffeid.FromString(w)
		if err != nil {
			out.Invalid = fmt.Sprintf("workload %q: %v", w, err)
		}
		out.Workloads = append(out.Workloads, id) // a zero ID keeps it invalid
	}
	if c.Rules != nil {
		out.Rules = make([]policy.Rule, 0, len(c.Rules))
	}
	for _, r := range c.Rules {
		var pr policy.Rule
		for _, f := range r.From {
			pr.From = append(pr.From, policy.Peer{
				Principals: f.Principals, NotPrincipals: f.NotPrincipals,
				Namespaces: f.Namespaces, NotNamespaces: f.NotNamespaces,
				IPBlocks: f.IPBlocks, NotIPBlocks: f.NotIPBlocks,
			})
		}
		for _, t := range r.To {
			pr.To = append(pr.To, policy.Operation{Ports: t.Ports, NotPorts: t.NotPorts})
		}
		out.Rules = append(out.Rules, pr)
	}
	return out
}

// ToPolicies converts every [[policy]] entry.
func ToPolicies(ps []Policy) []policy.Policy {
	out := make([]policy.Policy, 0, len(ps))
	for _, p := range ps {
		out = append(out, p.ToPolicy())
	}
	return out
}
