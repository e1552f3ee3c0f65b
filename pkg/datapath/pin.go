package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// With [capture] on_failure = "closed" the capture outlives smeshd: maps and
// links are pinned in a directory on bpffs, so a dead smeshd leaves connect4
// sending captured connections to a port nobody listens on (they are
// refused, never sent uncaptured), and spliced connections keep their
// sockhash. A restarted smeshd adopts the pins: it reuses the maps and
// swaps its new programs into the pinned links (bpf_link update, atomic).
//
// Only one smeshd may own a pin directory: it holds an exclusive flock on
// it while it runs.
//
// A start that fails leaves nothing pinned that it made: until Commit, the
// directory's entries at open time are all that Close keeps (an earlier
// run's capture, adopted or not, stays).

// linkPrefix starts the names of pinned links; maps keep their own names.
// strictPinPrefix starts those of the strict attachments (strict.go), which
// SetStrict keeps, not SetCapture.
const (
	linkPrefix      = "link_"
	strictPinPrefix = linkPrefix + "strict_"
)

// pins is an open, locked pin directory.
type pins struct {
	dir  string
	lock *os.File
	// before holds the names in dir when it was opened, and madeDir says
	// whether opening created dir; nil before once committed.
	before  map[string]bool
	madeDir bool
}

// openPins creates and locks dir, which must be on bpffs.
func openPins(dir string) (*pins, error) {
	_, statErr := os.Stat(dir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating pin directory %s: %w", dir, err)
	}
	p := &pins{dir: dir, madeDir: errors.Is(statErr, os.ErrNotExist)}
	if err := checkBPFFS(dir); err != nil {
		p.removeDirIfMade()
		return nil, err
	}
	f, err := os.Open(dir)
	if err != nil {
		p.removeDirIfMade()
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("pin directory %s is in use by another smeshd", dir)
		}
		return nil, fmt.Errorf("locking pin directory %s: %w", dir, err)
	}
	p.lock = f
	if err := p.readBefore(); err != nil {
		p.close()
		return nil, err
	}
	return p, nil
}

// adoptPins takes over dir from a predecessor that handed over its locked
// descriptor (lock): the flock belongs to the open file description, so
// holding the descriptor holds the lock, and locking again would find it
// taken ("in use by another smeshd"). The caller's lock is closed on error.
func adoptPins(dir string, lock *os.File) (*pins, error) {
	p := &pins{dir: dir, lock: lock}
	var dirSt, lockSt unix.Stat_t
	if err := unix.Stat(dir, &dirSt); err != nil {
		p.close()
		return nil, fmt.Errorf("pin directory %s: %w", dir, err)
	}
	if err := unix.Fstat(int(lock.Fd()), &lockSt); err != nil {
		p.close()
		return nil, fmt.Errorf("the handed-over lock of pin directory %s: %w", dir, err)
	}
	if dirSt.Dev != lockSt.Dev || dirSt.Ino != lockSt.Ino {
		p.close()
		return nil, fmt.Errorf("the running smeshd's pin directory is not %s (is capture.pin_dir the same for both?): "+
			"stop the running smeshd, then start this one", dir)
	}
	if err := checkBPFFS(dir); err != nil {
		p.close()
		return nil, err
	}
	// The description holds the flock already, so this succeeds; should
	// the descriptor be another opening of the directory, it takes the lock
	// now or finds it held by someone else.
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		p.close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("pin directory %s is in use by another smeshd than the one handing over", dir)
		}
		return nil, fmt.Errorf("locking pin directory %s: %w", dir, err)
	}
	if err := p.readBefore(); err != nil {
		p.close()
		return nil, err
	}
	return p, nil
}

// readBefore records what dir holds before this run pins anything.
func (p *pins) readBefore() error {
	ents, err := os.ReadDir(p.dir)
	if err != nil {
		return err
	}
	p.before = make(map[string]bool, len(ents))
	for _, e := range ents {
		p.before[e.Name()] = true
	}
	return nil
}

func (p *pins) removeDirIfMade() {
	if p.madeDir {
		os.Remove(p.dir) // only if empty
	}
}

// commit makes what this run pinned permanent: Close leaves it.
func (p *pins) commit() {
	if p != nil {
		p.before = nil
	}
}

// rollback removes what this run pinned, unless it committed: links
// (detaching them once no descriptor holds them) and maps, and the directory
// if this run created it.
func (p *pins) rollback() error {
	if p == nil || p.before == nil {
		return nil
	}
	ents, err := os.ReadDir(p.dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		if p.before[e.Name()] {
			continue
		}
		path := filepath.Join(p.dir, e.Name())
		if strings.HasPrefix(e.Name(), linkPrefix) {
			errs = append(errs, unpinLink(path))
		} else {
			errs = append(errs, os.Remove(path))
		}
	}
	p.removeDirIfMade()
	return errors.Join(errs...)
}

func checkBPFFS(dir string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("pin directory %s: %w", dir, err)
	}
	if st.Type != unix.BPF_FS_MAGIC {
		return fmt.Errorf("pin directory %s is not on bpffs (capture.on_failure = \"closed\" pins the capture there; mount one with: mount -t bpf bpf %s)",
			dir, filepath.Dir(dir))
	}
	return nil
}

func (p *pins) close() {
	if p != nil && p.lock != nil {
		p.lock.Close() // releases the flock
		p.lock = nil
	}
}

// linkPath names the pin of one attachment of one cgroup. The name carries
// the cgroup's id, not its path: bpffs refuses names with a dot (every
// systemd unit's cgroup has one), and a cgroup removed and made again under
// the same path is another cgroup, whose old pin is stale.
func (p *pins) linkPath(typ ebpf.AttachType, cgroupID uint64) string {
	return filepath.Join(p.dir, fmt.Sprintf("%s%d_%d", linkPrefix, typ, cgroupID))
}

// attach returns the pinned link at path updated to prog (adopted: an
// earlier run's, which a failed change must leave pinned; *prev is set to
// the program it ran), or a new link attached and pinned there.
func (p *pins) attach(path, cgroup string, typ ebpf.AttachType, prog *ebpf.Program, prev *ebpf.ProgramID) (l link.Link, adopted bool, err error) {
	l, err = link.LoadPinnedLink(path, nil)
	if err == nil {
		if info, err := l.Info(); err == nil {
			*prev = info.Program
		}
		if err := l.Update(prog); err != nil {
			l.Close()
			return nil, false, fmt.Errorf("updating pinned %s link of %s: %w", typ, cgroup, err)
		}
		return l, true, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, false, fmt.Errorf("loading pinned link %s: %w", path, err)
	}
	l, err = link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: typ, Program: prog})
	if err != nil {
		return nil, false, fmt.Errorf("attaching %s to %s: %w", typ, cgroup, err)
	}
	if err := l.Pin(path); err != nil {
		l.Close()
		return nil, false, fmt.Errorf("pinning %s link of %s: %w", typ, cgroup, err)
	}
	return l, false, nil
}

// pruneLinks detaches pinned links that are not in keep (strict ones
// aside: pruneStrictLinks): cgroups no longer
// enrolled, or smeshd's own cgroup of an earlier run.
func (p *pins) pruneLinks(keep map[string]bool) error {
	return p.prune(keep, func(name string) bool {
		return strings.HasPrefix(name, linkPrefix) && !strings.HasPrefix(name, strictPinPrefix)
	})
}

// prune detaches the pinned links whose names mine says are its to manage
// and that are not in keep.
func (p *pins) prune(keep map[string]bool, mine func(name string) bool) error {
	ents, err := os.ReadDir(p.dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		path := filepath.Join(p.dir, e.Name())
		if mine(e.Name()) && !keep[path] {
			errs = append(errs, unpinLink(path))
		}
	}
	return errors.Join(errs...)
}

// strictLinkPath names the pin of a strict attachment: link_strict_ingress_ID
// or link_strict_sockops_ID.
func (p *pins) strictLinkPath(typ ebpf.AttachType, cgroupID uint64) string {
	kind := "sockops"
	if typ == ebpf.AttachCGroupInetIngress {
		kind = "ingress"
	}
	return filepath.Join(p.dir, fmt.Sprintf("%s%s_%d", strictPinPrefix, kind, cgroupID))
}

// pruneStrictLinks detaches the pinned strict links not in keep.
func (p *pins) pruneStrictLinks(keep map[string]bool) error {
	return p.prune(keep, func(name string) bool { return strings.HasPrefix(name, strictPinPrefix) })
}

func unpinLink(path string) error {
	l, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		// A link whose cgroup is gone can no longer be loaded: its pin is
		// all that is left of it.
		return os.Remove(path)
	}
	defer l.Close()
	if err := l.Unpin(); err != nil {
		return fmt.Errorf("unpinning %s: %w", path, err)
	}
	return nil
}

// RemovePins removes a pinned capture: its links (detaching them) and maps.
// It fails while a smeshd owns the directory. A missing directory is fine.
func RemovePins(dir string) (removed int, err error) {
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	p, err := openPins(dir)
	if err != nil {
		return 0, err
	}
	defer p.close()
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var errs []error
	for _, e := range ents {
		path := filepath.Join(dir, e.Name())
		if strings.HasPrefix(e.Name(), linkPrefix) {
			errs = append(errs, unpinLink(path))
		} else {
			errs = append(errs, os.Remove(path))
		}
		removed++
	}
	if err := errors.Join(errs...); err != nil {
		return removed, err
	}
	return removed, os.Remove(dir)
}
