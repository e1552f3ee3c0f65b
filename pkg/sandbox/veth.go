package sandbox

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// linkUpTimeout bounds how long Veth waits for carrier on a new pair.
const linkUpTimeout = 5 * time.Second

// Veth connects the network namespaces a and b with a veth pair: nameA in a
// with address addrA, nameB in b with addrB (e.g. 198.18.7.1/24 and
// 198.18.7.2/24; an invalid, zero Prefix leaves that end without an
// address; an IPv6 one is added without duplicate address detection). Both
// ends are up, with carrier, when Veth returns.
//
// The pair is created inside a with its peer placed straight into b: it never
// appears in the caller's namespace, so names only have to be unique per
// namespace. On error, Veth deletes the pair again.
//
// There is no function to delete a pair: deleting either namespace deletes
// it, and the kernel then does so in the background, whereas an explicit
// RTM_DELLINK blocks until every route and socket let go of the device (up to
// a second after TCP traffic).
func Veth(a, b netns.NsHandle, nameA, nameB string, addrA, addrB netip.Prefix) error {
	ha, err := routeHandle(a)
	if err != nil {
		return err
	}
	defer ha.Close()
	hb, err := routeHandle(b)
	if err != nil {
		return err
	}
	defer hb.Close()
	return vethPair(
		vethEnd{h: ha, name: nameA, addrs: validPrefixes(addrA)},
		vethEnd{h: hb, ns: b, name: nameB, addrs: validPrefixes(addrB)})
}

// vethEnd is one end of a pair made by vethPair.
type vethEnd struct {
	h      *netlink.Handle // rtnetlink in the end's namespace
	ns     netns.NsHandle  // the end's namespace; vethPair needs b's only
	name   string
	addrs  []netip.Prefix // IPv6 ones are added without DAD
	master string         // a bridge in the end's namespace to attach it to, or ""
}

// vethPair makes a veth pair from a to b and configures both ends, up and
// with carrier. The pair is created in a's namespace with its peer placed
// straight into b's; on error it is deleted again.
func vethPair(a, b vethEnd) (err error) {
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: a.name},
		PeerName:      b.name,
		PeerNamespace: netlink.NsFd(int(b.ns)),
	}
	if err := a.h.LinkAdd(veth); err != nil {
		return fmt.Errorf("adding veth pair %s/%s: %w", a.name, b.name, err)
	}
	defer func() {
		// Quick: no traffic went through the pair yet.
		if err != nil {
			if derr := a.h.LinkDel(veth); derr != nil {
				err = errors.Join(err, fmt.Errorf("deleting veth pair %s/%s: %w", a.name, b.name, derr))
			}
		}
	}()

	ends := []vethEnd{a, b}
	for _, end := range ends {
		if err := configureLink(end.h, end.name, end.addrs); err != nil {
			return err
		}
	}
	// The kernel turns carrier on in the background (linkwatch, up to a
	// second later) and drops packets until then: a SYN sent right away
	// would cost a 1s retransmission.
	for _, end := range ends {
		if err := waitOperUp(end.h, end.name, linkUpTimeout); err != nil {
			return err
		}
	}
	// Attached only now that the end is up with carrier: the bridge then
	// enables the port (forwarding, as STP is off) within this very call,
	// instead of later when linkwatch reports the carrier, and a port that
	// is not yet forwarding drops frames.
	for _, end := range ends {
		if end.master == "" {
			continue
		}
		if err := attach(end.h, end.name, end.master); err != nil {
			return err
		}
	}
	return nil
}

// attach enslaves link name to the bridge master and waits until the
// bridge, too, is up with carrier: a bridge without ports has none, and
// gets it (through linkwatch, again) when its first port starts forwarding.
func attach(h *netlink.Handle, name, master string) error {
	link, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("finding %s: %w", name, err)
	}
	br, err := h.LinkByName(master)
	if err != nil {
		return fmt.Errorf("finding %s: %w", master, err)
	}
	if err := h.LinkSetMaster(link, br); err != nil {
		return fmt.Errorf("attaching %s to %s: %w", name, master, err)
	}
	return waitOperUp(h, master, linkUpTimeout)
}

// validPrefixes returns the valid ones of ps: a zero Prefix stands for no
// address.
func validPrefixes(ps ...netip.Prefix) []netip.Prefix {
	var valid []netip.Prefix
	for _, p := range ps {
		if p.IsValid() {
			valid = append(valid, p)
		}
	}
	return valid
}

// configureLink adds addrs to link name and brings it up. IPv6 addresses
// skip duplicate address detection (nodad): the namespaces are private and
// the addresses ours, and a tentative address cannot be bound to or sent
// from for a second or more.
func configureLink(h *netlink.Handle, name string, addrs []netip.Prefix) error {
	link, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("finding %s: %w", name, err)
	}
	for _, addr := range addrs {
		a := &netlink.Addr{IPNet: ipNet(addr)}
		if addr.Addr().Is6() {
			a.Flags = unix.IFA_F_NODAD
		}
		if err := h.AddrAdd(link, a); err != nil {
			return fmt.Errorf("adding %s to %s: %w", addr, name, err)
		}
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("bringing %s up: %w", name, err)
	}
	return nil
}

// ipNet converts p, keeping the host bits (an interface address, not a
// subnet).
func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func waitOperUp(h *netlink.Handle, name string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		link, err := h.LinkByName(name)
		if err != nil {
			return fmt.Errorf("finding %s: %w", name, err)
		}
		state := link.Attrs().OperState
		if state == netlink.OperUp {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s is %s, not up, after %v", name, state, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
