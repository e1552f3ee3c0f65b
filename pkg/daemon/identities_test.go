package daemon

import (
	"maps"
	"net/netip"
	"strings"
	"testing"

	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/datapath"
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

// A workload's ports apply in every namespace its processes run in, the
// node's own included, on that namespace's non-loopback addresses for the
// tunnel; a port two identities claim in one namespace names neither and
// is reported with both; one identity's two cgroups may share a port.
func TestPortOwners(t *testing.T) {
	entries := []IdentityEntry{
		{Cgroup: "/cg/smesh.slice", Number: 3, Identity: "spiffe://td/slice"},
		{Cgroup: "/cg/smesh.slice/pay.service", Number: 5, Identity: "spiffe://td/pay", Ports: []uint16{8080, 9090}},
		{Cgroup: "/cg/smesh.slice/web.service", Number: 6, Identity: "spiffe://td/web", Ports: []uint16{80, 9090}},
		{Cgroup: "/cg/smesh.slice/web2.service", Number: 6, Identity: "spiffe://td/web", Ports: []uint16{80}},
		{Cgroup: "/cg/smesh.slice/own.service", Number: 7, Identity: "spiffe://td/own", Ports: []uint16{8080}},
	}
	nss := []enrol.Info{
		{Own: true, Cookie: 1, Cgroups: []string{"/cg/smesh.slice/pay.service", "/cg/smesh.slice/web.service", "/cg/smesh.slice/web2.service/x"},
			Addrs: []string{"127.0.0.1", "::1", "198.18.0.1", "fd00:5e::1"}},
		{Cookie: 2, Cgroups: []string{"/cg/smesh.slice/own.service"}, Addrs: []string{"127.0.0.1", "198.18.1.4"}},
		{Cookie: 3, Cgroups: []string{"/cg/smesh.slice/other.service"}, Addrs: []string{"198.18.1.5"}},
	}
	ids, byAddr, problems := portOwners(nss, entries)
	wantIDs := map[datapath.PortKey]uint32{{Netns: 1, Port: 8080}: 5, {Netns: 1, Port: 80}: 6, {Netns: 2, Port: 8080}: 7}
	if !maps.Equal(ids, wantIDs) {
		t.Errorf("ids = %v, want %v", ids, wantIDs)
	}
	wantAddr := map[netip.AddrPort]uint32{
		netip.MustParseAddrPort("198.18.0.1:8080"): 5, netip.MustParseAddrPort("[fd00:5e::1]:8080"): 5,
		netip.MustParseAddrPort("198.18.0.1:80"): 6, netip.MustParseAddrPort("[fd00:5e::1]:80"): 6,
		netip.MustParseAddrPort("198.18.1.4:8080"): 7,
	}
	if !maps.Equal(byAddr, wantAddr) {
		t.Errorf("byAddr = %v, want %v", byAddr, wantAddr)
	}
	if len(problems) != 1 || !strings.Contains(problems[0], "port 9090") || !strings.Contains(problems[0], "pay.service") || !strings.Contains(problems[0], "web.service") {
		t.Errorf("problems %q, want port 9090 claimed by pay.service and web.service", problems)
	}
}

// A [capture] cgroup whose default identity cannot be formed (a host named
// "(none)", as a machine without a host name is) is captured without an
// identity and warned about once, instead of stopping smeshd; a workload
// with an explicit identity keeps it.
func TestDefaultIdentityUnformable(t *testing.T) {
	var logs strings.Builder
	d := &daemon{log: zerolog.New(&logs), mount: "/cg"}
	d.cfg.Tunnel.TLS.TrustDomain = "smesh.local"
	d.idents = &identities{node: "(none)"}
	c := config.Capture{
		Cgroups:   []string{"smesh.slice"},
		Workloads: []config.Workload{{Cgroup: "smesh.slice/pay.service", Identity: "spiffe://smesh.local/ns/a/sa/pay"}},
	}
	for range 2 {
		entries, names, err := d.wantedIdentities(c)
		if err != nil {
			t.Fatalf("wantedIdentities: %v", err)
		}
		if len(entries) != 1 || entries[0].Cgroup != "/cg/smesh.slice/pay.service" || names["/cg/smesh.slice"] != (spiffeid.ID{}) {
			t.Fatalf("entries %+v, names %v: want only the workload's", entries, names)
		}
	}
	if n := strings.Count(logs.String(), "no workload identity for this [capture] cgroup"); n != 1 {
		t.Errorf("warned %d times, want once: %s", n, logs.String())
	}
}
