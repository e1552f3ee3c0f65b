package e2e

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// twoNodes links node a (smeshd, enrolled client) to node b (a server
// outside the mesh, and a smeshd that only receives tunnel traffic) and
// returns the server's address.
func twoNodes(t *testing.T, mode, extra string) (a *node, addrB netip.Addr, server string) {
	a = newNode(t)
	b := newNode(t)
	b.capture = "[]"
	_, addrB = testenv.Link(t, a.ns, b.ns)
	server = netip.AddrPortFrom(addrB, 9000).String()
	b.server("", server)
	b.start(mode, "")
	a.start(mode, extra)
	return a, addrB, server
}

// TestCaptureAcrossNodes: a connection from an enrolled process to another
// node is captured, carried by the tunnel to that node's smeshd, which
// connects to the server, and arrives byte-exact; smeshd's own connections
// are not captured again; a process outside the mesh is never captured.
func TestCaptureAcrossNodes(t *testing.T) {
	for _, mode := range []string{"splice", "copy"} {
		t.Run(mode, func(t *testing.T) {
			a, addrB, server := twoNodes(t, mode, "")
			saw, local, remote := peerOf(a, a.enrolled, server)
			if remote.String() != server {
				t.Errorf("enrolled client's peer is %s, want %s (getpeername4 hides the capture)", remote, server)
			}
			if saw.Addr() != addrB {
				t.Errorf("server saw %s, want node b's smeshd delivering from %s (client was %s)", saw, addrB, local)
			}

			outside := testenv.NewCgroup(t)
			saw, local, remote = peerOf(a, outside, server)
			if remote.String() != server || saw.Port() != local.Port() {
				t.Errorf("process outside the mesh was captured: connected to %s, server saw %s", remote, saw)
			}

			before := a.stats()
			a.client(a.enrolled, "oneway", server, scaledArg(64<<20))
			a.client(a.enrolled, "echo", server, scaledArg(64<<20))
			a.client(a.enrolled, "rr", server, scaledArg(2000))
			a.client(a.enrolled, "serverfirst", server, scaledArg(10000000))
			a.client(a.enrolled, "reset-server", server)
			moved := a.stats().carried() - before.carried()
			// In splice mode the app <-> smeshd hop is spliced: every byte
			// crosses it once (by TCP once an upload outran the tunnel).
			if floor := 3 * uint64(scaled(64<<20)); mode == "splice" && moved < floor {
				t.Errorf("spliced %d bytes on the app <-> smeshd hop, want at least %d", moved, floor)
			}
			if mode == "copy" && moved != 0 {
				t.Errorf("copy mode spliced %d bytes", moved)
			}
		})
	}
}

// TestMapsDrain runs three times the map size of short captured
// connections: capture keeps working and both maps are empty afterwards.
// With SMESH_TEST_SCALE the count is divided too, and may stay below the
// map size: the maps must still drain.
func TestMapsDrain(t *testing.T) {
	const mapSize = 1024
	a, _, server := twoNodes(t, "splice", fmt.Sprintf("map_size = %d", mapSize))
	before := a.stats()
	conns := scaled(3 * mapSize)
	a.client(a.enrolled, "short", server, fmt.Sprint(conns))
	// Each connection sends a command byte and 16 bytes, spliced.
	if moved := a.stats().bytes - before.bytes; moved < uint64(conns)*17 {
		t.Errorf("spliced %d bytes, want at least %d: the hops were not in the sockhash", moved, conns*17)
	}
	if !captured(a, a.enrolled, server) {
		t.Fatalf("capture stopped after %d connections", conns)
	}
	for _, name := range []string{"smesh_sockhash", "smesh_orig_dst"} {
		var n int
		var err error
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			if n, err = entries(a.smeshd.PID(), name); err != nil || n == 0 {
				break
			}
		}
		if err != nil {
			t.Fatal(err)
		}
		if n != 0 {
			t.Errorf("%s holds %d entries after every connection closed", name, n)
		}
	}
}

// TestProxyHopsNotSpliced: with datapath.splice_proxy_hops = false a
// captured connection's hop to smeshd keeps TCP, while a direct same-node
// connection is still spliced.
func TestProxyHopsNotSpliced(t *testing.T) {
	a, _, server := twoNodes(t, "splice", "splice_proxy_hops = false")
	a.server(a.enrolled, "127.0.0.1:9000")
	before := a.stats()
	size := scaled(16000000)
	a.client(a.enrolled, "echo", server, fmt.Sprint(size))
	if moved := a.stats().carried() - before.carried(); moved != 0 {
		t.Errorf("spliced %d bytes of a captured connection", moved)
	}
	a.client(a.enrolled, "echo", "127.0.0.1:9000", fmt.Sprint(size))
	moved := a.stats().carried() - before.carried()
	if floor := 2 * uint64(size); moved < floor {
		t.Errorf("spliced %d bytes of a same-node connection, want at least %d", moved, floor)
	}
}
