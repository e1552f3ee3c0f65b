package datapath

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/bpf/connect"
	"github.com/smesh-dev/smesh/pkg/services"
)

// Flags of a service entry (service.h, SVC_*).
const (
	svcLocalOnly   uint32 = 1
	svcPreferLocal uint32 = 2
	svcAffinity    uint32 = 4
)

// serviceMaps are the maps connect4's choice of a backend reads
// (service.h); the test harness has its own copies.
type serviceMaps struct {
	services, backends, members *ebpf.Map
}

// ServiceTable keeps the Services connect4 and connect6 balance: it is the
// data path's services.Sink. Its own copy of every service is the source of
// truth (for /debug/services and for knowing which slots to delete); the
// maps are written from it.
type ServiceTable struct {
	maps serviceMaps

	mu     sync.Mutex
	held   map[services.Key]heldService
	lastID uint32
	ids    map[uint32]bool // revision ids in use, held or retired
	// retired are revisions no service entry names any more, whose slots
	// go once retireGrace has passed: a connect4 that read the old entry
	// just before the switch may still be looking its slots up.
	retired []retiredSlots
	timer   *time.Timer
	// adopted are the service entries a running predecessor wrote in maps
	// it handed over, until Update or Delete replaces them.
	adopted map[services.Key]heldService
	stopped bool
}

// retireGrace is how long a replaced revision's slots stay. A program runs
// for microseconds; a second is a margin that costs nothing but entries.
const retireGrace = time.Second

type retiredSlots struct {
	h    heldService
	when time.Time
}

// heldService is one service as the maps hold it: under revision id, its
// usable backends in slots 0..len(usable)-1.
type heldService struct {
	svc    services.Service
	id     uint32
	usable []services.Backend
}

var _ services.Sink = (*ServiceTable)(nil)

// newServiceTable starts from empty maps: a pinned set adopted from an
// earlier run holds that run's services, under ids this table does not
// know; the daemon writes the current ones before attaching connect4.
// Maps a running predecessor handed over (handedOver) keep their services
// instead, which stay in force until the daemon writes its own: see
// adoptServices.
func newServiceTable(m serviceMaps, handedOver bool) (*ServiceTable, error) {
	t := &ServiceTable{maps: m, held: make(map[services.Key]heldService), ids: make(map[uint32]bool)}
	if handedOver {
		return t, t.adoptServices()
	}
	err := errors.Join(
		clearMap[connect.ConnectSvcKey, connect.ConnectSvc](m.services),
		clearMap[connect.ConnectBackendKey, connect.ConnectBackend](m.backends),
		clearMap[connect.ConnectMemberKey, uint8](m.members),
	)
	return t, err
}

// adoptServices takes over the services a running predecessor wrote: a
// connect() to one of them keeps finding its backends. Update and Delete
// replace them as they replace the table's own; the ids of every slot are
// in use, and slots no service names (revisions the predecessor was
// retiring) go after retireGrace. New ids start half the id space away
// from the predecessor's, which may still write some until it releases.
func (t *ServiceTable) adoptServices() error {
	t.adopted = make(map[services.Key]heldService)
	slots := make(map[uint32][]services.Backend) // by id, in slot order
	var bk connect.ConnectBackendKey
	var bv connect.ConnectBackend
	it := t.maps.backends.Iterate()
	for it.Next(&bk, &bv) {
		b := services.Backend{Addr: netip.AddrPortFrom(addrOf(bv.Ip), bv.Port)}
		s := slots[bk.Id]
		for uint32(len(s)) <= bk.Slot {
			s = append(s, services.Backend{})
		}
		s[bk.Slot] = b
		slots[bk.Id] = s
		t.ids[bk.Id] = true
		t.lastID = max(t.lastID, bk.Id)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading the handed-over smesh_backends: %w", err)
	}
	var sk connect.ConnectSvcKey
	var sv connect.ConnectSvc
	it = t.maps.services.Iterate()
	named := make(map[uint32]bool)
	for it.Next(&sk, &sv) {
		k := services.Key{VIP: addrOf(sk.Vip), Port: sk.Port}
		t.adopted[k] = heldService{svc: services.Service{Key: k}, id: sv.Id, usable: slots[sv.Id]}
		named[sv.Id] = true
		t.ids[sv.Id] = true
		t.lastID = max(t.lastID, sv.Id)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading the handed-over smesh_services: %w", err)
	}
	for id, usable := range slots {
		if !named[id] {
			t.retire(heldService{id: id, usable: usable})
		}
	}
	t.lastID += math.MaxUint32 / 2
	return nil
}

// takeAdopted returns the predecessor's entry of k, if the table has not
// replaced it yet, and forgets it.
func (t *ServiceTable) takeAdopted(k services.Key) (heldService, bool) {
	h, ok := t.adopted[k]
	delete(t.adopted, k)
	return h, ok
}

// stop ends the retiring of slots: the maps are closed, or a successor's.
func (t *ServiceTable) stop() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.stopped = true
	if t.timer != nil {
		t.timer.Stop()
		t.timer = nil
	}
}

// Services is the data path's ServiceTable.
func (d *Datapath) Services() *ServiceTable { return d.services }

// Update puts s in force: a connect() sees the previous backends or the new
// ones, never a mix and never none while both have some. The new set is
// written under a fresh revision id, the service entry is switched to it
// in one update, and only then are the previous revision's slots deleted.
// On error the previous set stays in force.
func (t *ServiceTable) Update(s services.Service) error {
	if err := s.Validate(); err != nil {
		return err
	}
	usable := s.Usable()
	if len(usable) > math.MaxUint16 {
		return fmt.Errorf("service %s (%s): %d backends, at most %d are supported", s.Name, s.Key, len(usable), math.MaxUint16)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	prev, had := t.held[s.Key]
	if !had {
		prev, had = t.adopted[s.Key]
	}
	next := heldService{svc: s, id: t.newID(), usable: usable}
	if err := t.writeSlots(next); err != nil {
		t.deleteSlots(next)
		return err
	}
	if err := t.maps.services.Put(svcKey(s.Key), svcValue(next)); err != nil {
		t.deleteSlots(next)
		return fmt.Errorf("service %s (%s): writing smesh_services: %w%s", s.Name, s.Key, err, fullHint(err, t.maps.services))
	}
	t.held[s.Key] = next
	t.takeAdopted(s.Key)
	if had {
		t.retire(prev)
	}
	return nil
}

// retire deletes h's slots after retireGrace.
func (t *ServiceTable) retire(h heldService) {
	t.retired = append(t.retired, retiredSlots{h, time.Now()})
	if t.timer == nil && !t.stopped {
		t.timer = time.AfterFunc(retireGrace, t.sweep)
	}
}

// sweep deletes the slots whose grace has passed and waits for the rest.
func (t *ServiceTable) sweep() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		return
	}
	t.timer = nil
	now := time.Now()
	n := 0
	for _, r := range t.retired {
		if now.Sub(r.when) >= retireGrace {
			t.deleteSlots(r.h)
		} else {
			t.retired[n] = r
			n++
		}
	}
	t.retired = t.retired[:n]
	if n > 0 {
		t.timer = time.AfterFunc(retireGrace-now.Sub(t.retired[0].when), t.sweep)
	}
}

// Delete takes the service k out of the maps; a connect() to it is then
// left alone (it goes to the VIP itself). No error when it is not there.
func (t *ServiceTable) Delete(k services.Key) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	prev, had := t.held[k]
	if !had {
		prev, had = t.adopted[k]
	}
	if !had {
		return nil
	}
	if err := t.maps.services.Delete(svcKey(k)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("service %s (%s): deleting from smesh_services: %w", prev.svc.Name, k, err)
	}
	delete(t.held, k)
	t.takeAdopted(k)
	t.retire(prev)
	return nil
}

// Services lists what the table holds, by address, for /debug/services.
func (t *ServiceTable) Services() []services.Service {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]services.Service, 0, len(t.held))
	for _, h := range t.held {
		s := h.svc
		s.Backends = slices.Clone(s.Backends)
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b services.Service) int {
		if c := a.VIP.Compare(b.VIP); c != 0 {
			return c
		}
		return int(a.Port) - int(b.Port)
	})
	return out
}

// ServiceFill is how full the service maps are.
type ServiceFill struct {
	Services, Backends       int // entries in use
	MaxServices, MaxBackends int // the maps' sizes
}

// Fill counts the entries the services in force take (a replaced
// revision's slots stay for another second: see retire).
func (t *ServiceTable) Fill() ServiceFill {
	t.mu.Lock()
	defer t.mu.Unlock()
	f := ServiceFill{Services: len(t.held), MaxServices: int(t.maps.services.MaxEntries()), MaxBackends: int(t.maps.backends.MaxEntries())}
	for _, h := range t.held {
		f.Backends += len(h.usable)
	}
	return f
}

// newID returns a revision id no service holds, held or retired (0 is
// never one), and marks it in use until deleteSlots.
func (t *ServiceTable) newID() uint32 {
	for {
		t.lastID++
		if t.lastID != 0 && !t.ids[t.lastID] {
			t.ids[t.lastID] = true
			return t.lastID
		}
	}
}

// writeSlots writes h's backends (and, for affinity, its members).
func (t *ServiceTable) writeSlots(h heldService) error {
	affinity := h.svc.AffinityTimeout > 0
	for i, b := range h.usable {
		be := backendValue(b)
		if err := t.maps.backends.Put(connect.ConnectBackendKey{Id: h.id, Slot: uint32(i)}, be); err != nil {
			return fmt.Errorf("service %s (%s): writing backend %s to smesh_backends: %w%s", h.svc.Name, h.svc.Key, b.Addr, err, fullHint(err, t.maps.backends))
		}
		if affinity {
			if err := t.maps.members.Put(connect.ConnectMemberKey{Id: h.id, Be: be}, uint8(1)); err != nil {
				return fmt.Errorf("service %s (%s): writing backend %s to smesh_svc_members: %w%s", h.svc.Name, h.svc.Key, b.Addr, err, fullHint(err, t.maps.members))
			}
		}
	}
	return nil
}

// deleteSlots removes h's backends. A slot left behind by a failing delete
// would only cost an entry: nothing names its id any more.
func (t *ServiceTable) deleteSlots(h heldService) {
	delete(t.ids, h.id)
	for i, b := range h.usable {
		t.maps.backends.Delete(connect.ConnectBackendKey{Id: h.id, Slot: uint32(i)})
		t.maps.members.Delete(connect.ConnectMemberKey{Id: h.id, Be: backendValue(b)})
	}
}

// fullHint explains an update that failed because a map is full.
func fullHint(err error, m *ebpf.Map) string {
	if !errors.Is(err, unix.E2BIG) && !errors.Is(err, unix.ENOSPC) {
		return ""
	}
	return fmt.Sprintf(" (the map is full: it holds %d entries)", m.MaxEntries())
}

func svcKey(k services.Key) connect.ConnectSvcKey {
	return connect.ConnectSvcKey{Vip: bpfAddr(k.VIP), Port: k.Port}
}

func svcValue(h heldService) connect.ConnectSvc {
	s := h.svc
	v := connect.ConnectSvc{Id: h.id, Count: uint16(len(h.usable))}
	for _, b := range h.usable {
		if b.Local {
			v.LocalCount++
		}
	}
	if s.LocalOnly {
		v.Flags |= svcLocalOnly
	}
	if s.PreferLocal {
		v.Flags |= svcPreferLocal
	}
	if s.AffinityTimeout > 0 {
		v.Flags |= svcAffinity
		// Whole seconds, as Kubernetes' timeoutSeconds; never 0.
		secs := s.AffinityTimeout / time.Second
		if s.AffinityTimeout%time.Second != 0 {
			secs++
		}
		v.AffinitySec = uint32(min(secs, math.MaxUint32))
	}
	return v
}

func backendValue(b services.Backend) connect.ConnectBackend {
	return connect.ConnectBackend{Ip: bpfAddr(b.Addr.Addr()), Port: b.Addr.Port()}
}

// HaveSetRetval reports whether cgroup/connect4 may call bpf_set_retval
// (Linux 5.18+): then a connect() to a Service without backends fails with
// ECONNREFUSED, else with EPERM.
func HaveSetRetval() error {
	return features.HaveProgramHelper(ebpf.CGroupSockAddr, asm.FnSetRetval)
}
