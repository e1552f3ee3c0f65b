package datapath

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/smesh-dev/smesh/bpf/connect"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// TestShouldCapture runs connect4's capture decision (capture.h) in the
// kernel through BPF_PROG_TEST_RUN, with maps and constants set exactly as
// New sets them.
func TestShouldCapture(t *testing.T) {
	testenv.RequirePrivileged(t)
	base := Options{
		ProxyAddr:    netip.MustParseAddrPort("127.0.0.1:18000"),
		ProxyAddr6:   netip.MustParseAddrPort("[::1]:18000"),
		IncludeCIDRs: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")},
		ExcludeCIDRs: []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12"), netip.MustParsePrefix("fd00:5e:ff::/48")},
		ExcludePorts: []uint16{22},
	}
	narrow := base
	narrow.IncludeCIDRs = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	local, local6 := netip.MustParseAddr("198.18.5.1"), netip.MustParseAddr("fd00:5e:5::1")
	pod, pod6 := netip.MustParseAddr("198.18.6.7"), netip.MustParseAddr("fd00:5e:6::7") // of another namespace on this node
	v4only := base
	v4only.IncludeCIDRs = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}

	cases := []struct {
		name   string
		opts   Options
		dst    string
		splice bool // captured in splice mode
		copy   bool // captured in copy mode
	}{
		{"remote address", base, "10.1.2.3:80", true, true},
		{"excluded CIDR", base, "10.96.0.10:443", false, false},
		{"excluded port", base, "10.1.2.3:22", false, false},
		{"the proxy itself", base, "127.0.0.1:18000", false, false},
		{"loopback", base, "127.0.0.5:80", false, true},
		{"an address of this node", base, "198.18.5.1:8080", false, true},
		{"an address of another namespace on this node", base, "198.18.6.7:8080", false, true},
		{"inside include_cidrs", narrow, "10.200.0.1:80", true, true},
		{"outside include_cidrs", narrow, "192.0.2.1:80", false, false},
		{"outside include_cidrs, local", narrow, "127.0.0.1:9000", false, false},
		{"IPv6 remote address", base, "[fd00:5e:1::5]:80", true, true},
		{"IPv6 excluded CIDR", base, "[fd00:5e:ff::1]:80", false, false},
		{"IPv6 excluded port", base, "[fd00:5e:1::5]:22", false, false},
		{"IPv6 loopback", base, "[::1]:80", false, true},
		{"the IPv6 proxy itself", base, "[::1]:18000", false, false},
		{"an IPv6 address of this node", base, "[fd00:5e:5::1]:8080", false, true},
		{"an IPv6 address of another namespace on this node", base, "[fd00:5e:6::7]:8080", false, true},
		{"IPv6 outside include_cidrs", v4only, "[fd00:5e:1::5]:80", false, false},
		{"v4-mapped remote address", base, "[::ffff:10.1.2.3]:80", true, true},
		{"v4-mapped excluded CIDR", base, "[::ffff:10.96.0.10]:443", false, false},
		{"v4-mapped loopback", base, "[::ffff:127.0.0.1]:80", false, true},
		{"v4-mapped proxy", base, "[::ffff:127.0.0.1]:18000", false, false},
		{"v4-mapped, IPv4 included only", v4only, "[::ffff:10.1.2.3]:80", true, true},
	}
	for _, c := range cases {
		for _, mode := range []Mode{ModeSplice, ModeCopy} {
			t.Run(c.name+"/"+string(mode), func(t *testing.T) {
				opts := c.opts
				opts.Mode = mode
				run := captureHarness(t, opts, []netip.Addr{local, local6}, []netip.Addr{pod, pod6})
				want := c.splice
				if mode == ModeCopy {
					want = c.copy
				}
				if got := run(netip.MustParseAddrPort(c.dst)); got != want {
					t.Errorf("should_capture(%s) = %v, want %v", c.dst, got, want)
				}
			})
		}
	}
}

// The namespaces of the harness tests: the caller's, and another one on
// the same node.
const (
	callerNetns = 1
	otherNetns  = 2
)

// harnessAddr splits an address into the two context words the harness
// programs read as a struct addr.
func harnessAddr(a netip.Addr) (uint64, uint64) {
	b := bpfAddr(a)
	return uint64(b.Ip[0]) | uint64(b.Ip[1])<<32, uint64(b.Ip[2]) | uint64(b.Ip[3])<<32
}

// captureHarness loads the harness program with opts, the caller's
// namespace having callerAddrs and another namespace otherAddrs, and returns
// a function that asks it about one destination.
func captureHarness(t *testing.T, opts Options, callerAddrs, otherAddrs []netip.Addr) func(netip.AddrPort) bool {
	t.Helper()
	objs := loadHarness(t, opts, map[uint64][]netip.Addr{callerNetns: callerAddrs, otherNetns: otherAddrs})
	return func(dst netip.AddrPort) bool {
		a, b := harnessAddr(dst.Addr())
		args := []uint64{a, b, uint64(dst.Port()), callerNetns}
		ret, err := objs.RunShouldCapture.Run(&ebpf.RunOptions{Context: args})
		if err != nil {
			t.Fatalf("running the harness: %v", err)
		}
		return ret == 1
	}
}

// loadHarness loads the harness programs with opts and the given namespaces
// and their addresses in the maps, as SetNamespace puts them there.
func loadHarness(t *testing.T, opts Options, namespaces map[uint64][]netip.Addr) *connect.CaptureHarnessObjects {
	t.Helper()
	spec, err := connect.LoadCaptureHarness()
	if err != nil {
		t.Fatal(err)
	}
	if err := setConnectVars(spec, opts, 0); err != nil {
		t.Fatal(err)
	}
	var objs connect.CaptureHarnessObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		t.Fatal(verifierError(err))
	}
	t.Cleanup(func() { objs.Close() })
	if err := (captureMaps{objs.SmeshInclude, objs.SmeshExclude, objs.SmeshExcludePorts}).sync(opts.IncludeCIDRs, opts.ExcludeCIDRs, opts.ExcludePorts); err != nil {
		t.Fatal(err)
	}
	ns := &nsMaps{addrs: objs.SmeshAddrs, nsAddrs: objs.SmeshNsAddrs, ready: objs.SmeshNetns}
	if err := ns.reset(); err != nil {
		t.Fatal(err)
	}
	for cookie, addrs := range namespaces {
		if err := ns.set(cookie, addrs, true, true); err != nil {
			t.Fatal(err)
		}
	}
	return &objs
}

// TestPeerNetns runs sock_ops' choice of a spliced hop's peer namespace
// (peer_netns in smesh.h) in the kernel: the caller's own namespace for
// loopback and its own addresses, the one namespace that has the address,
// and none (not spliced) when several or none have it.
func TestPeerNetns(t *testing.T) {
	testenv.RequirePrivileged(t)
	const third = 3
	opts := Options{ProxyAddr: netip.MustParseAddrPort("127.0.0.1:18000")}
	objs := loadHarness(t, opts, map[uint64][]netip.Addr{
		callerNetns: {netip.MustParseAddr("198.18.1.2"), netip.MustParseAddr("198.18.9.9"), netip.MustParseAddr("fd00:5e:1::2")},
		otherNetns:  {netip.MustParseAddr("198.18.1.3"), netip.MustParseAddr("198.18.9.9"), netip.MustParseAddr("198.18.7.7"), netip.MustParseAddr("fd00:5e:1::3")},
		third:       {netip.MustParseAddr("198.18.7.7")},
	})
	cases := []struct {
		name   string
		remote string
		want   uint64
	}{
		{"IPv4 loopback", "127.0.0.1", callerNetns},
		{"other IPv4 loopback", "127.3.2.1", callerNetns},
		{"IPv6 loopback", "::1", callerNetns},
		{"own address", "198.18.1.2", callerNetns},
		{"own IPv6 address", "fd00:5e:1::2", callerNetns},
		{"own address another namespace has too", "198.18.9.9", callerNetns},
		{"another namespace's address", "198.18.1.3", otherNetns},
		{"another namespace's IPv6 address", "fd00:5e:1::3", otherNetns},
		{"address of two other namespaces", "198.18.7.7", 0},
		{"unknown address", "198.18.200.1", 0},
		{"unknown IPv6 address", "fd00:5e:9::1", 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a, b := harnessAddr(netip.MustParseAddr(c.remote))
			ret, err := objs.RunPeerNetns.Run(&ebpf.RunOptions{Context: []uint64{a, b, callerNetns}})
			if err != nil {
				t.Fatalf("running the harness: %v", err)
			}
			if uint64(ret) != c.want {
				t.Errorf("peer_netns(%s) = %d, want %d", c.remote, ret, c.want)
			}
		})
	}
}
