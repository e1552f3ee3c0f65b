package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// handshakes is how many TLS handshakes a node's smeshd completed as the
// tunnel's server.
func handshakes(t *testing.T, n *node) float64 {
	t.Helper()
	_, text := n.admin("/metrics")
	var total float64
	for _, resumed := range []string{"true", "false"} {
		total += testenv.Metric(t, text, "smesh_tls_handshakes_total", map[string]string{"role": "server", "result": "ok", "resumed": resumed})
	}
	return total
}

// TestTunnelShortBesideBulk: 2,000 short connections between two nodes,
// each one's bytes checked, while one bulk transfer runs between the same
// two nodes: neither starves the other, and the short connections ride TLS
// connections the tunnel keeps warm instead of a handshake each. The bulk
// transfer is under way before the first short connection starts and ends
// only once the last one has ended, then its bytes are checked too. The data
// path is auto's: a bulk upload into the tunnel on a kernel that cannot
// bound spliced queues (Linux 6.1) would only show the danger that makes
// auto copy there. Under emulation (make kernel-test) counts are scaled
// down.
func TestTunnelShortBesideBulk(t *testing.T) {
	a, b, _, addrB := meshPair(t, "auto", "", "")
	addr := netip.AddrPortFrom(addrB, 9000).String()
	b.server(b.enrolled, addr)
	before := handshakes(t, b)
	bulk := testenv.StartHelper(t, a.enrolled, a.ns.Name, "client", "bulk", addr)
	if line, err := bulk.ReadLine(10 * time.Second); err != nil || line != "started" {
		t.Fatalf("bulk transfer: %q %v %s", line, err, bulk.Stderr())
	}
	const workers = 4
	each := max(scaled(500), 20)
	shorts := make([]*testenv.Helper, workers)
	for i := range shorts {
		shorts[i] = testenv.StartHelper(t, a.enrolled, a.ns.Name, "client", "short", addr, fmt.Sprint(each))
	}
	for i, h := range shorts {
		if err := h.Wait(); err != nil {
			t.Fatalf("short connections %d: %v\n%s", i, err, h.Stderr())
		}
	}
	select {
	case <-bulk.Exited():
		t.Fatalf("the bulk transfer ended before the short connections did: %v\n%s", bulk.Wait(), bulk.Stderr())
	default:
	}
	if err := bulk.Send("stop"); err != nil {
		t.Fatal(err)
	}
	if err := bulk.Wait(); err != nil {
		t.Fatalf("bulk transfer beside the short connections: %v\n%s", err, bulk.Stderr())
	}
	var sent int64
	for _, line := range strings.Split(bulk.Stdout(), "\n") {
		fmt.Sscanf(line, "sent %d", &sent)
	}
	t.Logf("the bulk transfer sent %d MiB", sent>>20)
	if n := handshakes(t, b) - before; n > 4*workers+4 {
		t.Errorf("%v TLS handshakes for %d short connections from %d clients: the tunnel did not keep its connections warm", n, workers*each, workers)
	}
}

// TestTunnelPeerRestart: the receiving node's smeshd restarts while a
// connection crosses the tunnel and others idle in the sending node's pool.
// Stopped with SIGTERM it drains the crossing connection; killed, that
// connection is reset. Either way every connection opened afterwards gets
// through: the pooled TLS connections to the old smeshd are not used.
func TestTunnelPeerRestart(t *testing.T) {
	for _, kill := range []bool{false, true} {
		t.Run(fmt.Sprintf("kill=%v", kill), func(t *testing.T) {
			a, b, _, addrB := meshPair(t, "splice", "", "")
			addr := netip.AddrPortFrom(addrB, 9000).String()
			b.server(b.enrolled, addr)
			// Warm connections in a's pool.
			a.client(a.enrolled, "concurrent", addr, "10000", fmt.Sprint(concurrentConns()))
			long := testenv.StartHelper(t, a.enrolled, a.ns.Name, "client", "paced", addr, "100")
			if line, err := long.ReadLine(5 * time.Second); err != nil || line != "connected" {
				t.Fatalf("long-lived client: %q %v %s", line, err, long.Stderr())
			}
			time.Sleep(100 * time.Millisecond)
			if kill {
				b.smeshd.Stop()
			} else {
				b.stop()
			}
			err := long.Wait()
			if kill && err == nil {
				t.Error("a connection crossing the tunnel when the peer's smeshd was killed ended cleanly")
			}
			if !kill && err != nil {
				t.Errorf("a connection crossing the tunnel while the peer's smeshd drained: %v\n%s", err, long.Stderr())
			}
			b.start("splice", "")
			a.client(a.enrolled, "short", addr, fmt.Sprint(max(scaled(200), 20)))
			a.client(a.enrolled, "concurrent", addr, scaledArg(100000), fmt.Sprint(concurrentConns()))
		})
	}
}

// TestTunnelRevokedPooled: a node dropped from the receiving node's
// allow_identities by a reload gets no connection delivered, pooled TLS
// connection or not; put back, it does again.
func TestTunnelRevokedPooled(t *testing.T) {
	a, b, _, addrB := meshPair(t, "splice", "", "")
	addr := netip.AddrPortFrom(addrB, 9000).String()
	b.server(b.enrolled, addr)
	a.client(a.enrolled, "concurrent", addr, "10000", fmt.Sprint(concurrentConns()))
	running := b.confPath
	allow := func(ids ...string) string {
		list := ""
		for i, id := range ids {
			if i > 0 {
				list += ", "
			}
			list += fmt.Sprintf("%q", id)
		}
		path := b.writeConfig("splice", b.tlsConf("allow_identities = ["+list+"]"))
		b.confPath = running
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return string(data)
	}
	b.reload(allow(b.id()))
	// The captured connection is accepted on a's node and then reset: the
	// tunnel delivers nothing.
	a.client(a.enrolled, "idle", addr)
	b.reload(allow(b.id(), a.id()))
	a.client(a.enrolled, "short", addr, "50")
}
