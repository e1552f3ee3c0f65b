package datapath

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Names of the kernel objects a running smeshd hands to its successor
// (docs/restart.md, 3.1): "map/NAME" for a map (NAME: its name in the BPF
// objects, e.g. "map/smesh_sockhash"), "link/TYPE/CGROUPID" for a cgroup
// attachment (TYPE: the attach type's name as ebpf.AttachType.String
// gives it, CGROUPID: the cgroup's id), and "lock" for the pin directory's
// locked file (on_failure = "closed").
const (
	mapHandoverPrefix  = "map/"
	linkHandoverPrefix = "link/"
	lockName           = "lock"
)

// mapHandoverName names a map in a hand-over.
func mapHandoverName(name string) string { return mapHandoverPrefix + name }

// linkHandoverName names a cgroup attachment in a hand-over.
func linkHandoverName(typ ebpf.AttachType, cgroupID uint64) string {
	return linkHandoverPrefix + typ.String() + "/" + strconv.FormatUint(cgroupID, 10)
}

// Handover returns a duplicate of every map, cgroup attachment and, when the
// capture is pinned, of the pin directory's lock, by name, for a successor
// (Options.Adopt). The caller closes them once sent. This Datapath goes on
// working until Release.
func (d *Datapath) Handover() (_ map[string]*os.File, err error) {
	if d.closed {
		return nil, errors.New("handing the data path over: it is closed")
	}
	out := make(map[string]*os.File)
	defer func() {
		if err != nil {
			for _, f := range out {
				f.Close()
			}
		}
	}()
	maps := d.maps()
	for _, name := range d.mapNames {
		m := maps[name]
		if m == nil {
			// The objects' Go bindings lack a map the ELF declares:
			// handing over the others would leave the successor with a
			// fresh, empty one. bpf2go makes the bindings from the ELF.
			return nil, fmt.Errorf("handing the data path over: map %s of the BPF objects has no Go binding (run go generate ./bpf/...)", name)
		}
		if out[mapHandoverName(name)], err = dupFile(m.FD(), mapHandoverName(name)); err != nil {
			return nil, err
		}
	}
	for a, l := range d.links {
		name := linkHandoverName(a.typ, a.id)
		fl, ok := l.(interface{ FD() int })
		if !ok {
			// A program attached without bpf_link (kernels before 5.7)
			// has no descriptor that keeps it attached.
			return nil, fmt.Errorf("handing the data path over: %s of %s is not a bpf_link", a.typ, a.cgroup)
		}
		if out[name], err = dupFile(fl.FD(), name); err != nil {
			return nil, err
		}
	}
	if err := d.handoverStrict(out); err != nil {
		return nil, err
	}
	if d.pins != nil {
		if out[lockName], err = dupFile(int(d.pins.lock.Fd()), lockName); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// dupFile duplicates fd (close-on-exec) as a file named name.
func dupFile(fd int, name string) (*os.File, error) {
	nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("duplicating %s: %w", name, err)
	}
	return os.NewFile(uintptr(nfd), name), nil
}

// takeFD takes the object named name out of adopt and returns a descriptor
// of it that the caller owns (the file is closed); -1 when there is none.
func takeFD(adopt map[string]*os.File, name string) (int, error) {
	f := adopt[name]
	if f == nil {
		return -1, nil
	}
	delete(adopt, name)
	defer f.Close()
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("taking over %s: %w", name, err)
	}
	return fd, nil
}

// takeMaps takes the maps of spec that a predecessor handed over out of
// adopt and checks each against spec: a map whose layout changed cannot be
// used by these programs, so it goes into other, for the load to make anew
// (docs/restart.md 3.6, migrate.go). The caller closes the maps returned.
func takeMaps(spec *ebpf.CollectionSpec, adopt map[string]*os.File) (_, other map[string]*ebpf.Map, err error) {
	out := make(map[string]*ebpf.Map)
	other = make(map[string]*ebpf.Map)
	defer func() {
		if err != nil {
			closeMaps(out)
			closeMaps(other)
		}
	}()
	for _, name := range specMapNames(spec) {
		fd, err := takeFD(adopt, mapHandoverName(name))
		if err != nil {
			return nil, nil, err
		}
		if fd < 0 {
			// A map the predecessor's build did not have: made new.
			continue
		}
		m, err := ebpf.NewMapFromFD(fd)
		if err != nil {
			return nil, nil, fmt.Errorf("taking over map %s: %w", name, err)
		}
		if spec.Maps[name].Compatible(m) != nil {
			other[name] = m
			continue
		}
		out[name] = m
	}
	return out, other, nil
}

func closeMaps(maps map[string]*ebpf.Map) {
	for _, m := range maps {
		m.Close()
	}
}

// specMapNames are the maps of spec that outlive a load: all but the
// sections holding one load's constants and globals (.rodata, .bss...).
func specMapNames(spec *ebpf.CollectionSpec) []string {
	var out []string
	for name := range spec.Maps {
		if !strings.HasPrefix(name, ".") {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// maps are the maps of both objects, by name.
func (d *Datapath) maps() map[string]*ebpf.Map {
	out := make(map[string]*ebpf.Map)
	objectMaps(reflect.ValueOf(&d.sockops).Elem(), out)
	objectMaps(reflect.ValueOf(&d.connect).Elem(), out)
	if d.strict != nil {
		objectMaps(reflect.ValueOf(d.strict).Elem(), out)
	}
	return out
}

// objectMaps collects the maps of a bpf2go objects struct (its embedded
// ...Maps struct) by their `ebpf` tag.
func objectMaps(v reflect.Value, out map[string]*ebpf.Map) {
	for i := range v.NumField() {
		f, sf := v.Field(i), v.Type().Field(i)
		switch {
		case sf.Anonymous && f.Kind() == reflect.Struct:
			objectMaps(f, out)
		case sf.Type == reflect.TypeFor[*ebpf.Map]():
			if name := sf.Tag.Get("ebpf"); name != "" && !f.IsNil() {
				out[name] = f.Interface().(*ebpf.Map)
			}
		}
	}
}

// checkSameMaps checks, in pinned mode, that the maps handed over are the
// pinned ones this Datapath loaded: a predecessor that did not pin (the
// capture's on_failure changed across the hand-over) has its maps elsewhere,
// and loading the pins beside them would run two sets at once.
func (d *Datapath) checkSameMaps(handed map[string]*ebpf.Map) error {
	loaded := d.maps()
	for name, h := range handed {
		m := loaded[name]
		if m == nil {
			continue
		}
		hid, herr := mapID(h)
		lid, lerr := mapID(m)
		if err := errors.Join(herr, lerr); err != nil {
			return fmt.Errorf("comparing the handed-over map %s with the pinned one: %w", name, err)
		}
		if hid != lid {
			return fmt.Errorf("the running smeshd's map %s is not the one pinned in %s (did capture.on_failure change?): "+
				"stop the running smeshd, then start this one", name, d.pins.dir)
		}
	}
	return nil
}

func mapID(m *ebpf.Map) (ebpf.MapID, error) {
	info, err := m.Info()
	if err != nil {
		return 0, err
	}
	id, ok := info.ID()
	if !ok {
		return 0, errors.New("the kernel gives no map id")
	}
	return id, nil
}

// adoptLink takes over the attachment a from a predecessor's descriptor
// and swaps prog into it (BPF_LINK_UPDATE: atomic, the cgroup is never
// without a program). prev is the program it ran, for giving it back should
// this start fail (Close before Commit). A descriptor that is not a as it
// claims is closed: nil link, and a is attached anew.
func (d *Datapath) adoptLink(fd int, a attachment, prog *ebpf.Program) (_ link.Link, prev ebpf.ProgramID, err error) {
	l, err := link.NewFromFD(fd)
	if err != nil {
		return nil, 0, fmt.Errorf("taking over the %s link of %s: %w", a.typ, a.cgroup, err)
	}
	info, err := l.Info()
	if err != nil {
		l.Close()
		return nil, 0, fmt.Errorf("taking over the %s link of %s: %w", a.typ, a.cgroup, err)
	}
	cg := info.Cgroup()
	if info.Type != link.CgroupType || cg == nil || cg.CgroupId != a.id || ebpf.AttachType(cg.AttachType) != a.typ {
		// Closing our copy detaches nothing while the predecessor holds
		// its own; on its release, the stray link goes.
		l.Close()
		ev := d.log.Warn().Str("cgroup", a.cgroup).Stringer("type", a.typ).Uint32("link_type", uint32(info.Type))
		if cg != nil {
			ev = ev.Uint64("link_cgroup", cg.CgroupId).Stringer("link_attach", ebpf.AttachType(cg.AttachType))
		}
		ev.Msg("a handed-over link is not the attachment its name says; attaching anew")
		return nil, 0, nil
	}
	if err := l.Update(prog); err != nil {
		l.Close()
		return nil, 0, fmt.Errorf("swapping the new %s program into the handed-over link of %s: %w", a.typ, a.cgroup, err)
	}
	return l, info.Program, nil
}

// inheritedAttachments are the getsockopt and sock_ops attachments of the
// cgroups predecessors ran in, which this Datapath keeps beside its own
// cgroup's: the listeners it took over were made there, and a socket runs
// the programs of the cgroup it was made in (an accepted one, its
// listener's), so SO_ORIGINAL_DST for a connection accepted from them is
// answered by that cgroup's getsockopt, and the hop is seen by its
// sock_ops. A predecessor's cgroup is told by its getsockopt link, which
// smeshd attaches to its own cgroup alone. A successor started from
// another cgroup (a new pod, a shell) stays there (ownCgroup shares a
// cgroup with its predecessor only); the links, handed on from smeshd to smeshd,
// keep even a cgroup removed since attached for the sockets made in it.
func (d *Datapath) inheritedAttachments() map[attachment]*ebpf.Program {
	if d.inherited != nil {
		return d.inherited
	}
	d.inherited = make(map[attachment]*ebpf.Program)
	prefix := linkHandoverPrefix + ebpf.AttachCGroupGetsockopt.String() + "/"
	for name := range d.adopt {
		rest, ok := strings.CutPrefix(name, prefix)
		if !ok {
			continue
		}
		id, err := strconv.ParseUint(rest, 10, 64)
		if err != nil || id == d.proxyCgroupID || !linkAttached(d.adopt[name], id) {
			// A cgroup removed since (an earlier smeshd's own, with no
			// socket made there left) has nothing to keep.
			continue
		}
		where := fmt.Sprintf("a predecessor's cgroup (id %d)", id)
		d.inherited[attachment{where, id, ebpf.AttachCGroupGetsockopt}] = d.connect.SmeshGetsockopt
		if f := d.adopt[linkHandoverName(ebpf.AttachCGroupSockOps, id)]; f != nil && linkAttached(f, id) {
			d.inherited[attachment{where, id, ebpf.AttachCGroupSockOps}] = d.sockops.SmeshSockops
		}
	}
	return d.inherited
}

// linkAttached says whether the handed-over link f is attached to the
// cgroup id still (a link whose cgroup went says 0).
func linkAttached(f *os.File, id uint64) bool {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return false
	}
	l, err := link.NewFromFD(fd)
	if err != nil {
		return false
	}
	defer l.Close()
	info, err := l.Info()
	return err == nil && info.Cgroup() != nil && info.Cgroup().CgroupId == id
}

// closeLeftLinks closes the handed-over attachments this Datapath does not
// use (cgroups no longer enrolled): they go
// once the predecessor releases its copies.
func (d *Datapath) closeLeftLinks() {
	for name, f := range d.adopt {
		if strings.HasPrefix(name, linkHandoverPrefix) {
			delete(d.adopt, name)
			f.Close()
		}
	}
}

// Release gives this Datapath's objects up without detaching or unpinning
// anything: a successor that adopted them (Options.Adopt) holds them now.
// The Datapath is closed afterwards; Close does nothing more.
func (d *Datapath) Release() error {
	if d.closed {
		return nil
	}
	d.closed = true
	var errs []error
	// Closing a bpf_link's descriptor detaches it only when no other
	// descriptor or pin holds it: the successor's copies do.
	for a, l := range d.links {
		if err := l.Close(); err != nil {
			errs = append(errs, fmt.Errorf("closing the %s link of %s: %w", a.typ, a.cgroup, err))
		}
	}
	d.links = nil
	// Closing our copies: the successor's keep them attached.
	errs = append(errs, d.closeStrict())
	d.closeRemade()
	if d.events != nil {
		d.events.Close()
	}
	if d.services != nil {
		// Its retired slots are in maps the successor owns now, under ids
		// the successor treats as in use (adoptServiceTable).
		d.services.stop()
	}
	// The sk_msg program stays attached to the sockhash until the
	// successor's replaces it (and in the psocks of open spliced
	// connections until they end): closing the descriptor only drops ours.
	if d.msg != nil {
		errs = append(errs, d.msg.Close())
	}
	d.msgAttached = false
	for _, c := range []interface{ Close() error }{&d.connect, &d.sockops} {
		if err := c.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	// No rollback: the pins are the successor's. Closing the lock's
	// descriptor keeps the flock, which the successor's copy holds.
	d.pins.close()
	return errors.Join(errs...)
}
