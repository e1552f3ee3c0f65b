package datapath

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
)

// OpenMaps opens the BPF maps process pid holds, by name, through its file
// descriptors: tests, the bench and the demo read a running smeshd's maps
// without any help from it. The caller closes them. Names are the kernel's
// (at most 15 characters).
func OpenMaps(pid int) (map[string]*ebpf.Map, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	maps := make(map[string]*ebpf.Map)
	for _, e := range ents {
		if target, _ := os.Readlink(filepath.Join(dir, e.Name())); target != "anon_inode:bpf-map" {
			continue
		}
		info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		for line := range strings.Lines(string(info)) {
			v, ok := strings.CutPrefix(line, "map_id:")
			if !ok {
				continue
			}
			id, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				return nil, fmt.Errorf("%s/%s: %w", dir, e.Name(), err)
			}
			m, err := ebpf.NewMapFromID(ebpf.MapID(id))
			if err != nil {
				return nil, fmt.Errorf("opening map %d: %w", id, err)
			}
			mi, err := m.Info()
			if _, dup := maps[mi.Name]; err != nil || dup {
				m.Close()
				continue
			}
			maps[mi.Name] = m
		}
	}
	return maps, nil
}

// StatsOf and CountersOf read the splice and event counters of process
// pid's maps (see Datapath.Stats and Datapath.Counters).
func StatsOf(pid int) (Stats, error) { return readFrom(pid, "smesh_stats", statsFrom) }

func CountersOf(pid int) (Counters, error) { return readFrom(pid, "smesh_counters", countersFrom) }

func readFrom[T any](pid int, name string, read func(*ebpf.Map) (T, error)) (T, error) {
	var zero T
	maps, err := OpenMaps(pid)
	if err != nil {
		return zero, err
	}
	defer func() {
		for _, m := range maps {
			m.Close()
		}
	}()
	m, ok := maps[name]
	if !ok {
		return zero, fmt.Errorf("process %d holds no %s map", pid, name)
	}
	return read(m)
}
