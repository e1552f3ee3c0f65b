package e2e

import (
	"fmt"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/smesh-dev/smesh/pkg/datapath"
)

// mapsOf opens the BPF maps a process holds, by name.
func mapsOf(pid int) (map[string]*ebpf.Map, error) { return datapath.OpenMaps(pid) }

func closeAll(maps map[string]*ebpf.Map) {
	for _, m := range maps {
		m.Close()
	}
}

// spliceStats are smeshd's splice counters: bytes and messages spliced, the
// bytes demoted directions sent by TCP, and the demotions.
type spliceStats struct{ bytes, msgs, demotedBytes, demotions, raced uint64 }

// carried counts the bytes of spliced hops: spliced, or sent by TCP once the
// bound demoted their direction (a bulk writer outruns its reader within a
// few MiB, see TestBoundedSplice). A demoted direction's bytes are all
// counted once acknowledged (sk_msg counts what it sees, sock_ops the rest
// from the socket's ACKs), so a transfer is counted in full once it ended.
func (s spliceStats) carried() uint64 { return s.bytes + s.demotedBytes }

// checkSpliced fails t unless the splice counters of one node (where) grew
// from before to after by n bytes that went spliced. Where no direction of
// the transfer can queue splice_queue_limit (bulk false: small, or read as
// fast as written), every byte must be spliced and none demoted: demotions
// there are a bug that turns splicing off (but for a hop that raced its
// establishment, which runs as plain TCP, counted). A bulk transfer may be demoted
// once its reader falls behind: all n bytes, spliced or sent by TCP,
// are counted after.
func checkSpliced(t *testing.T, where string, before, after spliceStats, n uint64, bulk bool) {
	t.Helper()
	spliced, demoted := after.bytes-before.bytes, after.demotedBytes-before.demotedBytes
	switch {
	case bulk && spliced+demoted < n:
		t.Errorf("%s: spliced %d bytes and demoted %d, want at least %d in all", where, spliced, demoted, n)
	case !bulk && after.demotions != before.demotions:
		t.Errorf("%s: %d directions demoted, want none (spliced %d bytes, demoted %d)", where, after.demotions-before.demotions, spliced, demoted)
	case !bulk && demoted != 0 && after.raced == before.raced:
		t.Errorf("%s: spliced %d bytes and demoted %d with no hop raced, want at least %d spliced and none demoted", where, spliced, demoted, n)
	case !bulk && spliced+demoted < n:
		// A hop whose client wrote before the server's end was
		// established (the handshake's last ACK still on its way: it
		// happens among many connections on a busy machine) ran as
		// plain TCP, counted as raced, its bytes as demoted
		// (TestCountersRaced).
		t.Errorf("%s: spliced %d bytes and demoted %d (%d hops raced), want at least %d in all", where, spliced, demoted, after.raced-before.raced, n)
	}
}

// readStats reads smeshd's splice counters, both directions, and its
// demotions.
func readStats(pid int) (spliceStats, error) {
	st, err := datapath.StatsOf(pid)
	if err != nil {
		return spliceStats{}, err
	}
	c, err := datapath.CountersOf(pid)
	if err != nil {
		return spliceStats{}, err
	}
	return spliceStats{
		bytes:        st.Bytes(),
		msgs:         st.Msgs(),
		demotedBytes: st.Demoted(),
		demotions:    c.Demotions,
		raced:        c.Raced,
	}, nil
}

// entries counts the entries of smeshd's map name.
func entries(pid int, name string) (int, error) {
	maps, err := mapsOf(pid)
	if err != nil {
		return 0, err
	}
	defer closeAll(maps)
	m, ok := maps[name]
	if !ok {
		return 0, fmt.Errorf("smeshd (pid %d) holds no %s map", pid, name)
	}
	n := 0
	var k, v []byte
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}
