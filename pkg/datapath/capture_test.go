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
		IncludeCIDRs: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")},
		ExcludeCIDRs: []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12")},
		ExcludePorts: []uint16{22},
	}
	narrow := base
	narrow.IncludeCIDRs = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	local := netip.MustParseAddr("198.18.5.1")

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
		{"inside include_cidrs", narrow, "10.200.0.1:80", true, true},
		{"outside include_cidrs", narrow, "192.0.2.1:80", false, false},
		{"outside include_cidrs, local", narrow, "127.0.0.1:9000", false, false},
	}
	for _, c := range cases {
		for _, mode := range []Mode{ModeSplice, ModeCopy} {
			t.Run(c.name+"/"+string(mode), func(t *testing.T) {
				opts := c.opts
				opts.Mode = mode
				run := captureHarness(t, opts, []netip.Addr{local})
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

// captureHarness loads the harness program with opts and returns a
// function that asks it about one destination.
func captureHarness(t *testing.T, opts Options, localAddrs []netip.Addr) func(netip.AddrPort) bool {
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
	if err := setLocalAddrs(objs.SmeshLocalAddrs, localAddrs); err != nil {
		t.Fatal(err)
	}
	return func(dst netip.AddrPort) bool {
		args := []uint64{uint64(ip4(dst.Addr())), uint64(dst.Port())}
		ret, err := objs.RunShouldCapture.Run(&ebpf.RunOptions{Context: args})
		if err != nil {
			t.Fatalf("running the harness: %v", err)
		}
		return ret == 1
	}
}
