package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
)

// mapsOf opens the BPF maps a process holds, by name, through its file
// descriptors: tests read a running smeshd's maps without any help from it.
func mapsOf(pid int) (map[string]*ebpf.Map, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	maps := make(map[string]*ebpf.Map)
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil || target != "anon_inode:bpf-map" {
			continue
		}
		info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, e.Name()))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(info), "\n") {
			v, ok := strings.CutPrefix(line, "map_id:")
			if !ok {
				continue
			}
			id, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				return nil, err
			}
			m, err := ebpf.NewMapFromID(ebpf.MapID(id))
			if err != nil {
				return nil, fmt.Errorf("opening map %d: %w", id, err)
			}
			mi, err := m.Info()
			if err != nil {
				return nil, err
			}
			if _, dup := maps[mi.Name]; dup {
				m.Close()
				continue
			}
			maps[mi.Name] = m
		}
	}
	return maps, nil
}

func closeAll(maps map[string]*ebpf.Map) {
	for _, m := range maps {
		m.Close()
	}
}

// spliceStats are smeshd's splice counters: bytes and messages spliced, the
// bytes demoted directions sent by TCP, and the demotions.
type spliceStats struct{ bytes, msgs, demotedBytes, demotions uint64 }

// carried counts the bytes sk_msg handled: spliced, or sent by TCP once the
// bound demoted their direction (a bulk writer outruns its reader within a
// few MiB, see TestBoundedSplice).
func (s spliceStats) carried() uint64 { return s.bytes + s.demotedBytes }

// readStats sums smeshd's per-CPU splice counters, both directions.
func readStats(pid int) (spliceStats, error) {
	maps, err := mapsOf(pid)
	if err != nil {
		return spliceStats{}, err
	}
	defer closeAll(maps)
	m, ok := maps["smesh_stats"]
	if !ok {
		return spliceStats{}, fmt.Errorf("smeshd (pid %d) holds no smesh_stats map", pid)
	}
	var s spliceStats
	// Slots (smesh.h, enum stat_slot): 0 and 1 spliced, 2 and 3 demoted.
	for slot := uint32(0); slot < 4; slot++ {
		var perCPU []struct{ Bytes, Msgs uint64 }
		if err := m.Lookup(slot, &perCPU); err != nil {
			return spliceStats{}, err
		}
		for _, c := range perCPU {
			if slot < 2 {
				s.bytes += c.Bytes
				s.msgs += c.Msgs
			} else {
				s.demotedBytes += c.Bytes
			}
		}
	}
	counters, ok := maps["smesh_counters"]
	if !ok {
		return spliceStats{}, fmt.Errorf("smeshd (pid %d) holds no smesh_counters map", pid)
	}
	var perCPU []uint64
	// enum counter_slot: 2 is COUNTER_DEMOTIONS.
	if err := counters.Lookup(uint32(2), &perCPU); err != nil {
		return spliceStats{}, err
	}
	for _, v := range perCPU {
		s.demotions += v
	}
	return s, nil
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
