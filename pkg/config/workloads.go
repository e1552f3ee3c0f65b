package config

import (
	"errors"
	"fmt"
	"path/filepath"
	"slices"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/smesh-dev/smesh/pkg/identity"
)

// Workload is one [[capture.workloads]] table: a cgroup at or below an
// enrolled [capture] cgroup whose processes speak as one workload identity
// (docs/identity.md 2). A process below an enrolled cgroup but below no
// workload speaks as its enrolled cgroup's default identity.
type Workload struct {
	// Cgroup is a cgroup v2 directory, written as [capture] cgroups are
	// (relative to the cgroup v2 mount, or absolute below it).
	Cgroup string `toml:"cgroup"`
	// Identity is the workload's SPIFFE ID, in [tunnel.tls] trust_domain;
	// "" is spiffe://TRUST_DOMAIN/node/NODE/unit/LEAF (NODE: this node's
	// name, LEAF: the cgroup's last path element).
	Identity string `toml:"identity"`
	// Strict: the workload accepts TCP only through the mesh
	// (docs/identity.md 5.3): a SYN no mesh socket sent is dropped.
	Strict bool `toml:"strict"`
	// StrictExemptPorts are ports of a strict workload that accept
	// plaintext from anywhere (health probes from the node, say). Only
	// with strict = true.
	StrictExemptPorts []int `toml:"strict_exempt_ports"`
	// Ports are the TCP ports the workload serves on the addresses of the
	// network namespace its processes run in (the node's own, loopback
	// included, for a systemd unit that has none of its own). A namespace
	// shared by several workloads names none of them by address; policy
	// knows a destination there by (address, port): these
	// (docs/identity.md 5.2).
	Ports []int `toml:"ports"`
}

// ResolvedWorkload is a Workload with its cgroup as a path and its identity
// filled in (Config.Workloads).
type ResolvedWorkload struct {
	Cgroup   string
	Identity spiffeid.ID
	Strict   bool
	// ExemptPorts are the strict workload's StrictExemptPorts.
	ExemptPorts []uint16
	// Ports are the workload's Ports.
	Ports []uint16
}

// validateWorkloads checks what can be checked without the cgroup v2 mount
// and the node's name: every workload names a cgroup that is not the root,
// once, and an identity (when set) in the trust domain. Whether the cgroup
// lies below an enrolled one is checked here when both are written alike
// (both relative or both absolute), and always by Workloads.
func validateWorkloads(p *problems, c *Config) {
	td, tdErr := spiffeid.TrustDomainFromString(c.Tunnel.TLS.TrustDomain)
	seen := make(map[string]int)
	for i, w := range c.Capture.Workloads {
		key := fmt.Sprintf("capture.workloads[%d]", i)
		if w.Cgroup == "" {
			p.addf(key+".cgroup", `is not set (want the workload's cgroup, at or below a [capture] cgroups entry, e.g. "smesh.slice/payments.service")`)
		} else if err := checkCgroup(w.Cgroup); err != nil {
			p.addf(key+".cgroup", "%v", err)
		} else {
			clean := filepath.Clean(w.Cgroup)
			if j, dup := seen[clean]; dup {
				p.addf(key+".cgroup", "%q is also capture.workloads[%d]'s cgroup (want one identity per cgroup)", w.Cgroup, j)
			}
			seen[clean] = i
			if !belowComparable(clean, c.Capture.Cgroups) {
				p.addf(key+".cgroup", "%q is not at or below any [capture] cgroups entry (%q): its processes would not be captured; "+
					"add the cgroup (or one above it) to capture.cgroups, or fix the path", w.Cgroup, c.Capture.Cgroups)
			}
		}
		seenPort := make(map[int]bool)
		for j, port := range w.StrictExemptPorts {
			pk := fmt.Sprintf("%s.strict_exempt_ports[%d]", key, j)
			switch {
			case !w.Strict:
				p.addf(pk, "%d: exempt ports are only for a strict workload (set strict = true, or remove strict_exempt_ports)", port)
			case port < 1 || port > 65535:
				p.addf(pk, "%d is not a TCP port (want 1-65535)", port)
			case seenPort[port]:
				p.addf(pk, "%d is listed twice", port)
			}
			seenPort[port] = true
		}
		seenServed := make(map[int]bool)
		for j, port := range w.Ports {
			pk := fmt.Sprintf("%s.ports[%d]", key, j)
			switch {
			case port < 1 || port > 65535:
				p.addf(pk, "%d is not a TCP port (want 1-65535)", port)
			case seenServed[port]:
				p.addf(pk, "%d is listed twice", port)
			}
			seenServed[port] = true
		}
		if w.Identity == "" {
			continue
		}
		id, err := identity.Parse(w.Identity)
		if err != nil {
			p.addf(key+".identity", "%v (want e.g. %q, or leave it out for the default spiffe://%s/node/NODE/unit/LEAF)",
				err, "spiffe://"+DefaultTrustDomain+"/ns/prod/sa/payments", c.Tunnel.TLS.TrustDomain)
			continue
		}
		if tdErr == nil && id.TrustDomain() != td {
			p.addf(key+".identity", "%q is not in tunnel.tls.trust_domain %q, so no peer would accept it (want spiffe://%s/...)",
				w.Identity, td.Name(), td.Name())
		}
	}
}

// belowComparable reports whether cg (clean) is at or below an entry of
// cgroups written the same way (both relative, or both absolute); true when
// no entry is written that way, for Workloads to decide with the mount.
func belowComparable(cg string, cgroups []string) bool {
	comparable := false
	for _, e := range cgroups {
		e = filepath.Clean(e)
		if filepath.IsAbs(e) != filepath.IsAbs(cg) {
			continue
		}
		comparable = true
		if e == cg || isBelowDir(cg, e) {
			return true
		}
	}
	return !comparable
}

// Workloads returns the [[capture.workloads]] with their cgroups as paths
// below cgroup2Mount and their identities filled in, node being this node's
// name (for the default identity). A workload whose cgroup is not at or
// below an enrolled [capture] cgroup is an error.
func (c Config) Workloads(cgroup2Mount, node string) ([]ResolvedWorkload, error) {
	enrolled, err := c.CgroupPaths(cgroup2Mount)
	if err != nil {
		return nil, err
	}
	mount := filepath.Clean(cgroup2Mount)
	var out []ResolvedWorkload
	var errs []error
	for i, w := range c.Capture.Workloads {
		key := fmt.Sprintf("capture.workloads[%d].cgroup", i)
		path := w.Cgroup
		if !filepath.IsAbs(path) {
			path = filepath.Join(mount, path)
		}
		path = filepath.Clean(path)
		if path == mount || !isBelowDir(path, mount) {
			errs = append(errs, fmt.Errorf("%s: %q is not below the cgroup v2 mount %s", key, w.Cgroup, mount))
			continue
		}
		below := false
		for _, e := range enrolled {
			if e == path || isBelowDir(path, e) {
				below = true
			}
		}
		if !below {
			errs = append(errs, fmt.Errorf("%s: %s is not at or below any [capture] cgroups entry (%q): its processes would not be captured; "+
				"add it (or a cgroup above it) to capture.cgroups", key, path, c.Capture.Cgroups))
			continue
		}
		rw := ResolvedWorkload{Cgroup: path, Strict: w.Strict}
		for _, port := range w.StrictExemptPorts {
			if port > 0 && port <= 65535 {
				rw.ExemptPorts = append(rw.ExemptPorts, uint16(port))
			}
		}
		for _, port := range w.Ports {
			if port > 0 && port <= 65535 && !slices.Contains(rw.Ports, uint16(port)) {
				rw.Ports = append(rw.Ports, uint16(port))
			}
		}
		if w.Identity != "" {
			if rw.Identity, err = identity.Parse(w.Identity); err != nil {
				errs = append(errs, fmt.Errorf("capture.workloads[%d].identity: %w", i, err))
				continue
			}
		} else if rw.Identity, err = c.DefaultIdentity(path, node); err != nil {
			errs = append(errs, fmt.Errorf("capture.workloads[%d]: %w", i, err))
			continue
		}
		out = append(out, rw)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return out, nil
}

// DefaultIdentity is the identity of the processes of cgroup path that no
// workload names: spiffe://TRUST_DOMAIN/node/NODE/unit/LEAF, LEAF being the
// cgroup's last path element.
func (c Config) DefaultIdentity(path, node string) (spiffeid.ID, error) {
	td, err := spiffeid.TrustDomainFromString(c.Tunnel.TLS.TrustDomain)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("tunnel.tls.trust_domain: %w", err)
	}
	if node == "" {
		return spiffeid.ID{}, errors.New("the default identity of a workload needs this node's name, and smeshd has none")
	}
	id, err := identity.Unit(td, node, filepath.Base(path))
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("the default identity of cgroup %s (node %q): %w (set identity explicitly)", path, node, err)
	}
	return id, nil
}
