package sandbox

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// linkUpTimeout bounds how long Veth waits for carrier on a new pair.
const linkUpTimeout = 5 * time.Second

// Veth connects the network namespaces a and b with a veth pair: nameA in a
// with address addrA, nameB in b with addrB (e.g. 198.18.7.1/24 and
// 198.18.7.2/24; an invalid, zero Prefix leaves that end without an
// address). Both ends are up, with carrier, when Veth returns.
//
// The pair is created inside a with its peer placed straight into b: it never
// appears in the caller's namespace, so names only have to be unique per
// namespace. On error, Veth deletes the pair again.
//
// There is no function to delete a pair: deleting either namespace deletes
// it, and the kernel then does so in the background, whereas an explicit
// RTM_DELLINK blocks until every route and socket let go of the device (up to
// a second after TCP traffic).
func Veth(a, b netns.NsHandle, nameA, nameB string, addrA, addrB netip.Prefix) (err error) {
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

	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: nameA},
		PeerName:      nameB,
		PeerNamespace: netlink.NsFd(int(b)),
	}
	if err := ha.LinkAdd(veth); err != nil {
		return fmt.Errorf("adding veth pair %s/%s: %w", nameA, nameB, err)
	}
	defer func() {
		// Quick: no traffic went through the pair yet.
		if err != nil {
			if derr := ha.LinkDel(veth); derr != nil {
				err = errors.Join(err, fmt.Errorf("deleting veth pair %s/%s: %w", nameA, nameB, derr))
			}
		}
	}()

	ends := []struct {
		h    *netlink.Handle
		name string
		addr netip.Prefix
	}{{ha, nameA, addrA}, {hb, nameB, addrB}}
	for _, end := range ends {
		if err := configureLink(end.h, end.name, end.addr); err != nil {
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
	return nil
}

func configureLink(h *netlink.Handle, name string, addr netip.Prefix) error {
	link, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("finding %s: %w", name, err)
	}
	if addr.IsValid() {
		ipnet := &net.IPNet{IP: addr.Addr().AsSlice(), Mask: net.CIDRMask(addr.Bits(), addr.Addr().BitLen())}
		if err := h.AddrAdd(link, &netlink.Addr{IPNet: ipnet}); err != nil {
			return fmt.Errorf("adding %s to %s: %w", addr, name, err)
		}
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("bringing %s up: %w", name, err)
	}
	return nil
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
