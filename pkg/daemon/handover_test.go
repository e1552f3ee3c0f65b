package daemon

import (
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/rs/zerolog"

	"github.com/smesh-dev/smesh/pkg/handover"
)

// TestTakeListeners: a successor takes a handed-over listener only under its
// name, in its namespace and on the configured address (port 0 in the
// configuration: the port the predecessor got); anything else it leaves
// (nil: it listens anew) and closes, and the rest goes to the data path.
func TestTakeListeners(t *testing.T) {
	own, err := ownNetnsCookie()
	if err != nil {
		t.Fatal(err)
	}
	listen := func(addr string) *os.File {
		t.Helper()
		ln, err := net.Listen("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		f, err := ln.(*net.TCPListener).File()
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	out4 := handover.ListenerName("out4", own)
	tun := handover.ListenerName("tun", own)
	files := map[string]*os.File{
		out4:                                 listen("127.0.0.1:0"),
		tun:                                  listen("127.0.0.2:0"),
		handover.ListenerName("out4", own+1): listen("127.0.0.1:0"), // another namespace
		"admin":                              listen("127.0.0.1:0"),
		"map/smesh_sockhash":                 listen("127.0.0.1:0"), // stands in for a map
	}
	p := &predecessor{ports: make(map[string]uint16), adopt: make(map[string]*os.File), log: zerolog.Nop()}
	lns := make(map[string]*os.File)
	for name, f := range files {
		if isListenerName(name) {
			lns[name] = f
			p.ports[name] = boundPort(f)
		} else {
			p.adopt[name] = f
		}
	}
	p.lns = handover.NewListeners(lns)
	if _, ok := p.adopt["map/smesh_sockhash"]; !ok || len(p.adopt) != 1 {
		t.Errorf("the data path's part: %v, want the map only", p.adopt)
	}

	ln := p.take("out4", own, netip.MustParseAddrPort("127.0.0.1:0"))
	if ln == nil {
		t.Fatal("the outbound listener of this namespace, on the configured address (port 0), was not taken")
	}
	defer ln.Close()
	if got := ln.Addr().(*net.TCPAddr).Port; got != int(p.ports[out4]) || got == 0 {
		t.Errorf("took a listener on port %d, want the handed-over %d", got, p.ports[out4])
	}
	if ln := p.take("tun", own, netip.MustParseAddrPort("127.0.0.1:0")); ln != nil {
		ln.Close()
		t.Error("took a tunnel listener bound to another address than the configured one")
	}
	if ln := p.take("out6", own, netip.MustParseAddrPort("[::1]:0")); ln != nil {
		ln.Close()
		t.Error("took a listener nothing was handed over for")
	}
	if ln := p.take("admin", own, netip.MustParseAddrPort("127.0.0.1:0")); ln == nil {
		t.Error("the admin listener was not taken")
	} else {
		ln.Close()
	}
	// Left: the other namespace's, closed with what the data path left.
	if got := p.lns.Names(); len(got) != 1 || got[0] != handover.ListenerName("out4", own+1) {
		t.Errorf("left after taking: %v, want only the other namespace's listener", got)
	}
	p.closeRest()
	if len(p.lns.Names()) != 0 || len(p.adopt) != 0 {
		t.Errorf("closeRest left %v and %v", p.lns.Names(), p.adopt)
	}
	// A nil predecessor (no hand-over) has nothing.
	var none *predecessor
	if none.take("out4", own, netip.MustParseAddrPort("127.0.0.1:0")) != nil {
		t.Error("no predecessor, yet a listener")
	}
}

func TestTunnelAddrs(t *testing.T) {
	got := tunnelAddrs(netip.MustParseAddrPort("[::]:18001"))
	if len(got) != 2 || got[1] != netip.MustParseAddrPort("0.0.0.0:18001") {
		t.Errorf("tunnelAddrs([::]:18001) = %v, want the IPv4 fallback too", got)
	}
	if got := tunnelAddrs(netip.MustParseAddrPort("198.18.0.1:18001")); len(got) != 1 {
		t.Errorf("tunnelAddrs of an address = %v", got)
	}
}
