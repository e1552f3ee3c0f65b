package testenv

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/smesh-dev/smesh/pkg/cgroups"
	"github.com/smesh-dev/smesh/pkg/sandbox"
)

// The IPv6 side of the address plan: fd00:5e::/32 (a ULA prefix), cut into
// one /48 per cluster, fd00:5e:<random>::/48, and that into the /64s
// fd00:5e:<random>:<i>::/64 that go with the IPv4 /24 number i of nodeNet.
// IPv4 has too few subnets to tell clusters apart; IPv6 tells them apart
// (with 65536 random choices) so that addresses seen in a capture or a log
// say which world they are from. Worlds need no distinct subnets to work:
// each lives in namespaces of its own, which no other world's reach.
const subnet6Len = 64

var clusterNet6 = netip.MustParsePrefix("fd00:5e::/32")

// Cluster is a test world that looks like a Kubernetes cluster: nodes with
// pods on a bridge each (see sandbox.ClusterNode), whose pods reach each
// other across the nodes joined with JoinNodes.
//
// A cluster hands out the subnets of its nodes: every pod subnet and every
// wire gets a /24 of 198.18.0.0/15 and the matching /64 of the cluster's
// /48 of fd00:5e::/32 that no other node or wire of the cluster has, at
// random (only a twin, see Twin, shares its pod subnets on purpose). Nodes of
// different clusters may get the same subnets; they cannot be joined.
type Cluster struct {
	tag uint16 // the cluster's /48: fd00:5e:<tag>::/48

	mu    sync.Mutex
	used  map[int]int // /24s of nodeNet given to pod subnets and wires, with a count of their users
	nodes []*ClusterNode
}

// NewCluster returns a cluster without nodes.
func NewCluster() *Cluster {
	var b [2]byte
	_, _ = rand.Read(b[:])
	return &Cluster{tag: binary.BigEndian.Uint16(b[:]), used: make(map[int]int)}
}

// ClusterNode is a node of a test cluster: a Node (so Name, Do, StartHelper
// and StartProcess work as for any node, and Link takes n.Node) whose
// namespace holds the pods' bridge, br0, and forwards IPv4 and IPv6.
type ClusterNode struct {
	*Node
	// PodNet4 and PodNet6 are the node's pod subnets, a /24 and a /64.
	PodNet4, PodNet6 netip.Prefix
	// Gateway4 and Gateway6 are the bridge's addresses, the pods' default
	// gateways: the first host of each pod subnet.
	Gateway4, Gateway6 netip.Addr

	cluster *Cluster
	subnet  int // the /24 of nodeNet of PodNet4
	sn      *sandbox.ClusterNode
}

// NewClusterNode returns the one node of a new cluster, for tests that need
// pods on one node only.
func NewClusterNode(t testing.TB) *ClusterNode {
	t.Helper()
	return NewCluster().AddNode(t)
}

// AddNode adds a node to the cluster, with pod subnets of its own. Cleanup
// deletes it, and its pods.
func (c *Cluster) AddNode(t testing.TB) *ClusterNode {
	t.Helper()
	subnet, err := c.reserve()
	if err != nil {
		t.Fatalf("adding a cluster node: %v", err)
	}
	return c.addNode(t, subnet)
}

// Twin adds a node to n's cluster with n's pod subnets: its pods get the
// addresses of n's pods, in the same order (see sandbox.ClusterNode.AddPod).
// It is for tests that two pods with the same address, in two network
// namespaces, never get each other's traffic. A twin cannot be joined to n,
// nor to a node joined to n.
func (n *ClusterNode) Twin(t testing.TB) *ClusterNode {
	t.Helper()
	c := n.cluster
	c.mu.Lock()
	c.used[n.subnet]++
	c.mu.Unlock()
	return c.addNode(t, n.subnet)
}

// addNode creates a node with the pod subnets of /24 number subnet, which
// the caller reserved.
func (c *Cluster) addNode(t testing.TB, subnet int) *ClusterNode {
	t.Helper()
	name := Unique("smesh-test")
	sn, err := sandbox.NewClusterNode(name, c.subnet4(subnet), c.subnet6(subnet))
	if err != nil {
		c.release(subnet)
		t.Fatalf("adding a cluster node: %v", err)
	}
	n := &ClusterNode{
		Node:     &Node{Name: name, ns: sn.Netns(), subnets: map[int]bool{subnet: true}},
		PodNet4:  sn.PodNet4,
		PodNet6:  sn.PodNet6,
		Gateway4: sn.Gateway4(),
		Gateway6: sn.Gateway6(),
		cluster:  c,
		subnet:   subnet,
		sn:       sn,
	}
	c.mu.Lock()
	c.nodes = append(c.nodes, n)
	c.mu.Unlock()
	t.Cleanup(func() {
		// Also deletes the pods left, should a pod's own cleanup not
		// have run.
		if err := sn.Close(); err != nil {
			t.Errorf("deleting cluster node: %v", err)
		}
		c.release(subnet)
	})
	return n
}

// reserve picks a /24 of nodeNet that no pod subnet or wire of the cluster
// and no Link of its nodes uses.
func (c *Cluster) reserve() (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	taken := make(map[int]bool)
	for s := range c.used {
		taken[s] = true
	}
	for _, n := range c.nodes {
		n.mu.Lock()
		for s := range n.subnets {
			taken[s] = true
		}
		n.mu.Unlock()
	}
	var r [2]byte
	_, _ = rand.Read(r[:])
	start := int(binary.BigEndian.Uint16(r[:])) % linkSubnets
	for i := range linkSubnets {
		s := (start + i) % linkSubnets
		if !taken[s] {
			c.used[s]++
			return s, nil
		}
	}
	return 0, fmt.Errorf("all %d subnets of %s are in use in the cluster", linkSubnets, nodeNet)
}

func (c *Cluster) release(subnet int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.used[subnet]--; c.used[subnet] <= 0 {
		delete(c.used, subnet)
	}
}

// subnet4 returns /24 number subnet of 198.18.0.0/15.
func (c *Cluster) subnet4(subnet int) netip.Prefix {
	base := binary.BigEndian.Uint32(nodeNet.Addr().AsSlice()) + uint32(subnet)<<(32-linkPrefixLen)
	return netip.PrefixFrom(addrFromUint32(base), linkPrefixLen)
}

// subnet6 returns the /64 that goes with subnet4(subnet):
// fd00:5e:<tag>:<subnet>::/64.
func (c *Cluster) subnet6(subnet int) netip.Prefix {
	b := clusterNet6.Addr().As16()
	binary.BigEndian.PutUint16(b[4:], c.tag)
	binary.BigEndian.PutUint16(b[6:], uint16(subnet))
	return netip.PrefixFrom(netip.AddrFrom16(b), subnet6Len)
}

// JoinNodes links the cluster nodes a and b with a veth pair, "the wire",
// and routes each node's traffic for the other's pod subnets over it, so that
// their pods reach each other, over IPv4 and IPv6. The wire gets a /24 and a
// /64 of its own; it returns the addresses of a's end and b's end. a and b
// must be nodes of the same cluster. Cleanup gives the subnets back; the wire
// goes with the nodes.
func JoinNodes(t testing.TB, a, b *ClusterNode) (endA, endB sandbox.WireEnd) {
	t.Helper()
	if a.cluster != b.cluster {
		t.Fatalf("joining cluster nodes %s and %s: they are nodes of different clusters", a.Name, b.Name)
	}
	c := a.cluster
	wire, err := c.reserve()
	if err != nil {
		t.Fatalf("joining cluster nodes %s and %s: %v", a.Name, b.Name, err)
	}
	// Each node now has routes for the wire and for the other's pods:
	// keep Link from using them on either.
	a.reserveAll(wire, b.subnet)
	b.reserveAll(wire, a.subnet)
	t.Cleanup(func() {
		a.release(wire)
		a.release(b.subnet)
		b.release(wire)
		b.release(a.subnet)
		c.release(wire)
	})
	endA, endB, err = sandbox.JoinNodes(a.sn, b.sn, c.subnet4(wire), c.subnet6(wire))
	if err != nil {
		t.Fatal(err)
	}
	return endA, endB
}

func (n *Node) reserveAll(subnets ...int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, s := range subnets {
		n.subnets[s] = true
	}
}

// Pod is a pod on a cluster node: a network namespace of its own with eth0
// on the node's bridge, and a cgroup of its own.
type Pod struct {
	// Name is the name of the pod's network namespace, for `ip netns
	// exec` and for StartHelper and StartProcess, and the base name of its
	// cgroup.
	Name string
	// Cgroup is the pod's cgroup: start the pod's processes in it.
	Cgroup string
	// Addr4 and Addr6 are the pod's addresses, on eth0.
	Addr4, Addr6 netip.Addr

	sp *sandbox.Pod
}

// AddPod creates a pod on the node: a network namespace and a cgroup, both
// named smesh-test-<random>, the cgroup below parentCgroup ("" for directly
// below the cgroup v2 mount), and eth0, plugged into the node's bridge, with
// the next free address of each pod subnet (see sandbox.ClusterNode.AddPod)
// and default routes via the gateways. Pass an enrolled cgroup as
// parentCgroup to put the pod in the mesh. Cleanup deletes the pod, as Delete
// does.
func (n *ClusterNode) AddPod(t testing.TB, parentCgroup string) *Pod {
	t.Helper()
	if parentCgroup == "" {
		mount, err := cgroups.Mount()
		if err != nil {
			t.Fatalf("adding a pod: %v", err)
		}
		parentCgroup = mount
	}
	return n.AddPodAt(t, filepath.Join(parentCgroup, Unique("smesh-test")))
}

// AddPodAt is AddPod with the pod's cgroup at the path cgroup, whose parent
// must exist (for pods named as a kubelet names them); the network namespace
// is named smesh-test-<random>, the base name of cgroup if it is one.
func (n *ClusterNode) AddPodAt(t testing.TB, cgroup string) *Pod {
	t.Helper()
	name := filepath.Base(cgroup)
	if !strings.HasPrefix(name, "smesh-test-") {
		name = Unique("smesh-test")
	}
	sp, err := n.sn.AddPod(name, cgroup)
	if err != nil {
		t.Fatal(err)
	}
	p := &Pod{Name: sp.Name, Cgroup: sp.Cgroup, Addr4: sp.Addr4, Addr6: sp.Addr6, sp: sp}
	t.Cleanup(func() {
		if err := sp.Delete(); err != nil {
			t.Errorf("deleting pod: %v", err)
		}
	})
	return p
}

// Do runs fn on an OS thread switched into the pod's network namespace, as
// Node.Do does for a node.
func (p *Pod) Do(fn func() error) error {
	return sandbox.InNetns(p.sp.Netns(), fn)
}

// Delete deletes the pod while the test goes on, as a pod is deleted in a
// cluster: it kills every process in the pod's cgroup, removes the cgroup
// and the network namespace, and with it eth0 and its bridge port, once
// nothing else holds the namespace (see sandbox.Pod.Delete). Deleting a
// deleted pod does nothing.
func (p *Pod) Delete(t testing.TB) {
	t.Helper()
	if err := p.sp.Delete(); err != nil {
		t.Fatal(err)
	}
}
