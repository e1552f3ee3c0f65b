package identity

import (
	"hash/fnv"
	"sync"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// The numbers the BPF programs know identities by (bpf/connect/identity.h).
const (
	// Unknown is no identity: a caller no workload cgroup names.
	Unknown uint32 = 0
	// Node is the node itself (smeshd's own connections).
	Node uint32 = 1
)

// Numbers gives each identity name of this node the number (a __u32) the
// BPF programs know it by. Numbers never leave the node, but they outlive
// a smeshd: a connection captured by one smeshd carries its source number
// in the kernel (smesh_src_ids) and is answered by the next after a
// hand-over, and the policy a predecessor compiled stays in force until the
// successor writes its own. So the same name must get the same number in a
// successor:
//
//   - By default a name's number is derived from the name alone (FNV-1a,
//     32 bits, 0 and 1 skipped), which any smeshd computes alike with no
//     state to carry.
//   - Two names of one node may collide (about 1 in 10,000 for 1,000
//     names); the later one takes the next free number, which depends on
//     the order names came in. To keep those too, a successor first Adopts
//     what its predecessor wrote (the cgroup -> number entries of the
//     handed-over smesh_identity, matched with the names it sees for those
//     cgroups) before it numbers anything new.
//
// A number stays assigned while its name is kept (Keep).
type Numbers struct {
	mu     sync.Mutex
	node   spiffeid.ID
	byName map[spiffeid.ID]uint32
	byNum  map[uint32]spiffeid.ID
}

// NewNumbers returns the numbering of a node whose own identity is node
// (number Node).
func NewNumbers(node spiffeid.ID) *Numbers {
	return &Numbers{
		node:   node,
		byName: make(map[spiffeid.ID]uint32),
		byNum:  make(map[uint32]spiffeid.ID),
	}
}

// derived is the number a name gets when nothing else has it.
func derived(id spiffeid.ID) uint32 {
	h := fnv.New32a()
	h.Write([]byte(id.String()))
	return h.Sum32()
}

// Adopt gives id the number num, as a predecessor had it; false (and no
// change) when num is reserved or taken by another name, or id already has
// a number.
func (n *Numbers) Adopt(id spiffeid.ID, num uint32) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if num == Unknown || num == Node || id.IsZero() {
		return false
	}
	if have, ok := n.byName[id]; ok {
		return have == num
	}
	if _, taken := n.byNum[num]; taken {
		return false
	}
	n.byName[id] = num
	n.byNum[num] = id
	return true
}

// Number is id's number, given now if it has none: the node's own identity
// is Node, a zero id Unknown.
func (n *Numbers) Number(id spiffeid.ID) uint32 {
	if id.IsZero() {
		return Unknown
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if id == n.node {
		return Node
	}
	if num, ok := n.byName[id]; ok {
		return num
	}
	num := derived(id)
	for {
		if _, taken := n.byNum[num]; !taken && num != Unknown && num != Node {
			break
		}
		num++
	}
	n.byName[id] = num
	n.byNum[num] = id
	return num
}

// Name is the identity number num stands for.
func (n *Numbers) Name(num uint32) (spiffeid.ID, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if num == Node && !n.node.IsZero() {
		return n.node, true
	}
	id, ok := n.byNum[num]
	return id, ok
}

// Keep forgets the numbers of every name but those in keep. A name
// forgotten and seen again gets its derived number again unless another
// name took it meanwhile.
func (n *Numbers) Keep(keep map[spiffeid.ID]bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for id, num := range n.byName {
		if !keep[id] {
			delete(n.byName, id)
			delete(n.byNum, num)
		}
	}
}
