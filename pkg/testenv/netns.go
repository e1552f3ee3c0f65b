package testenv

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// netnsDir is where named network namespaces are bind-mounted, by
// iproute2 and vishvananda/netns alike.
const netnsDir = "/run/netns"

// Test nodes are addressed from 198.18.0.0/15 (RFC 2544, reserved for
// network benchmarks), cut into 512 /24s; a link gets one of them.
const (
	nodeNetBits   = 15
	linkPrefixLen = 24
	linkSubnets   = 1 << (linkPrefixLen - nodeNetBits)
)

var nodeNet = netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18, 0, 0}), nodeNetBits)

// Node is a test node: a network namespace of its own, named
// smesh-test-<random>, with lo up. Nodes are joined with Link; code runs
// inside one through Do, StartHelper or StartProcess.
type Node struct {
	// Name is the name of the namespace, for `ip netns exec` and for
	// StartHelper and StartProcess.
	Name string

	ns netns.NsHandle // open from NewNode until cleanup

	mu      sync.Mutex
	ifaces  int          // veth ends Link added here; the next is eth<ifaces>
	subnets map[int]bool // /24s of nodeNet on this node's links, by index
}

// NewNode creates a named network namespace and brings its loopback up.
// Cleanup deletes the namespace.
func NewNode(t testing.TB) *Node {
	t.Helper()
	name := Unique("smesh-test")
	ns, err := newNamedNetns(name)
	// Registered before checking err: creation can fail after the
	// bind-mount file exists.
	t.Cleanup(func() {
		if ns.IsOpen() {
			ns.Close()
		}
		if err := deleteNamedNetns(name); err != nil {
			t.Errorf("deleting test network namespace: %v", err)
		}
	})
	if err != nil {
		t.Fatalf("creating test network namespace %s: %v", name, err)
	}
	n := &Node{Name: name, ns: ns, subnets: make(map[int]bool)}

	h, err := n.netlink()
	if err != nil {
		t.Fatalf("node %s: %v", name, err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		t.Fatalf("node %s: bringing lo up: %v", name, err)
	}
	return n
}

// Do runs fn on an OS thread switched into the node's network namespace and
// returns its error (a panic in fn becomes an error too). fn must not call
// t.Fatal; it returns an error instead.
//
// Sockets keep the namespace they were created in: a listener or connection
// made in fn can be used from any goroutine after Do returns. Goroutines that
// fn starts, however, run in the test's namespace.
func (n *Node) Do(fn func() error) error {
	return inNetns(n.ns, fn)
}

// netlink returns a rtnetlink handle whose socket lives in the node's
// namespace, usable from any goroutine.
func (n *Node) netlink() (*netlink.Handle, error) {
	var h *netlink.Handle
	err := n.Do(func() (err error) {
		// Only NETLINK_ROUTE: for a family without a socket of its own,
		// the handle would open one in whatever namespace the calling
		// thread is in.
		h, err = netlink.NewHandle(unix.NETLINK_ROUTE)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("opening rtnetlink: %w", err)
	}
	return h, nil
}

// Link connects nodes a and b with a veth pair and returns the addresses of
// its ends: a /24 of 198.18.0.0/15 not yet used on either node, .1 on a's
// end and .2 on b's. Ends are named eth0, eth1, ... in the order Link adds
// them to a node. Both ends are up when Link returns. Cleanup deletes the
// pair.
func Link(t testing.TB, a, b *Node) (addrA, addrB netip.Addr) {
	t.Helper()
	if a == b {
		t.Fatalf("linking node %s to itself", a.Name)
	}
	subnet, ifA, ifB, err := reserveLink(a, b)
	if err != nil {
		t.Fatalf("linking %s and %s: %v", a.Name, b.Name, err)
	}
	base := binary.BigEndian.Uint32(nodeNet.Addr().AsSlice()) + uint32(subnet)<<(32-linkPrefixLen)
	addrA = addrFromUint32(base + 1)
	addrB = addrFromUint32(base + 2)

	ha, err := a.netlink()
	if err != nil {
		t.Fatalf("linking %s and %s: %v", a.Name, b.Name, err)
	}
	defer ha.Close()
	hb, err := b.netlink()
	if err != nil {
		t.Fatalf("linking %s and %s: %v", a.Name, b.Name, err)
	}
	defer hb.Close()

	// Created inside a with its peer placed straight into b: the pair
	// never appears in the host's namespace, so names only have to be
	// unique per node.
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: ifA},
		PeerName:      ifB,
		PeerNamespace: netlink.NsFd(int(b.ns)),
	}
	if err := ha.LinkAdd(veth); err != nil {
		t.Fatalf("linking %s and %s: adding veth pair: %v", a.Name, b.Name, err)
	}
	t.Cleanup(func() {
		// Deleting the namespaces deletes the pair, and unlike an
		// explicit RTM_DELLINK (which blocks until every route and
		// socket let go of the device, up to a second after TCP traffic)
		// the kernel does that in the background.
		a.release(subnet)
		b.release(subnet)
	})

	for _, end := range []struct {
		h    *netlink.Handle
		node *Node
		name string
		addr netip.Addr
	}{{ha, a, ifA, addrA}, {hb, b, ifB, addrB}} {
		if err := configureLink(end.h, end.name, end.addr); err != nil {
			t.Fatalf("linking %s and %s: node %s: %v", a.Name, b.Name, end.node.Name, err)
		}
	}
	// The kernel turns carrier on in the background (linkwatch, up to a
	// second later) and drops packets until then: a SYN sent right away
	// would cost a 1s retransmission.
	for _, end := range []struct {
		h    *netlink.Handle
		node *Node
		name string
	}{{ha, a, ifA}, {hb, b, ifB}} {
		if err := waitOperUp(end.h, end.name, linkUpTimeout); err != nil {
			t.Fatalf("linking %s and %s: node %s: %v", a.Name, b.Name, end.node.Name, err)
		}
	}
	return addrA, addrB
}

// linkUpTimeout bounds how long Link waits for carrier on a new veth pair.
const linkUpTimeout = 5 * time.Second

func waitOperUp(h *netlink.Handle, name string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		link, err := h.LinkByName(name)
		if err != nil {
			return err
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

func configureLink(h *netlink.Handle, name string, addr netip.Addr) error {
	link, err := h.LinkByName(name)
	if err != nil {
		return err
	}
	ipnet := &net.IPNet{IP: addr.AsSlice(), Mask: net.CIDRMask(linkPrefixLen, 32)}
	if err := h.AddrAdd(link, &netlink.Addr{IPNet: ipnet}); err != nil {
		return fmt.Errorf("adding %s to %s: %w", ipnet, name, err)
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("bringing %s up: %w", name, err)
	}
	return nil
}

// reserveLink picks a /24 free on both nodes and the names of the two ends.
func reserveLink(a, b *Node) (subnet int, ifA, ifB string, err error) {
	// A fixed lock order: Link(a, b) and Link(b, a) may run concurrently.
	first, second := a, b
	if first.Name > second.Name {
		first, second = second, first
	}
	first.mu.Lock()
	defer first.mu.Unlock()
	second.mu.Lock()
	defer second.mu.Unlock()

	var r [2]byte
	_, _ = rand.Read(r[:])
	start := int(binary.BigEndian.Uint16(r[:])) % linkSubnets
	for i := range linkSubnets {
		s := (start + i) % linkSubnets
		if !a.subnets[s] && !b.subnets[s] {
			a.subnets[s], b.subnets[s] = true, true
			ifA, ifB = fmt.Sprintf("eth%d", a.ifaces), fmt.Sprintf("eth%d", b.ifaces)
			a.ifaces++
			b.ifaces++
			return s, ifA, ifB, nil
		}
	}
	return 0, "", "", fmt.Errorf("all %d subnets of %s are in use", linkSubnets, nodeNet)
}

func (n *Node) release(subnet int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.subnets, subnet)
}

func addrFromUint32(v uint32) netip.Addr {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// inNetns runs fn on a locked OS thread switched into the network namespace
// ns, and switches back. The work happens on a goroutine of its own: if
// switching back fails, that goroutine exits without unlocking, and the
// runtime then discards the thread instead of handing a thread in the wrong
// namespace to other goroutines.
func inNetns(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("opening the current network namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			// setns failed: the thread is where it was.
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering network namespace: %w", err)
			return
		}
		fnErr := callRecovered(fn)
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(fnErr, fmt.Errorf("returning to the original network namespace: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- fnErr
	}()
	return <-errc
}

// callRecovered turns a panic in fn into an error, so that inNetns still
// switches the thread back and the panic reaches the test as a failure.
func callRecovered(fn func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("panic: %v\n%s", r, debug.Stack())
		}
	}()
	return fn()
}

// newNamedNetns creates the network namespace name, bind-mounted below
// netnsDir, and returns a handle to it. The caller's thread is untouched.
func newNamedNetns(name string) (netns.NsHandle, error) {
	type result struct {
		ns  netns.NsHandle
		err error
	}
	res := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			res <- result{netns.None(), fmt.Errorf("opening the current network namespace: %w", err)}
			return
		}
		defer orig.Close()
		// NewNamed unshares this thread into the new namespace (also
		// when it fails later on) and leaves it there.
		ns, err := netns.NewNamed(name)
		if rerr := netns.Set(orig); rerr != nil {
			// Stay locked: see inNetns.
			if err == nil {
				ns.Close()
			}
			res <- result{netns.None(), errors.Join(err, fmt.Errorf("returning to the original network namespace: %w", rerr))}
			return
		}
		runtime.UnlockOSThread()
		res <- result{ns, err}
	}()
	r := <-res
	return r.ns, r.err
}

// deleteNamedNetns removes whatever newNamedNetns(name) left: the bind mount
// and the file it is mounted on. The namespace itself is gone once nothing
// else (a process, a socket) holds it.
func deleteNamedNetns(name string) error {
	path := filepath.Join(netnsDir, name)
	// EINVAL: not (or no longer) a mount point.
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil &&
		!errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmounting %s: %w", path, err)
	}
	if err := unix.Unlink(path); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("removing %s: %w", path, err)
	}
	return nil
}
