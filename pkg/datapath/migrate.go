package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
)

// An upgrade whose map layout changed (docs/restart.md 3.6): compatibility
// is decided per map. A map a predecessor handed over (or, in closed mode,
// pinned) whose layout is not this build's (datapath.map_size changed its
// max_entries, or a new build changed a key or value) is made anew by this
// load; every other map is adopted as before. The old map is kept (remade)
// until Commit:
//   - Its entries are copied into the new one before any link is switched,
//     where key and value kept their layout (only the size changed). That
//     refills the maps userspace fills (addresses, namespaces, capture
//     rules, services) the way adoption would have kept them (the daemon
//     rewrites them before SetCapture anyway), keeps connect4's
//     affinities, and carries counters over so metrics do not go back.
//   - smesh_orig_dst (written by sock_ops at a captured connection's
//     establishment, read by getsockopt's SO_ORIGINAL_DST) is copied
//     again once every sock_ops link runs the new program and before any
//     getsockopt link does (SetCapture, afterSockops): an entry the old
//     sock_ops wrote after the first copy is in the old map by then, and
//     the new sock_ops writes only the new one. So every connection
//     captured before the switch and accepted after it is answered.
//   - Not copied: the sockhash (it holds sockets), smesh_dirs (the splice
//     decision of the sockets in the old sockhash: their sk_msg program,
//     held by their psocks, keeps the old maps; a copy would let both
//     sides of the UNDECIDED swap win) and smesh_sk_state (socket storage,
//     which has no keys to walk). Spliced connections stay in the old
//     sockhash with the old sk_msg program and old smesh_dirs, which live
//     as long as one of their sockets does; the new sock_ops finds no
//     smesh_dirs entry for them and leaves them spliced (release() asks
//     again). A connection whose two ends were established on either side
//     of the switch is in neither map with its peer: plain TCP.
//   - Per-CPU arrays (counters) get what the old programs counted between
//     the copy and the switch added once every link switched.
//   - In closed mode the new map is pinned at Commit under a temporary
//     name and renamed over the old pin (bpffs rename, under the pin
//     directory's lock), so that a start that fails leaves the old pins,
//     which the predecessor (serving on) uses.
// A start that fails before Commit gives the predecessor its programs
// back (giveBack) and copies smesh_orig_dst back around the sock_ops
// switch the same way.

// noCopy are the maps whose entries are not copied into a remade map, and
// why (see above).
var noCopy = map[string]string{
	"smesh_sockhash": "holds sockets: spliced connections keep the old sockhash",
	"smesh_dirs":     "the old sockhash's sockets keep the old map (their sk_msg program's)",
	"smesh_sk_state": "socket storage: no keys to copy",
	"smesh_src_sk":   "socket storage: no keys to copy",
}

// remade is a map made anew because the predecessor's (or the pinned one)
// had another layout.
type remade struct {
	old    *ebpf.Map
	reason error
	// pending: the entries are to be copied after the sock_ops switch
	// (orig_dst; afterSockops).
	pending bool
	// snapshot holds the old per-CPU array's values at the copy
	// (counters).
	snapshot map[string][][]byte
}

const origDstName = "smesh_orig_dst"

// sockopsWritten are the maps sock_ops writes at a captured connection's
// establishment and getsockopt reads: smesh_orig_dst and, beside it with
// the same key and life, smesh_src_ids (the source identity,
// SMESH_SO_SRC_ID). A remade one is copied after the sock_ops switch
// (afterSockops) and back on a failed start (copyBack).
var sockopsWritten = []string{origDstName, "smesh_src_ids"}

// remake records that the map name is made anew, old being the
// predecessor's (owned from here on).
func (d *Datapath) remake(name string, old *ebpf.Map, reason error) {
	if d.remade == nil {
		d.remade = make(map[string]*remade)
	}
	if r := d.remade[name]; r != nil {
		old.Close()
		return
	}
	d.remade[name] = &remade{old: old, reason: reason}
}

// checkPinned finds the maps pinned in the pin directory whose layout
// differs from spec's: they are loaded anew (not pinned until Commit) and
// remade. skip are the maps another object's load provides.
func (d *Datapath) checkPinned(spec *ebpf.CollectionSpec, skip map[string]*ebpf.Map) error {
	for _, name := range specMapNames(spec) {
		if skip[name] != nil {
			continue
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(d.pins.dir, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("loading pinned map %s: %w", name, err)
		}
		if err := spec.Maps[name].Compatible(m); err != nil {
			spec.Maps[name].Pinning = ebpf.PinNone
			d.remake(name, m, err)
			continue
		}
		m.Close()
	}
	return nil
}

// copyable says whether old's entries can go into m as they are.
func copyable(name string, old, m *ebpf.Map) (bool, string) {
	if why, ok := noCopy[name]; ok {
		return false, why
	}
	if old.Type() != m.Type() || old.KeySize() != m.KeySize() || old.ValueSize() != m.ValueSize() {
		return false, fmt.Sprintf("layout changed (%s %d/%d -> %s %d/%d bytes of key/value): the new map starts empty",
			old.Type(), old.KeySize(), old.ValueSize(), m.Type(), m.KeySize(), m.ValueSize())
	}
	switch m.Type() {
	case ebpf.Hash, ebpf.LRUHash, ebpf.Array, ebpf.LPMTrie, ebpf.PerCPUArray, ebpf.PerCPUHash, ebpf.LRUCPUHash:
		return true, ""
	}
	return false, fmt.Sprintf("a %s map: nothing to copy", m.Type())
}

// migrateLoad copies the remade maps' entries, after the load and before
// any link is switched, and logs what was remade.
func (d *Datapath) migrateLoad() error {
	maps := d.maps()
	for _, name := range slices.Sorted(mapsKeys(d.remade)) {
		r, m := d.remade[name], maps[name]
		if m == nil {
			continue
		}
		ev := d.log.Info().Str("map", name).Uint32("old_max_entries", r.old.MaxEntries()).
			Uint32("max_entries", m.MaxEntries()).AnErr("reason", r.reason)
		ok, why := copyable(name, r.old, m)
		if !ok {
			ev.Str("not_copied", why).Msg("map made anew: its layout changed")
			continue
		}
		if slices.Contains(sockopsWritten, name) {
			// Copied once, after the sock_ops switch (afterSockops):
			// until getsockopt switches, nothing reads the new map.
			r.pending = true
			ev.Msg("map made anew: its layout changed; entries copied once sock_ops switched")
			continue
		}
		n, dropped, err := copyEntries(r.old, m, ebpf.UpdateAny)
		if err != nil {
			return fmt.Errorf("copying map %s into its new layout: %w", name, err)
		}
		if m.Type() == ebpf.PerCPUArray {
			if r.snapshot, err = perCPUValues(r.old); err != nil {
				return err
			}
		}
		ev.Int("copied", n).Int("dropped", dropped).Msg("map made anew: its layout changed; entries copied")
		if dropped > 0 {
			d.log.Warn().Str("map", name).Int("dropped", dropped).Msg("the new map is too small for all of the old one's entries")
		}
	}
	return nil
}

func mapsKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// copyEntries puts old's entries into m with flags. dropped counts those m
// refused (full,
// or an array index past its end).
func copyEntries(old, m *ebpf.Map, flags ebpf.MapUpdateFlags) (n, dropped int, err error) {
	perCPU := old.Type() == ebpf.PerCPUArray || old.Type() == ebpf.PerCPUHash || old.Type() == ebpf.LRUCPUHash
	var key []byte
	var val []byte
	var vals [][]byte
	it := old.Iterate()
	for {
		var more bool
		if perCPU {
			more = it.Next(&key, &vals)
		} else {
			more = it.Next(&key, &val)
		}
		if !more {
			break
		}
		if perCPU {
			err = m.Update(key, vals, flags)
		} else {
			err = m.Update(key, val, flags)
		}
		switch {
		case err == nil:
			n++
		case errors.Is(err, ebpf.ErrKeyExist):
			// UpdateNoExist: the new programs wrote it meanwhile.
		default:
			dropped++
		}
	}
	if err := it.Err(); err != nil {
		return n, dropped, fmt.Errorf("walking the old map: %w", err)
	}
	return n, dropped, nil
}

func perCPUValues(m *ebpf.Map) (map[string][][]byte, error) {
	out := make(map[string][][]byte)
	var key []byte
	var vals [][]byte
	it := m.Iterate()
	for it.Next(&key, &vals) {
		out[string(key)] = slices.Clone(vals)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("reading counters: %w", err)
	}
	return out, nil
}

// afterSockops runs once every sock_ops link runs the new program and
// before any getsockopt link does: smesh_orig_dst's entries, which the old
// sock_ops wrote, go into the new map (never over an entry the new
// sock_ops wrote since the switch), once no old sock_ops program still
// runs. It copies once, here, and not also at load: a first copy would
// leave entries of sockets that closed before the switch in the new map,
// and telling them from a connection that reused their 4-tuple after the
// switch (the same key, and the same value when it goes to the same
// destination) is impossible: deleting them cut such a connection
// (SO_ORIGINAL_DST: ENOENT, seen in e2e TestUpgradeUnderLoad at about one
// in four remakes). Left over: entries of sockets that close between the
// switch and the copy (the new sock_ops deletes them from the new map
// only, the copy then brings them back): a few per upgrade, harmless (a
// captured connection with that 4-tuple overwrites its entry at
// establishment), and they only take room.
func (d *Datapath) afterSockops() {
	waited := false
	maps := d.maps()
	for _, name := range sockopsWritten {
		r := d.remade[name]
		if r == nil || !r.pending || maps[name] == nil {
			continue
		}
		r.pending = false
		if !waited {
			waited = true
			if err := waitForPrograms(); err != nil {
				d.log.Error().Err(err).Msg("waiting for the old sock_ops programs to finish before copying " + name)
			}
		}
		n, dropped, err := copyEntries(r.old, maps[name], ebpf.UpdateNoExist)
		if err != nil {
			d.log.Error().Err(err).Str("map", name).Msg("copying after the sock_ops switch")
			continue
		}
		d.log.Info().Str("map", name).Int("copied", n).Int("dropped", dropped).
			Msg(name + ": entries the old sock_ops wrote until the switch copied into the new map")
	}
}

// waitForPrograms returns once every BPF program that was running when it
// was called has finished, so that none still runs the program a link had
// before a BPF_LINK_UPDATE: the kernel waits for an RCU grace period
// (synchronize_rcu) after every update of a map-in-map, for this very use
// (kernel/bpf/syscall.c, maybe_wait_bpf_programs, since 4.20).
func waitForPrograms() error {
	inner := &ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1}
	outer, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.ArrayOfMaps, KeySize: 4, ValueSize: 4, MaxEntries: 1, InnerMap: inner})
	if err != nil {
		return err
	}
	defer outer.Close()
	m, err := ebpf.NewMap(inner)
	if err != nil {
		return err
	}
	defer m.Close()
	return outer.Update(uint32(0), m, ebpf.UpdateAny)
}

// afterSwitch runs once every link runs the new programs: what the old
// programs counted since the first copy is added to the new counters.
func (d *Datapath) afterSwitch() {
	maps := d.maps()
	for name, r := range d.remade {
		m := maps[name]
		if r.snapshot == nil || m == nil {
			continue
		}
		now, err := perCPUValues(r.old)
		if err != nil {
			d.log.Error().Err(err).Str("map", name).Msg("reading the old counters after the switch")
			continue
		}
		for k, vals := range now {
			var cur [][]byte
			if err := m.Lookup([]byte(k), &cur); err != nil {
				continue
			}
			for cpu := range min(len(cur), len(vals)) {
				var then []byte
				if cpu < len(r.snapshot[k]) {
					then = r.snapshot[k][cpu]
				}
				addDelta(cur[cpu], vals[cpu], then)
			}
			if err := m.Update([]byte(k), cur, ebpf.UpdateExist); err != nil {
				d.log.Error().Err(err).Str("map", name).Msg("carrying the old counters over")
			}
		}
		r.snapshot = nil
	}
}

// addDelta adds now-then to cur, word by word: the per-CPU arrays smesh
// keeps (smesh_counters, smesh_stats) hold 64-bit counters only. Racing
// increments by the new programs between the read and the write are lost
// (this runs once, microseconds after the switch).
func addDelta(cur, now, then []byte) {
	for i := 0; i+8 <= len(cur) && i+8 <= len(now); i += 8 {
		var t uint64
		if i+8 <= len(then) {
			t = binary.NativeEndian.Uint64(then[i:])
		}
		binary.NativeEndian.PutUint64(cur[i:], binary.NativeEndian.Uint64(cur[i:])+binary.NativeEndian.Uint64(now[i:])-t)
	}
}

// copyBack, on a failed start, puts smesh_orig_dst's entries the new
// sock_ops wrote back into the predecessor's map (never over one of its
// own), so that the predecessor, serving on, answers SO_ORIGINAL_DST for
// the connections established meanwhile.
func (d *Datapath) copyBack() {
	waited := false
	maps := d.maps()
	for _, name := range sockopsWritten {
		r := d.remade[name]
		if r == nil || maps[name] == nil {
			continue
		}
		if !waited {
			waited = true
			if err := waitForPrograms(); err != nil {
				d.log.Error().Err(err).Msg("waiting for running sock_ops programs before copying " + name + " back")
			}
		}
		n, _, err := copyEntries(maps[name], r.old, ebpf.UpdateNoExist)
		if err != nil {
			d.log.Error().Err(err).Str("map", name).Msg("copying back to the predecessor's map")
			continue
		}
		d.log.Info().Str("map", name).Int("copied", n).Msg(name + ": entries of the failed start copied back to the predecessor's map")
	}
}

// commitRemade, in closed mode, pins the remade maps over the old pins:
// under a temporary name first, then renamed (atomic on bpffs), so the pin
// directory names a map at every moment. Then the old maps are let go.
func (d *Datapath) commitRemade() {
	if d.pins != nil {
		maps := d.maps()
		for _, name := range slices.Sorted(mapsKeys(d.remade)) {
			m := maps[name]
			if m == nil {
				continue
			}
			final := filepath.Join(d.pins.dir, name)
			tmp := filepath.Join(d.pins.dir, "tmp_"+strings.TrimPrefix(name, "smesh_"))
			os.Remove(tmp)
			err := m.Pin(tmp)
			if err == nil {
				if err = os.Rename(tmp, final); err != nil {
					os.Remove(tmp)
				}
			}
			if err != nil {
				// The next start finds the old layout pinned and
				// makes the map anew again.
				d.log.Error().Err(err).Str("map", name).Msg("pinning the new map over the old one")
				continue
			}
			d.log.Info().Str("map", name).Str("pin", final).Msg("the new map replaced the old one's pin")
		}
	}
	d.closeRemade()
}

func (d *Datapath) closeRemade() {
	for _, r := range d.remade {
		r.old.Close()
	}
	d.remade = nil
}

// remakeOther records the handed-over maps of another layout (other) as
// remade; in closed mode it checks the pins instead, which are what the
// load would adopt (the handed-over maps are the pinned ones), and loads
// the maps of another layout unpinned. skip are maps another object's load
// provides.
func (d *Datapath) remakeOther(spec *ebpf.CollectionSpec, other, skip map[string]*ebpf.Map) error {
	if d.pins != nil {
		closeMaps(other)
		return d.checkPinned(spec, skip)
	}
	for name, m := range other {
		d.remake(name, m, spec.Maps[name].Compatible(m))
	}
	return nil
}

// remadeAny says whether one of the maps names was made anew (and is not
// yet committed).
func (d *Datapath) remadeAny(names ...string) bool {
	for _, name := range names {
		if d.remade[name] != nil {
			return true
		}
	}
	return false
}
