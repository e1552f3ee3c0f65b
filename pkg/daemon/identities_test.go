package daemon

import (
	"maps"
	"net/netip"
	"testing"

	"github.com/smesh-dev/smesh/pkg/enrol"
)

// A namespace whose processes all belong to one identity names it by its
// addresses (not loopback, not link-local); smeshd's own namespace, one
// shared by two identities and one of no workload name nothing.
func TestAddrIDs(t *testing.T) {
	entries := []IdentityEntry{
		{Cgroup: "/cg/smesh.slice", Number: 3},
		{Cgroup: "/cg/smesh.slice/pay.service", Number: 5},
		{Cgroup: "/cg/kubepods/burstable/podA", Number: 7},
		{Cgroup: "/cg/kubepods/burstable/podB", Number: 8},
	}
	nss := []enrol.Info{
		{Own: true, Cgroups: []string{"/cg/smesh.slice/web.service"}, Addrs: []string{"198.18.0.1"}},
		{Cgroups: []string{"/cg/kubepods/burstable/podA/c1", "/cg/kubepods/burstable/podA/c2"},
			Addrs: []string{"127.0.0.1", "::1", "198.18.1.2", "fd00:5e::2", "fe80::1"}},
		{Cgroups: []string{"/cg/kubepods/burstable/podB", "/cg/kubepods/burstable/podA"}, Addrs: []string{"198.18.1.3"}},
		{Cgroups: []string{"/cg/smesh.slice/pay.service/x"}, Addrs: []string{"198.18.1.4"}},
		{Cgroups: []string{"/cg/smesh.slice/pay.servicex"}, Addrs: []string{"198.18.1.5"}},
		{Cgroups: []string{"/cg/elsewhere"}, Addrs: []string{"198.18.1.6"}},
	}
	want := map[netip.Addr]uint32{
		netip.MustParseAddr("198.18.1.2"): 7,
		netip.MustParseAddr("fd00:5e::2"): 7,
		netip.MustParseAddr("198.18.1.4"): 5,
		netip.MustParseAddr("198.18.1.5"): 3, // not below pay.service: the slice's
	}
	if got := addrIDs(nss, entries); !maps.Equal(got, want) {
		t.Errorf("addrIDs = %v, want %v", got, want)
	}
}
