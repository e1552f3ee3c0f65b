package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
)

// spliceCount is what a smeshd's sk_msg program counted: bytes spliced and
// bytes that demoted directions sent by TCP (bpf/include/smesh.h, enum
// stat_slot: slots 0 and 1 spliced, 2 and 3 demoted).
type spliceCount struct{ spliced, demoted uint64 }

// readSpliceCount reads the counters from the smesh_stats map smeshd (pid)
// holds, found through its file descriptors: the bench asks smeshd nothing.
func readSpliceCount(pid int) (spliceCount, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return spliceCount{}, err
	}
	for _, e := range ents {
		if target, _ := os.Readlink(filepath.Join(dir, e.Name())); target != "anon_inode:bpf-map" {
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
				continue
			}
			m, err := ebpf.NewMapFromID(ebpf.MapID(id))
			if err != nil {
				continue
			}
			c, ok, err := countFrom(m)
			m.Close()
			if ok {
				return c, err
			}
		}
	}
	return spliceCount{}, fmt.Errorf("smeshd (pid %d) holds no smesh_stats map", pid)
}

// countFrom sums m if it is smesh_stats (ok reports whether it was).
func countFrom(m *ebpf.Map) (c spliceCount, ok bool, err error) {
	if info, err := m.Info(); err != nil || info.Name != "smesh_stats" {
		return c, false, nil
	}
	for slot := uint32(0); slot < 4; slot++ {
		var perCPU []struct{ Bytes, Msgs uint64 }
		if err := m.Lookup(slot, &perCPU); err != nil {
			return c, true, err
		}
		for _, v := range perCPU {
			if slot < 2 {
				c.spliced += v.Bytes
			} else {
				c.demoted += v.Bytes
			}
		}
	}
	return c, true, nil
}
