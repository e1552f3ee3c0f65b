package datapath

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/rs/zerolog"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// TestSetCaptureSkipsAMissingCgroup: a pod's cgroup can be gone by the time
// its enrolment reaches SetCapture. That one cgroup fails (the error names
// it); the others of the same call are attached, and cgroups no longer
// wanted are detached, all the same.
func TestSetCaptureSkipsAMissingCgroup(t *testing.T) {
	testenv.RequirePrivileged(t)
	own, a, b := testenv.NewCgroup(t), testenv.NewCgroup(t), testenv.NewCgroup(t)
	d, err := Load(Options{
		Mode:         ModeCopy,
		ProxyAddr:    netip.MustParseAddrPort("127.0.0.1:18000"),
		ProxyAddr6:   netip.MustParseAddrPort("[::1]:18000"),
		ProxyCgroup:  own,
		IncludeCIDRs: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")},
		MapSize:      1024,
		Logger:       zerolog.New(zerolog.NewTestWriter(t)),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	include := []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}
	if err := d.SetCapture([]string{a}, include, nil, nil); err != nil {
		t.Fatal(err)
	}
	gone := filepath.Join(a, "..", filepath.Base(a)+"-gone")
	if _, err := os.Stat(gone); err == nil {
		t.Fatalf("%s exists", gone)
	}
	err = d.SetCapture([]string{gone, b}, include, nil, nil)
	if err == nil || !strings.Contains(err.Error(), filepath.Base(gone)) {
		t.Fatalf("SetCapture with a missing cgroup = %v, want an error naming it", err)
	}
	attached := func(cg string, typ ebpf.AttachType) bool { return d.links[attachment{cg, typ}] != nil }
	for _, typ := range []ebpf.AttachType{ebpf.AttachCGroupSockOps, ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect} {
		if !attached(b, typ) {
			t.Errorf("%s not attached to %s", typ, b)
		}
		if attached(a, typ) {
			t.Errorf("%s still attached to %s, which is no longer enrolled", typ, a)
		}
		if attached(gone, typ) {
			t.Errorf("%s attached to the missing %s", typ, gone)
		}
	}
}
