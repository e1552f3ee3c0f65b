package sandbox

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/cgroups"
)

// BridgeName is the name of the pod bridge in every cluster node's network
// namespace.
const BridgeName = "br0"

// podCgroupRemoveTimeout bounds how long Pod.Delete waits for the processes
// in the pod's cgroup to die and for the kernel to let go of the directory.
const podCgroupRemoveTimeout = 5 * time.Second

// firstPodHost is the host number of a node's first pod in its subnets: the
// subnet address itself is no host, and .1 (::1) is the node's gateway.
const firstPodHost = 2

// ClusterNode is a node of a Kubernetes cluster as the CNI bridge plugin
// sets it up, in a network namespace of its own: a bridge, br0, holding the
// pods' gateway addresses (the first host of each pod subnet, e.g.
// 198.18.5.1/24 and fd00:5e:1:5::1/64), and IPv4 and IPv6 forwarding on.
// AddPod plugs pods into the bridge; JoinNodes routes between the pods of two
// nodes. Unlike on a real node, IPv6 duplicate address detection is off in
// the node and its pods, for link-local addresses too: no address is ever
// tentative, and the node forwards from the start (see disableDAD).
//
// The exported fields describe the node and must not be changed. A node is
// safe for concurrent use, except that Close must not run concurrently with
// AddPod or JoinNodes.
type ClusterNode struct {
	// Name is the name of the network namespace, below /run/netns.
	Name string
	// PodNet4 and PodNet6 are the pod subnets (e.g. 198.18.5.0/24 and
	// fd00:5e:1:5::/64).
	PodNet4, PodNet6 netip.Prefix

	ns netns.NsHandle // open from NewClusterNode until Close

	mu       sync.Mutex
	closed   bool
	pods     map[uint32]*Pod // by host number
	lastHost uint32          // host number handed out last
	veths    int             // bridge ports made so far; the next is veth<veths>
	wires    int             // wires made so far; the next is wire<wires>
}

// NewClusterNode creates the network namespace name and in it the bridge,
// with the gateway addresses of podNet4 (IPv4, at most /30) and podNet6
// (IPv6, at most /126), and turns on forwarding. The caller picks the
// subnets; nodes that are joined need subnets apart. On error nothing is left
// behind, except when the name was taken: then that namespace is not
// touched. The caller calls Close.
func NewClusterNode(name string, podNet4, podNet6 netip.Prefix) (_ *ClusterNode, err error) {
	if err := checkSubnets(podNet4, podNet6); err != nil {
		return nil, fmt.Errorf("creating cluster node %s: pod subnets: %w", name, err)
	}
	ns, err := NewNamedNetns(name)
	if err != nil {
		return nil, err
	}
	n := &ClusterNode{
		Name: name, PodNet4: podNet4, PodNet6: podNet6,
		ns: ns, pods: make(map[uint32]*Pod), lastHost: firstPodHost - 1,
	}
	defer func() {
		if err != nil {
			err = fmt.Errorf("creating cluster node %s: %w", name, err)
			if cerr := n.Close(); cerr != nil {
				err = errors.Join(err, cerr)
			}
		}
	}()
	// Before the bridge exists: interfaces start with the defaults of the
	// moment they are made (writing all.forwarding sets the default too).
	for _, key := range []string{"net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"} {
		if err := SetSysctl(ns, key, "1"); err != nil {
			return nil, err
		}
	}
	if err := disableDAD(ns); err != nil {
		return nil, err
	}
	h, err := routeHandle(ns)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: BridgeName, HardwareAddr: bridgeMAC()}}
	if err := h.LinkAdd(br); err != nil {
		return nil, fmt.Errorf("adding bridge %s: %w", BridgeName, err)
	}
	gateways := []netip.Prefix{
		netip.PrefixFrom(n.Gateway4(), podNet4.Bits()),
		netip.PrefixFrom(n.Gateway6(), podNet6.Bits()),
	}
	if err := configureLink(h, BridgeName, gateways); err != nil {
		return nil, err
	}
	return n, nil
}

// disableDAD turns off duplicate address detection in network namespace ns
// for the interfaces made after it. Global addresses are added with nodad
// anyway, but each interface also gets a link-local address of its own,
// tentative for a second or two. Until then a router cannot resolve
// neighbours for the packets it forwards: the neighbour solicitation for a
// packet whose source is not one of the router's addresses goes out from the
// link-local address, and without a usable one the kernel sends none. The
// first forwarded connection would wait ~2s for DAD.
func disableDAD(ns netns.NsHandle) error {
	// DAD runs unless both all and the interface's own setting, copied
	// from default when it is made, are off.
	for _, key := range []string{"net/ipv6/conf/all/accept_dad", "net/ipv6/conf/default/accept_dad"} {
		if err := SetSysctl(ns, key, "0"); err != nil {
			return err
		}
	}
	return nil
}

// checkSubnets reports why v4 and v6 cannot be the IPv4 and IPv6 pod or
// wire subnets of a node: each must be of its family, without host bits, and
// hold at least two hosts besides the subnet address (and, for IPv4, the
// broadcast address).
func checkSubnets(v4, v6 netip.Prefix) error {
	for _, c := range []struct {
		p       netip.Prefix
		family  string
		is      func(netip.Addr) bool
		maxBits int
	}{{v4, "IPv4", netip.Addr.Is4, 30}, {v6, "IPv6", netip.Addr.Is6, 126}} {
		switch {
		case !c.p.IsValid() || !c.is(c.p.Addr()) || c.p.Addr().Is4In6():
			return fmt.Errorf("%v is not an %s subnet", c.p, c.family)
		case c.p != c.p.Masked():
			return fmt.Errorf("%v has host bits set", c.p)
		case c.p.Bits() > c.maxBits:
			return fmt.Errorf("%v is smaller than a /%d", c.p, c.maxBits)
		}
	}
	return nil
}

// bridgeMAC returns a random, locally administered unicast MAC address whose
// first byte is 0xfe. A bridge created without an address of its own takes
// the lowest one of its ports and changes it as ports come and go, and pods
// keep sending to the old one until their neighbour entry for the gateway
// expires: the first pod deleted could cut the others off from their
// gateway for half a minute. Set explicitly, the address stays; 0xfe is
// above any random port address, so such a change would not go unnoticed.
func bridgeMAC() net.HardwareAddr {
	mac := make(net.HardwareAddr, 6)
	_, _ = rand.Read(mac)
	mac[0] = 0xfe
	return mac
}

// Netns returns the node's network namespace, for InNetns. It is closed by
// Close.
func (n *ClusterNode) Netns() netns.NsHandle { return n.ns }

// Gateway4 returns the pods' IPv4 gateway: the bridge's address, the first
// host of PodNet4.
func (n *ClusterNode) Gateway4() netip.Addr { return hostAddr(n.PodNet4, 1) }

// Gateway6 returns the pods' IPv6 gateway: the bridge's address, the first
// host of PodNet6.
func (n *ClusterNode) Gateway6() netip.Addr { return hostAddr(n.PodNet6, 1) }

// hostAddr returns host number host of subnet p.
func hostAddr(p netip.Prefix, host uint32) netip.Addr {
	// The host bits of p are zero and host fits in them, so the sum
	// carries into no bit of the network part; and host < 2^32 changes
	// the low 64 bits only.
	b := p.Addr().As16()
	binary.BigEndian.PutUint64(b[8:], binary.BigEndian.Uint64(b[8:])+uint64(host))
	a := netip.AddrFrom16(b)
	if p.Addr().Is4() {
		return a.Unmap()
	}
	return a
}

// maxHost returns the highest host number a pod can get: the last one below
// the IPv4 broadcast address, or of the IPv6 subnet if that is smaller.
func (n *ClusterNode) maxHost() uint32 {
	limit := uint64(1)<<(32-n.PodNet4.Bits()) - 2
	if bits6 := 128 - n.PodNet6.Bits(); bits6 < 32 {
		limit = min(limit, uint64(1)<<bits6-1)
	}
	return uint32(min(limit, math.MaxUint32))
}

// Pod is a pod on a cluster node: a network namespace and a cgroup of its
// own, and eth0, a veth whose other end is a port of the node's bridge, with
// one address from each of the node's pod subnets and default routes via the
// node's gateways.
//
// The exported fields describe the pod and must not be changed.
type Pod struct {
	// Name is the name of the pod's network namespace, below /run/netns.
	Name string
	// Cgroup is the pod's cgroup v2 directory, or "" if it has none.
	Cgroup string
	// Addr4 and Addr6 are the addresses of eth0.
	Addr4, Addr6 netip.Addr

	node    *ClusterNode
	ns      netns.NsHandle
	host    uint32
	deleted bool // guarded by node.mu
}

// AddPod creates a pod on the node: the network namespace name, the cgroup
// directory cgroup (a path below the cgroup v2 mount whose parent exists; ""
// for none), and eth0, plugged into the bridge, with the next free host of
// each pod subnet. Both ends of the veth and the bridge are up, with
// carrier, when AddPod returns. On error nothing is left behind, except
// a namespace or cgroup that existed already, which is not touched.
//
// Addresses are handed out as the CNI host-local plugin does: the host after
// the one handed out last, wrapping around, so that a deleted pod's address
// is not at once someone else's. A node's first pod is .2 (::2), its second
// .3, and so on: two nodes with the same subnets give their pods the same
// addresses in the same order.
func (n *ClusterNode) AddPod(name, cgroup string) (_ *Pod, err error) {
	p := &Pod{Name: name, Cgroup: cgroup, node: n}
	vethName, err := n.reserve(p)
	if err != nil {
		return nil, fmt.Errorf("adding pod %s to node %s: %w", name, n.Name, err)
	}
	defer func() {
		if err != nil {
			n.release(p)
			err = fmt.Errorf("adding pod %s to node %s: %w", name, n.Name, err)
		}
	}()
	if cgroup != "" {
		if err := os.Mkdir(cgroup, 0o755); err != nil {
			return nil, fmt.Errorf("creating cgroup: %w", err)
		}
		defer func() {
			// Still empty: nobody had the path to start a process in it.
			if err != nil {
				if rerr := os.Remove(cgroup); rerr != nil {
					err = errors.Join(err, rerr)
				}
			}
		}()
	}
	if p.ns, err = NewNamedNetns(name); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			p.ns.Close()
			if derr := DeleteNamedNetns(name); derr != nil {
				err = errors.Join(err, derr)
			}
		}
	}()
	// A pod forwards nothing, so its link-local address would not delay
	// anything; off anyway, so that no address in a cluster is ever
	// tentative.
	if err := disableDAD(p.ns); err != nil {
		return nil, err
	}

	hn, err := routeHandle(n.ns)
	if err != nil {
		return nil, err
	}
	defer hn.Close()
	hp, err := routeHandle(p.ns)
	if err != nil {
		return nil, err
	}
	defer hp.Close()
	err = vethPair(
		vethEnd{h: hn, name: vethName, master: BridgeName},
		vethEnd{h: hp, ns: p.ns, name: "eth0", addrs: []netip.Prefix{
			netip.PrefixFrom(p.Addr4, n.PodNet4.Bits()),
			netip.PrefixFrom(p.Addr6, n.PodNet6.Bits()),
		}})
	if err != nil {
		return nil, err
	}
	// The pair goes with the pod's namespace should this fail.
	for _, gw := range []netip.Addr{n.Gateway4(), n.Gateway6()} {
		if err := addRoute(hp, "eth0", netip.Prefix{}, gw); err != nil {
			return nil, err
		}
	}
	// The links just up (the veth's ends, and the bridge with its first
	// port) have new link-local addresses.
	for _, h := range []*netlink.Handle{hn, hp} {
		if err := waitNotTentative(h); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// waitNotTentative waits until no IPv6 address in the namespace of h is
// tentative. With DAD off (disableDAD) a new address still starts
// tentative, until the kernel's address work item clears the flag: at once
// on an idle machine, only once that work runs on a busy one.
func waitNotTentative(h *netlink.Handle) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		addrs, err := h.AddrList(nil, netlink.FAMILY_V6)
		switch {
		case errors.Is(err, netlink.ErrDumpInterrupted) && time.Now().Before(deadline):
			// An address changed during the dump (pods made beside
			// this one): ask again.
			time.Sleep(5 * time.Millisecond)
			continue
		case err != nil:
			return fmt.Errorf("listing IPv6 addresses: %w", err)
		}
		tentative := ""
		for _, a := range addrs {
			if a.Flags&unix.IFA_F_TENTATIVE != 0 {
				tentative = a.IPNet.String()
			}
		}
		if tentative == "" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("IPv6 address %s still tentative after 5s", tentative)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// reserve picks the pod's host number and addresses and the name of its
// bridge port.
func (n *ClusterNode) reserve(p *Pod) (vethName string, err error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return "", errors.New("the node is closed")
	}
	count := uint64(n.maxHost()) - firstPodHost + 1
	next := uint64(n.lastHost) + 1 // lastHost starts at firstPodHost-1
	for i := range count {
		host := uint32(firstPodHost + (next-firstPodHost+i)%count)
		if n.pods[host] != nil {
			continue
		}
		n.lastHost = host
		n.pods[host] = p
		p.host = host
		p.Addr4, p.Addr6 = hostAddr(n.PodNet4, host), hostAddr(n.PodNet6, host)
		// Never reused: the port of a deleted pod may linger until the
		// kernel has torn down the pod's namespace.
		vethName = fmt.Sprintf("veth%d", n.veths)
		n.veths++
		return vethName, nil
	}
	return "", fmt.Errorf("all %d pod addresses of %s are in use", count, n.PodNet4)
}

func (n *ClusterNode) release(p *Pod) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.pods[p.host] == p {
		delete(n.pods, p.host)
	}
}

// Netns returns the pod's network namespace, for InNetns. It is closed by
// Delete.
func (p *Pod) Netns() netns.NsHandle { return p.ns }

// Delete deletes the pod: it SIGKILLs every process in the pod's cgroup
// tree, removes the cgroup and the pod's network namespace, and gives the
// addresses back (they are handed out again only after the other free ones,
// see AddPod). eth0 and its bridge port go with the namespace, once nothing
// holds it any more: a process in it that is not in the pod's cgroup, or a
// socket made in it, keeps it (and them) alive. Deleting a deleted pod does
// nothing.
func (p *Pod) Delete() error {
	n := p.node
	n.mu.Lock()
	if p.deleted {
		n.mu.Unlock()
		return nil
	}
	p.deleted = true
	n.mu.Unlock()

	var errs []error
	if p.Cgroup != "" {
		// Already gone if the caller removed the tree the pod's cgroup
		// is in.
		if _, err := os.Stat(p.Cgroup); !errors.Is(err, fs.ErrNotExist) {
			if err := cgroups.Remove(p.Cgroup, podCgroupRemoveTimeout); err != nil {
				errs = append(errs, err)
			}
		}
	}
	p.ns.Close()
	if err := DeleteNamedNetns(p.Name); err != nil {
		errs = append(errs, err)
	}
	n.release(p)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("deleting pod %s of node %s: %w", p.Name, n.Name, err)
	}
	return nil
}

// Close deletes the pods still on the node, then the node's network
// namespace, and with it the bridge and the node's ends of its wires (see
// Veth for why they are not deleted one by one). Closing a closed node does
// nothing.
func (n *ClusterNode) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	pods := make([]*Pod, 0, len(n.pods))
	for _, p := range n.pods {
		pods = append(pods, p)
	}
	n.mu.Unlock()

	var errs []error
	for _, p := range pods {
		if err := p.Delete(); err != nil {
			errs = append(errs, err)
		}
	}
	n.ns.Close()
	if err := DeleteNamedNetns(n.Name); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("closing cluster node %s: %w", n.Name, err)
	}
	return nil
}

// WireEnd holds the addresses of one end of the wire between two cluster
// nodes: the node's own addresses, as other nodes reach it.
type WireEnd struct {
	Addr4, Addr6 netip.Addr
}

// JoinNodes links the cluster nodes a and b with a veth pair, "the wire",
// and routes each node's traffic for the other's pod subnets over it, so that
// the pods of either reach the pods of the other. wire4 and wire6 are the
// wire's subnets (at most /30 and /126): a's end gets their first host, b's
// end the second. The ends are named wire0, wire1, ... in the order JoinNodes
// adds them to a node; they go with the nodes' namespaces.
//
// The pod subnets of a and b and the wire subnets must not overlap. Routes
// are not passed on: a pod reaches the pods of its own node and of the nodes
// joined to it, and a node cannot be joined to two nodes with the same pod
// subnets.
func JoinNodes(a, b *ClusterNode, wire4, wire6 netip.Prefix) (endA, endB WireEnd, err error) {
	defer func() {
		if err != nil {
			err = fmt.Errorf("joining cluster nodes %s and %s: %w", a.Name, b.Name, err)
		}
	}()
	if a == b {
		return WireEnd{}, WireEnd{}, errors.New("a node cannot be joined to itself")
	}
	if err := checkSubnets(wire4, wire6); err != nil {
		return WireEnd{}, WireEnd{}, fmt.Errorf("wire subnets: %w", err)
	}
	nets := []netip.Prefix{a.PodNet4, a.PodNet6, b.PodNet4, b.PodNet6, wire4, wire6}
	for i, p := range nets {
		for _, q := range nets[i+1:] {
			if p.Overlaps(q) {
				return WireEnd{}, WireEnd{}, fmt.Errorf("subnets %v and %v overlap", p, q)
			}
		}
	}
	endA = WireEnd{hostAddr(wire4, 1), hostAddr(wire6, 1)}
	endB = WireEnd{hostAddr(wire4, 2), hostAddr(wire6, 2)}

	ha, err := routeHandle(a.ns)
	if err != nil {
		return WireEnd{}, WireEnd{}, err
	}
	defer ha.Close()
	hb, err := routeHandle(b.ns)
	if err != nil {
		return WireEnd{}, WireEnd{}, err
	}
	defer hb.Close()
	nameA, nameB := a.nextWire(), b.nextWire()
	err = vethPair(
		vethEnd{h: ha, name: nameA, addrs: []netip.Prefix{
			netip.PrefixFrom(endA.Addr4, wire4.Bits()), netip.PrefixFrom(endA.Addr6, wire6.Bits()),
		}},
		vethEnd{h: hb, ns: b.ns, name: nameB, addrs: []netip.Prefix{
			netip.PrefixFrom(endB.Addr4, wire4.Bits()), netip.PrefixFrom(endB.Addr6, wire6.Bits()),
		}})
	if err != nil {
		return WireEnd{}, WireEnd{}, err
	}
	routes := []struct {
		h    *netlink.Handle
		link string
		dst  netip.Prefix
		via  netip.Addr
	}{
		{ha, nameA, b.PodNet4, endB.Addr4},
		{ha, nameA, b.PodNet6, endB.Addr6},
		{hb, nameB, a.PodNet4, endA.Addr4},
		{hb, nameB, a.PodNet6, endA.Addr6},
	}
	for _, r := range routes {
		if err := addRoute(r.h, r.link, r.dst, r.via); err != nil {
			// Deleting the pair deletes the routes added through it.
			// Quick: no traffic went through it yet.
			if derr := ha.LinkDel(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: nameA}}); derr != nil {
				err = errors.Join(err, fmt.Errorf("deleting %s: %w", nameA, derr))
			}
			return WireEnd{}, WireEnd{}, err
		}
	}
	return endA, endB, nil
}

func (n *ClusterNode) nextWire() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	name := fmt.Sprintf("wire%d", n.wires)
	n.wires++
	return name
}

// addRoute adds a route to dst (the zero Prefix: the default route of via's
// family) via the gateway via on link.
func addRoute(h *netlink.Handle, link string, dst netip.Prefix, via netip.Addr) error {
	l, err := h.LinkByName(link)
	if err != nil {
		return fmt.Errorf("finding %s: %w", link, err)
	}
	if !dst.IsValid() {
		dst = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		if via.Is6() {
			dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
	}
	r := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: ipNet(dst), Gw: via.AsSlice()}
	if err := h.RouteAdd(r); err != nil {
		return fmt.Errorf("adding route to %v via %v dev %s: %w", dst, via, link, err)
	}
	return nil
}
