package datapath

import (
	"math"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/smesh-dev/smesh/pkg/services"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// Results of choose_backend (service.h, enum svc_result).
const (
	svcNone       = 0
	svcTranslated = 1
	svcNoBackend  = 2
)

// chooser runs connect4's choice of a backend (choose_backend in
// service.h) through the harness, with the services a ServiceTable wrote
// into the harness's own maps.
type chooser struct {
	t     *testing.T
	table *ServiceTable
	prog  *ebpf.Program
}

func newChooser(t *testing.T) *chooser {
	t.Helper()
	testenv.RequirePrivileged(t)
	objs := loadHarness(t, Options{ProxyAddr: netip.MustParseAddrPort("127.0.0.1:18000")}, nil)
	table, err := newServiceTable(serviceMaps{objs.SmeshServices, objs.SmeshBackends, objs.SmeshSvcMembers}, false)
	if err != nil {
		t.Fatal(err)
	}
	return &chooser{t: t, table: table, prog: objs.RunChooseBackend}
}

// choose asks for a backend of dst from namespace netns: the result and
// the chosen backend's port.
func (c *chooser) choose(netns uint64, dst netip.AddrPort) (result int, port uint16) {
	a, b := harnessAddr(dst.Addr())
	ret, err := c.prog.Run(&ebpf.RunOptions{Context: []uint64{a, b, uint64(dst.Port()), netns}})
	if err != nil {
		c.t.Fatalf("running the harness: %v", err)
	}
	return int(ret >> 16), uint16(ret)
}

func (c *chooser) update(s services.Service) {
	c.t.Helper()
	if err := c.table.Update(s); err != nil {
		c.t.Fatal(err)
	}
}

// backends makes backends on ports 1, 2, ...: the first local of them on
// this node.
func backends(n, local int) []services.Backend {
	var out []services.Backend
	for i := range n {
		out = append(out, services.Backend{
			Addr:  netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 50, byte(i + 1)}), uint16(i+1)),
			Local: i < local, Ready: true,
		})
	}
	return out
}

var (
	vip     = netip.MustParseAddrPort("198.19.0.10:80")
	vipKey  = services.Key{VIP: vip.Addr(), Port: vip.Port()}
	vip6    = netip.MustParseAddrPort("[fd00:5e:ff::10]:80")
	vip6Key = services.Key{VIP: vip6.Addr(), Port: vip6.Port()}
)

// TestChooseBackend: the choice connect4 makes, in the kernel.
func TestChooseBackend(t *testing.T) {
	c := newChooser(t)
	// counts chooses n times from netns 1 and counts the backends' ports.
	counts := func(dst netip.AddrPort, n int) map[uint16]int {
		got := make(map[uint16]int)
		for range n {
			r, port := c.choose(callerNetns, dst)
			if r != svcTranslated {
				t.Fatalf("choose(%s) = result %d, want translated", dst, r)
			}
			got[port]++
		}
		return got
	}

	t.Run("not a service", func(t *testing.T) {
		c.update(services.Service{Key: vipKey, Name: "web", Backends: backends(1, 0)})
		for _, dst := range []string{"198.19.0.10:81", "198.19.0.11:80", "[::ffff:198.19.0.11]:80"} {
			if r, _ := c.choose(callerNetns, netip.MustParseAddrPort(dst)); r != svcNone {
				t.Errorf("choose(%s) = %d, want none", dst, r)
			}
		}
	})
	t.Run("v4-mapped is the IPv4 service", func(t *testing.T) {
		c.update(services.Service{Key: vipKey, Name: "web", Backends: backends(1, 0)})
		if r, port := c.choose(callerNetns, netip.MustParseAddrPort("[::ffff:198.19.0.10]:80")); r != svcTranslated || port != 1 {
			t.Errorf("got %d, port %d", r, port)
		}
	})
	t.Run("spread over 3 backends", func(t *testing.T) {
		c.update(services.Service{Key: vipKey, Name: "web", Backends: backends(3, 0)})
		const n = 1000
		got := counts(vip, n)
		// Chi-square with 2 degrees of freedom: 30 is p < 1e-6.
		chi := 0.0
		for port := uint16(1); port <= 3; port++ {
			d := float64(got[port]) - n/3.0
			chi += d * d / (n / 3.0)
		}
		if len(got) != 3 || chi > 30 {
			t.Errorf("1000 connections went %v (chi-square %.1f)", got, chi)
		}
	})
	t.Run("prefer local", func(t *testing.T) {
		c.update(services.Service{Key: vipKey, Name: "web", Backends: backends(4, 2), PreferLocal: true})
		got := counts(vip, 200)
		if got[3]+got[4] != 0 || got[1] == 0 || got[2] == 0 {
			t.Errorf("prefer_local with two local backends went %v, want only ports 1 and 2", got)
		}
		c.update(services.Service{Key: vipKey, Name: "web", Backends: backends(3, 0), PreferLocal: true})
		if got := counts(vip, 200); len(got) != 3 {
			t.Errorf("prefer_local without local backends went %v, want all three", got)
		}
	})
	t.Run("local only", func(t *testing.T) {
		c.update(services.Service{Key: vipKey, Name: "web", Backends: backends(3, 1), LocalOnly: true})
		if got := counts(vip, 100); got[1] != 100 {
			t.Errorf("local_only went %v, want port 1 only", got)
		}
		c.update(services.Service{Key: vipKey, Name: "web", Backends: backends(3, 0), LocalOnly: true})
		if r, _ := c.choose(callerNetns, vip); r != svcNoBackend {
			t.Errorf("local_only without a local backend: result %d, want no backend", r)
		}
	})
	t.Run("no backend", func(t *testing.T) {
		c.update(services.Service{Key: vipKey, Name: "web"})
		if r, _ := c.choose(callerNetns, vip); r != svcNoBackend {
			t.Errorf("result %d, want no backend", r)
		}
		notReady := backends(2, 0)
		notReady[0].Ready, notReady[1].Ready = false, false
		c.update(services.Service{Key: vipKey, Name: "web", Backends: notReady})
		if r, _ := c.choose(callerNetns, vip); r != svcNoBackend {
			t.Errorf("no ready backend: result %d, want no backend", r)
		}
	})
	t.Run("deleted", func(t *testing.T) {
		c.update(services.Service{Key: vipKey, Name: "web", Backends: backends(2, 0)})
		if err := c.table.Delete(vipKey); err != nil {
			t.Fatal(err)
		}
		if r, _ := c.choose(callerNetns, vip); r != svcNone {
			t.Errorf("result %d, want none", r)
		}
		if f := c.table.Fill(); f.Services != 0 || f.Backends != 0 {
			t.Errorf("fill %+v after delete", f)
		}
		time.Sleep(retireGrace + 100*time.Millisecond)
		if n := mapLen(t, c.table.maps.backends); n != 0 {
			t.Errorf("%d backend slots left after delete", n)
		}
	})
	t.Run("IPv6", func(t *testing.T) {
		bs := []services.Backend{
			{Addr: netip.MustParseAddrPort("[fd00:5e:50::1]:7"), Ready: true},
			{Addr: netip.MustParseAddrPort("[fd00:5e:50::2]:8"), Ready: true},
		}
		c.update(services.Service{Key: vip6Key, Name: "web6", Backends: bs})
		if got := counts(vip6, 100); got[7]+got[8] != 100 || got[7] == 0 || got[8] == 0 {
			t.Errorf("IPv6 service went %v", got)
		}
	})
}

// mapLen counts a map's entries.
func mapLen(t *testing.T, m *ebpf.Map) int {
	t.Helper()
	var k, v []byte
	n := 0
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestChooseAffinity: sessionAffinity ClientIP keeps a client (its network
// namespace) on one backend until the timeout passes without a connection,
// or until that backend leaves the service.
func TestChooseAffinity(t *testing.T) {
	c := newChooser(t)
	svc := services.Service{Key: vipKey, Name: "sticky", Backends: backends(5, 0), AffinityTimeout: time.Second}
	c.update(svc)
	_, first := c.choose(callerNetns, vip)
	for range 50 {
		if _, port := c.choose(callerNetns, vip); port != first {
			t.Fatalf("client moved from backend %d to %d", first, port)
		}
	}
	// Another namespace is another client: over 50 tries it must see
	// another backend than the first at least once.
	others := make(map[uint16]bool)
	for ns := uint64(100); ns < 150; ns++ {
		_, port := c.choose(ns, vip)
		others[port] = true
	}
	if len(others) < 2 {
		t.Errorf("50 clients all got backend(s) %v", others)
	}

	// An update that keeps the backend keeps the client on it.
	svc.Backends = append(svc.Backends, backends(6, 0)[5])
	c.update(svc)
	if _, port := c.choose(callerNetns, vip); port != first {
		t.Errorf("after an update that kept backend %d, the client got %d", first, port)
	}

	// One that removes it moves the client.
	var kept []services.Backend
	for _, b := range svc.Backends {
		if b.Addr.Port() != first {
			kept = append(kept, b)
		}
	}
	svc.Backends = kept
	c.update(svc)
	_, moved := c.choose(callerNetns, vip)
	if moved == first {
		t.Fatalf("the client still got backend %d, which left the service", first)
	}

	// Expiry: after the timeout without a connection, a fresh choice; with
	// 5 backends, 20 expiries all landing on the same backend would be
	// chance of (1/5)^20.
	seen := map[uint16]bool{moved: true}
	for i := 0; i < 20 && len(seen) < 2; i++ {
		time.Sleep(1100 * time.Millisecond)
		_, port := c.choose(callerNetns, vip)
		seen[port] = true
		if i == 0 && !t.Failed() {
			// Within the timeout it stays.
			if _, again := c.choose(callerNetns, vip); again != port {
				t.Fatalf("backend changed within the timeout: %d then %d", port, again)
			}
		}
	}
	if len(seen) < 2 {
		t.Errorf("the client kept backend %d across 20 expiries of its affinity", moved)
	}
}

// TestChooseDuringUpdates: while one goroutine replaces a service's
// backends over and over (the set changes each time), connect()s never find
// no backend, and never one of neither set (the atomic switch).
func TestChooseDuringUpdates(t *testing.T) {
	c := newChooser(t)
	setA, setB := backends(3, 0), backends(6, 0)[3:]
	c.update(services.Service{Key: vipKey, Name: "web", Backends: setA})
	var stop atomic.Bool
	var wg sync.WaitGroup
	var updates atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		// At most 5,000 revisions: each holds its slots for
		// retireGrace after it is replaced, so an unbounded loop would
		// fill smesh_backends within the second (as a real source never
		// does: the Kubernetes watcher coalesces a Service's events).
		for i := 0; !stop.Load() && i < 5000; i++ {
			set := setA
			if i%2 == 1 {
				set = setB
			}
			if err := c.table.Update(services.Service{Key: vipKey, Name: "web", Backends: set}); err != nil {
				t.Error(err)
				return
			}
			updates.Add(1)
		}
	}()
	deadline := time.Now().Add(2 * time.Second)
	n := 0
	for time.Now().Before(deadline) && n < 200000 {
		r, port := c.choose(callerNetns, vip)
		if r != svcTranslated || port < 1 || port > 6 {
			stop.Store(true)
			wg.Wait()
			t.Fatalf("connect %d during updates: result %d, port %d", n, r, port)
		}
		n++
	}
	stop.Store(true)
	wg.Wait()
	if updates.Load() < 10 {
		t.Errorf("only %d updates ran during %d connects", updates.Load(), n)
	}
	t.Logf("%d connects during %d updates", n, updates.Load())
	if s := c.table.Services(); len(s) != 1 {
		t.Errorf("table holds %d services", len(s))
	}
	time.Sleep(retireGrace + 100*time.Millisecond)
	if got, want := mapLen(t, c.table.maps.backends), 3; got != want {
		t.Errorf("%d backend slots left, want %d", got, want)
	}
}

// TestServiceValidate: the table refuses what the programs could not use,
// and keeps what it had.
func TestServiceValidate(t *testing.T) {
	c := newChooser(t)
	c.update(services.Service{Key: vipKey, Name: "web", Backends: backends(1, 0)})
	bad := services.Service{Key: vipKey, Name: "web", Backends: []services.Backend{{Addr: netip.MustParseAddrPort("[fd00::1]:80"), Ready: true}}}
	if err := c.table.Update(bad); err == nil {
		t.Error("an IPv6 backend of an IPv4 service was accepted")
	}
	if r, port := c.choose(callerNetns, vip); r != svcTranslated || port != 1 {
		t.Errorf("after a refused update: result %d port %d, want the previous backend", r, port)
	}
	if v := svcValue(heldService{svc: services.Service{AffinityTimeout: 1500 * time.Millisecond}}); v.AffinitySec != 2 {
		t.Errorf("1.5s affinity is %d s, want 2", v.AffinitySec)
	}
	if v := svcValue(heldService{svc: services.Service{AffinityTimeout: time.Duration(math.MaxInt64)}}); v.AffinitySec != math.MaxUint32 {
		t.Errorf("huge affinity is %d s", v.AffinitySec)
	}
}

// TestServicesHandedOver: a table over maps a running predecessor handed
// over keeps the predecessor's services in force (a connect() to them is
// still translated), replaces and deletes them like its own, and removes
// every slot of the predecessor's once replaced, those it was retiring
// included.
func TestServicesHandedOver(t *testing.T) {
	c := newChooser(t)
	other := netip.MustParseAddrPort("198.19.0.11:5432")
	otherKey := services.Key{VIP: other.Addr(), Port: other.Port()}
	c.update(services.Service{Key: vipKey, Name: "web", Backends: backends(2, 0)})
	c.update(services.Service{Key: vipKey, Name: "web", Backends: backends(3, 0)}) // 2 slots retiring
	c.update(services.Service{Key: otherKey, Name: "db", Backends: backends(1, 0)})
	c.table.stop() // the predecessor released

	table, err := newServiceTable(c.table.maps, true)
	if err != nil {
		t.Fatal(err)
	}
	defer table.stop()
	if r, _ := c.choose(callerNetns, vip); r != svcTranslated {
		t.Fatalf("choose(%s) = %d after the hand-over, want translated", vip, r)
	}
	if r, _ := c.choose(callerNetns, other); r != svcTranslated {
		t.Fatalf("choose(%s) = %d after the hand-over, want translated", other, r)
	}
	moved := []services.Backend{{Addr: netip.MustParseAddrPort("198.18.50.9:9"), Ready: true}}
	if err := table.Update(services.Service{Key: vipKey, Name: "web", Backends: moved}); err != nil {
		t.Fatal(err)
	}
	if r, port := c.choose(callerNetns, vip); r != svcTranslated || port != 9 {
		t.Errorf("choose(%s) = %d, port %d after the successor's update, want port 9", vip, r, port)
	}
	if err := table.Delete(otherKey); err != nil {
		t.Fatal(err)
	}
	if r, _ := c.choose(callerNetns, other); r != svcNone {
		t.Errorf("choose(%s) = %d after the successor deleted it, want none", other, r)
	}
	time.Sleep(retireGrace + 500*time.Millisecond)
	if n := mapLen(t, c.table.maps.backends); n != len(moved) {
		t.Errorf("%d backend slots once the grace passed, want the successor's %d", n, len(moved))
	}
}
