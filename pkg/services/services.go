// Package services is the model of the Services smesh balances in the
// kernel: a virtual address and port (a Kubernetes ClusterIP, or a
// [[services]] entry of smesh.toml) whose connections connect4/connect6
// send to one of its backends before the capture decision, so a connection
// to a Service takes the path a connection to the chosen backend would
// (spliced when the backend is on this node, tunnelled when it is not).
//
// Sources (pkg/kube for Kubernetes, pkg/config for static services) turn
// their objects into Service values; a Sink (the data path) keeps them in
// BPF maps. Nothing here knows either side.
package services

import (
	"fmt"
	"net/netip"
	"slices"
	"time"
)

// Key names one service port: TCP connections to VIP:Port. A
// Kubernetes Service with two ClusterIPs (dual-stack) and three TCP ports
// is six Keys.
type Key struct {
	VIP  netip.Addr // unmapped: IPv4 as 4 bytes
	Port uint16
}

func (k Key) String() string { return netip.AddrPortFrom(k.VIP, k.Port).String() }

// Backend is one endpoint of a service port: where a connection goes.
type Backend struct {
	Addr netip.AddrPort // the pod's address and the resolved target port
	// Node is the node the backend runs on ("" when unknown: a static
	// backend, an endpoint without nodeName).
	Node string
	// Local: the backend runs on this node (connections to it are
	// spliced when both ends are in the mesh).
	Local bool
	// The EndpointSlice conditions (static backends are ready).
	Ready, Serving, Terminating bool
}

// Service is one service port and every backend known for it.
type Service struct {
	Key
	// Name says where it comes from, for logs and /debug/services:
	// "namespace/name:portname" for Kubernetes, the [[services]] name
	// for static ones.
	Name     string
	Backends []Backend
	// AffinityTimeout, when not zero, keeps a client on the backend it
	// got last for that long after its last connection
	// (sessionAffinity: ClientIP). The client is its network namespace
	// (one per pod).
	AffinityTimeout time.Duration
	// LocalOnly: only backends on this node may be chosen
	// (internalTrafficPolicy: Local); without one, connect fails.
	LocalOnly bool
	// PreferLocal: a backend on this node is chosen whenever one exists
	// (trafficDistribution: PreferClose, or [kubernetes]
	// prefer_local_backends = "always").
	PreferLocal bool
}

// Usable returns the backends a connection may be sent to, as
// kube-proxy picks them: the ready ones; when none is ready, those serving
// while terminating (a draining Service still answers). The order is
// stable (by address), local backends first.
func (s Service) Usable() []Backend {
	var ready, draining []Backend
	for _, b := range s.Backends {
		switch {
		case b.Ready:
			ready = append(ready, b)
		case b.Serving && b.Terminating:
			draining = append(draining, b)
		}
	}
	use := ready
	if len(use) == 0 {
		use = draining
	}
	use = slices.Clone(use)
	slices.SortFunc(use, func(a, b Backend) int {
		if a.Local != b.Local {
			if a.Local {
				return -1
			}
			return 1
		}
		return a.Addr.Compare(b.Addr)
	})
	if s.LocalOnly {
		n := 0
		for n < len(use) && use[n].Local {
			n++
		}
		use = use[:n]
	}
	return use
}

// Validate says what is wrong with s for a Sink, or nil.
func (s Service) Validate() error {
	if !s.VIP.IsValid() || s.VIP.Is4In6() || s.Port == 0 {
		return fmt.Errorf("service %s: %s is not a service address and port", s.Name, s.Key)
	}
	for _, b := range s.Backends {
		a := b.Addr.Addr()
		if !a.IsValid() || a.Is4In6() || b.Addr.Port() == 0 {
			return fmt.Errorf("service %s: backend %s is not an address and port", s.Name, b.Addr)
		}
		if a.Is4() != s.VIP.Is4() {
			return fmt.Errorf("service %s: backend %s is not of the family of %s", s.Name, b.Addr, s.VIP)
		}
	}
	return nil
}

// Sink keeps services where connect4/connect6 read them. Update replaces
// what it holds for s.Key; Delete removes a key (no error when absent).
// A connect() sees either the old or the new set of backends, never a mix.
type Sink interface {
	Update(s Service) error
	Delete(k Key) error
}
