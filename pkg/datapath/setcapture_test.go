package datapath

import (
	"net/netip"
	"path/filepath"
	"reflect"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/rs/zerolog"

	"github.com/smesh-dev/smesh/bpf/connect"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// programs counts the programs of each type attached to a cgroup.
func programs(t *testing.T, cgroup string) map[ebpf.AttachType]int {
	t.Helper()
	n := make(map[ebpf.AttachType]int)
	for _, typ := range attachOrder {
		if c := testenv.AttachedPrograms(t, cgroup, typ); c > 0 {
			n[typ] = c
		}
	}
	return n
}

// includes lists the prefixes in the include map, sorted.
func includes(t *testing.T, d *Datapath) []string {
	t.Helper()
	var k connect.ConnectLpmKey
	var v uint8
	var out []string
	it := d.connect.SmeshInclude.Iterate()
	for it.Next(&k, &v) {
		out = append(out, netip.PrefixFrom(addrOf(k.Ip).Unmap(), int(k.Prefixlen)-96).String())
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	slices.Sort(out)
	return out
}

// TestSetCaptureAllOrNothing: a capture change that cannot be applied in
// full changes nothing: neither the rules nor any attachment, in the
// cgroups that stay, those that would have come and those that would have
// gone. (A reload relies on it; before, the rules changed before an attach
// failed.)
func TestSetCaptureAllOrNothing(t *testing.T) {
	testenv.RequirePrivileged(t)
	proxy, a, b, c := testenv.NewCgroup(t), testenv.NewCgroup(t), testenv.NewCgroup(t), testenv.NewCgroup(t)
	d, err := Load(Options{
		Mode:        ModeSplice,
		ProxyAddr:   netip.MustParseAddrPort("127.0.0.1:18000"),
		ProxyAddr6:  netip.MustParseAddrPort("[::1]:18000"),
		ProxyCgroup: proxy,
		MapSize:     1024,
		Logger:      zerolog.Nop(),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	p := func(s ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, x := range s {
			out = append(out, netip.MustParsePrefix(x))
		}
		return out
	}
	if err := d.SetCapture([]string{a, c}, p("10.0.0.0/8"), p("10.96.0.0/12"), []uint16{22}); err != nil {
		t.Fatal(err)
	}
	// b can take no more connect4 programs: an attach that fails after
	// others (sock_ops, getpeername4 of b) were made.
	testenv.FillCgroup(t, b)
	state := func() []any {
		return []any{includes(t, d), programs(t, proxy), programs(t, a), programs(t, b), programs(t, c), len(d.links)}
	}
	before := state()
	if got := before[0].([]string); !reflect.DeepEqual(got, []string{"10.0.0.0/8"}) {
		t.Fatalf("include map %q", got)
	}

	for name, cgroups := range map[string][]string{
		"a cgroup that takes no more programs": {a, b},
		"a file inside a cgroup":               {a, filepath.Join(a, "cgroup.procs")},
	} {
		t.Run(name, func(t *testing.T) {
			if err := d.SetCapture(cgroups, p("0.0.0.0/0"), nil, nil); err == nil {
				t.Fatal("SetCapture succeeded")
			}
			if after := state(); !reflect.DeepEqual(after, before) {
				t.Errorf("a failed SetCapture changed the data path:\nbefore %v\nafter  %v", before, after)
			}
		})
	}

	// A change that can be applied is applied in full.
	if err := d.SetCapture([]string{a}, p("0.0.0.0/0"), nil, nil); err != nil {
		t.Fatal(err)
	}
	if got := includes(t, d); !reflect.DeepEqual(got, []string{"0.0.0.0/0"}) {
		t.Errorf("include map %q after a good change", got)
	}
	if n := programs(t, c); len(n) != 0 {
		t.Errorf("programs still attached to a cgroup no longer enrolled: %v", n)
	}
}
