package config

import (
	"fmt"
	"net/netip"
	"time"
)

// Service is one [[services]] entry: a static Service whose connections
// connect4/connect6 balance over its backends in the kernel, for nodes
// without Kubernetes (a systemd node). A backend is on this node (spliced
// when chosen) when its address is loopback or an address of a network
// namespace smeshd knows here (its own, the enrolled ones).
type Service struct {
	// Name names it in logs and /debug/services.
	Name string `toml:"name"`
	// VIP and Port are what clients connect to.
	VIP  netip.Addr `toml:"vip"`
	Port uint16     `toml:"port"`
	// Backends are "IP:PORT" (IPv6 as "[IP]:PORT"), of the VIP's family.
	Backends []netip.AddrPort `toml:"backends"`
	// SessionAffinityTimeout, when set, keeps a client (a network
	// namespace) on its backend for that long after its last connection.
	SessionAffinityTimeout Duration `toml:"session_affinity_timeout"`
	// LocalOnly: only backends on this node; without one, connect fails.
	LocalOnly bool `toml:"local_only"`
	// PreferLocal: a backend on this node whenever there is one.
	PreferLocal bool `toml:"prefer_local"`
}

// maxAffinity is Kubernetes' bound of sessionAffinityConfig's timeout.
const maxAffinity = 24 * time.Hour

func validateServices(p *problems, svcs []Service) {
	names := make(map[string]int)
	keys := make(map[netip.AddrPort]int)
	for i, s := range svcs {
		key := fmt.Sprintf("services[%d]", i)
		if s.Name == "" {
			p.addf(key+".name", "is empty (want a name for logs and /debug/services)")
		} else if j, dup := names[s.Name]; dup {
			p.addf(key+".name", "%q is also the name of services[%d]", s.Name, j)
		} else {
			names[s.Name] = i
		}
		vipOK := true
		switch a := s.VIP; {
		case !a.IsValid():
			p.addf(key+".vip", "is not set (want the Service address, e.g. \"198.19.0.10\" or \"fd00:5e:ff::10\")")
			vipOK = false
		case a.Is4In6() || a.Zone() != "":
			p.addf(key+".vip", "%s: want a plain IPv4 or IPv6 address", a)
			vipOK = false
		case a.IsUnspecified() || a.IsMulticast():
			p.addf(key+".vip", "%s cannot be connected to (want a unicast address)", a)
			vipOK = false
		}
		if s.Port == 0 {
			p.addf(key+".port", "is not set (want the Service port, 1 to 65535)")
		} else if vipOK {
			ap := netip.AddrPortFrom(s.VIP, s.Port)
			if j, dup := keys[ap]; dup {
				p.addf(key, "%s is also services[%d]'s address and port", ap, j)
			}
			keys[ap] = i
		}
		seen := make(map[netip.AddrPort]bool)
		for _, b := range s.Backends {
			a := b.Addr()
			switch {
			case !a.IsValid() || b.Port() == 0:
				p.addf(key+".backends", "%s is not an address and port (want e.g. \"198.18.0.2:8080\" or \"[fd00::2]:8080\")", b)
			case a.Is4In6() || a.Zone() != "":
				p.addf(key+".backends", "%s: want a plain IPv4 or IPv6 address", b)
			case vipOK && a.Is4() != s.VIP.Is4():
				p.addf(key+".backends", "%s is not of the family of vip %s (a dual-stack Service is two [[services]], one per family)", b, s.VIP)
			case seen[b]:
				p.addf(key+".backends", "%s is listed twice", b)
			}
			seen[b] = true
		}
		if d := s.SessionAffinityTimeout.Duration; d < 0 || d > maxAffinity {
			p.addf(key+".session_affinity_timeout", "%s is out of range (want 0, no affinity, up to 24h, e.g. \"3h\")", d)
		}
	}
}
