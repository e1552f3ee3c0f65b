package testenv

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net/netip"
	"sync"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/smesh-dev/smesh/pkg/sandbox"
)

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

// NewNode creates a named network namespace with its loopback up.
// Cleanup deletes the namespace.
func NewNode(t testing.TB) *Node {
	t.Helper()
	name := Unique("smesh-test")
	ns, err := sandbox.NewNamedNetns(name)
	// Registered before checking err, should anything be left after all.
	t.Cleanup(func() {
		if ns.IsOpen() {
			ns.Close()
		}
		if err := sandbox.DeleteNamedNetns(name); err != nil {
			t.Errorf("deleting test network namespace: %v", err)
		}
	})
	if err != nil {
		t.Fatalf("creating a test node: %v", err)
	}
	return &Node{Name: name, ns: ns, subnets: make(map[int]bool)}
}

// Do runs fn on an OS thread switched into the node's network namespace and
// returns its error (a panic in fn becomes an error too). fn must not call
// t.Fatal; it returns an error instead.
//
// Sockets keep the namespace they were created in: a listener or connection
// made in fn can be used from any goroutine after Do returns. Goroutines that
// fn starts, however, run in the test's namespace.
func (n *Node) Do(fn func() error) error {
	return sandbox.InNetns(n.ns, fn)
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
	t.Cleanup(func() {
		// Deleting the namespaces deletes the pair, in the background
		// (see sandbox.Veth); only the subnet is ours to give back.
		a.release(subnet)
		b.release(subnet)
	})
	base := binary.BigEndian.Uint32(nodeNet.Addr().AsSlice()) + uint32(subnet)<<(32-linkPrefixLen)
	addrA = addrFromUint32(base + 1)
	addrB = addrFromUint32(base + 2)
	err = sandbox.Veth(a.ns, b.ns, ifA, ifB,
		netip.PrefixFrom(addrA, linkPrefixLen), netip.PrefixFrom(addrB, linkPrefixLen))
	if err != nil {
		t.Fatalf("linking %s and %s: %v", a.Name, b.Name, err)
	}
	return addrA, addrB
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
