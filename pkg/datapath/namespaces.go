package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"

	"github.com/cilium/ebpf"

	"github.com/smesh-dev/smesh/bpf/connect"
)

// The programs know the network namespaces of this node that smeshd serves
// (enrolled ones and its own) through three maps smeshd keeps current:
// smesh_addrs (address -> the namespace that has it, 0 when several do),
// smesh_ns_addrs (namespace + address) and smesh_netns (namespaces whose
// listeners are up: capture happens only there). Namespaces are named by
// their netns cookie, which the kernel never reuses.

// nsMaps keeps those maps. Its own copy of every namespace's addresses is
// the source of truth; the maps are written from it.
type nsMaps struct {
	addrs, nsAddrs, ready *ebpf.Map

	mu sync.Mutex
	ns map[uint64][]netip.Addr // by netns cookie
}

// bpfAddr turns an address into the programs' struct addr: IPv4 as
// ::ffff:a.b.c.d, in network byte order.
func bpfAddr(a netip.Addr) connect.ConnectAddr {
	b := a.As16() // v4-mapped for IPv4
	var out connect.ConnectAddr
	for i := range out.Ip {
		// The map encodes each __u32 little-endian; the bytes must stay
		// in network order.
		out.Ip[i] = binary.LittleEndian.Uint32(b[4*i:])
	}
	return out
}

// addrOf is the inverse of bpfAddr.
func addrOf(a connect.ConnectAddr) netip.Addr {
	var b [16]byte
	for i, w := range a.Ip {
		binary.LittleEndian.PutUint32(b[4*i:], w)
	}
	return netip.AddrFrom16(b).Unmap()
}

// reset empties the maps (a pinned set adopted from an earlier run holds
// that run's namespaces).
func (m *nsMaps) reset() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.ns = make(map[uint64][]netip.Addr)
	return errors.Join(
		clearMap[connect.ConnectAddr, connect.ConnectAddrOwner](m.addrs),
		clearMap[connect.ConnectNsAddr, uint8](m.nsAddrs),
		clearMap[uint64, uint8](m.ready),
	)
}

// load takes the maps' contents as its own copy: maps a running
// predecessor handed over hold the namespaces it registered, which stay
// (their listeners were handed over too), and set and remove must know
// their addresses to replace or remove them.
func (m *nsMaps) load() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.ns = make(map[uint64][]netip.Addr)
	var key connect.ConnectNsAddr
	var one uint8
	it := m.nsAddrs.Iterate()
	for it.Next(&key, &one) {
		m.ns[key.Netns] = append(m.ns[key.Netns], addrOf(key.Ip))
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading the handed-over %s: %w", mapName(m.nsAddrs), err)
	}
	var cookie uint64
	var ready uint8
	it = m.ready.Iterate()
	for it.Next(&cookie, &ready) {
		if _, ok := m.ns[cookie]; !ok {
			m.ns[cookie] = nil
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading the handed-over %s: %w", mapName(m.ready), err)
	}
	return nil
}

// Bits of smesh_netns values (smesh.h, NETNS_READY*).
const (
	netnsReady4 uint8 = 1
	netnsReady6 uint8 = 2
)

// set records the addresses of namespace cookie and which of its listeners
// are up.
func (m *nsMaps) set(cookie uint64, addrs []netip.Addr, ready4, ready6 bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if cookie == 0 {
		return errors.New("network namespace cookie 0")
	}
	var clean []netip.Addr
	for _, a := range addrs {
		a = a.Unmap()
		// Loopback is every namespace's own; the programs know that.
		if a.IsValid() && !a.IsLoopback() && !slices.Contains(clean, a) {
			clean = append(clean, a)
		}
	}
	old := m.ns[cookie]
	m.ns[cookie] = clean
	var errs []error
	for _, a := range old {
		if !slices.Contains(clean, a) {
			if err := m.nsAddrs.Delete(connect.ConnectNsAddr{Netns: cookie, Ip: bpfAddr(a)}); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, fmt.Errorf("removing %s of netns %d: %w", a, cookie, err))
			}
		}
	}
	for _, a := range clean {
		if err := m.nsAddrs.Put(connect.ConnectNsAddr{Netns: cookie, Ip: bpfAddr(a)}, uint8(1)); err != nil {
			errs = append(errs, fmt.Errorf("adding %s of netns %d: %w", a, cookie, err))
		}
	}
	errs = append(errs, m.setOwners(slices.Concat(old, clean)))
	var ready uint8
	if ready4 {
		ready |= netnsReady4
	}
	if ready6 {
		ready |= netnsReady6
	}
	if ready != 0 {
		errs = append(errs, m.ready.Put(cookie, ready))
	} else if err := m.ready.Delete(cookie); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// remove forgets namespace cookie: capture stops there at once.
func (m *nsMaps) remove(cookie uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var errs []error
	if err := m.ready.Delete(cookie); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		errs = append(errs, err)
	}
	old := m.ns[cookie]
	delete(m.ns, cookie)
	for _, a := range old {
		if err := m.nsAddrs.Delete(connect.ConnectNsAddr{Netns: cookie, Ip: bpfAddr(a)}); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	errs = append(errs, m.setOwners(old))
	return errors.Join(errs...)
}

// setOwners rewrites the owner of each address in addrs from m.ns: the one
// namespace that has it, 0 for several, no entry for none.
func (m *nsMaps) setOwners(addrs []netip.Addr) error {
	var errs []error
	for _, a := range addrs {
		var owner uint64
		n := 0
		for cookie, as := range m.ns {
			if slices.Contains(as, a) {
				owner = cookie
				n++
			}
		}
		key := bpfAddr(a)
		switch {
		case n == 0:
			if err := m.addrs.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, fmt.Errorf("removing owner of %s: %w", a, err))
			}
			continue
		case n > 1:
			owner = 0
		}
		if err := m.addrs.Put(key, connect.ConnectAddrOwner{Netns: owner}); err != nil {
			errs = append(errs, fmt.Errorf("setting owner of %s: %w", a, err))
		}
	}
	return errors.Join(errs...)
}

// clearMap deletes every entry of m.
func clearMap[K, V any](m *ebpf.Map) error {
	var k K
	var v V
	var keys []K
	it := m.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, k)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading %s: %w", mapName(m), err)
	}
	for _, k := range keys {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("clearing %s: %w", mapName(m), err)
		}
	}
	return nil
}

func mapName(m *ebpf.Map) string {
	if info, err := m.Info(); err == nil {
		return info.Name
	}
	return m.String()
}
