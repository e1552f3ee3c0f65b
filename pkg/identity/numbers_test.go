package identity

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestNumbersStableAcrossSuccessors(t *testing.T) {
	node := spiffeid.RequireFromString("spiffe://smesh.local/node/a")
	a := spiffeid.RequireFromString("spiffe://smesh.local/ns/prod/sa/payments")
	b := spiffeid.RequireFromString("spiffe://smesh.local/ns/prod/sa/web")
	pre, succ := NewNumbers(node), NewNumbers(node)
	na, nb := pre.Number(a), pre.Number(b)
	// Another order in the successor: derived numbers are the same.
	if succ.Number(b) != nb || succ.Number(a) != na {
		t.Errorf("numbers differ in a successor: %d %d, want %d %d", succ.Number(a), succ.Number(b), na, nb)
	}
	if na == nb || na < 2 || nb < 2 {
		t.Errorf("numbers %d %d: want distinct and not reserved", na, nb)
	}
	if pre.Number(node) != Node {
		t.Errorf("the node's own identity is %d, want %d", pre.Number(node), Node)
	}
	if id, ok := pre.Name(na); !ok || id != a {
		t.Errorf("Name(%d) = %v %v, want %v", na, id, ok, a)
	}
	if _, ok := pre.Name(12345); ok && derived(a) != 12345 && derived(b) != 12345 {
		t.Error("a number nobody has names something")
	}
}

func TestNumbersCollisionAdopted(t *testing.T) {
	a := spiffeid.RequireFromString("spiffe://smesh.local/ns/prod/sa/payments")
	b := spiffeid.RequireFromString("spiffe://smesh.local/ns/prod/sa/web")
	pre := NewNumbers(spiffeid.ID{})
	// b takes a's derived number (as a collision would make it), a moves
	// on.
	if !pre.Adopt(b, derived(a)) {
		t.Fatal("adopting a free number failed")
	}
	na := pre.Number(a)
	if na == derived(a) {
		t.Fatal("a collision kept the taken number")
	}
	// A successor that adopts the predecessor's numbers keeps both, in
	// whatever order it sees them.
	succ := NewNumbers(spiffeid.ID{})
	if !succ.Adopt(a, na) || !succ.Adopt(b, derived(a)) {
		t.Fatal("adopting the predecessor's numbers failed")
	}
	if succ.Number(a) != na || succ.Number(b) != derived(a) {
		t.Errorf("successor: %d %d, want %d %d", succ.Number(a), succ.Number(b), na, derived(a))
	}
	if succ.Adopt(a, 77) || succ.Adopt(spiffeid.RequireFromString("spiffe://smesh.local/x"), na) || succ.Adopt(b, Node) {
		t.Error("Adopt took a second number, a taken one or a reserved one")
	}
	succ.Keep(map[spiffeid.ID]bool{a: true})
	if _, ok := succ.Name(derived(a)); ok {
		t.Error("Keep kept a name not in the set")
	}
}
