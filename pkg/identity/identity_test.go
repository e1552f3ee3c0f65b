package identity

import (
	"context"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestNames(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("smesh.local")
	k, err := Kubernetes(td, "prod", "payments")
	if err != nil || k.String() != "spiffe://smesh.local/ns/prod/sa/payments" {
		t.Fatalf("Kubernetes = %v, %v", k, err)
	}
	if k, _ := Kubernetes(td, "prod", ""); k.String() != "spiffe://smesh.local/ns/prod/sa/default" {
		t.Fatalf("no service account = %v, want the default one", k)
	}
	u, err := Unit(td, "a", "web.service")
	if err != nil || u.String() != "spiffe://smesh.local/node/a/unit/web.service" {
		t.Fatalf("Unit = %v, %v", u, err)
	}
	if _, err := Kubernetes(td, "a/b", "x"); err == nil {
		t.Fatal("a namespace with a slash made an identity")
	}
}

func TestParse(t *testing.T) {
	for _, s := range []string{"spiffe://smesh.local/ns/a/sa/b", "spiffe://td/x"} {
		if _, err := Parse(s); err != nil {
			t.Errorf("Parse(%q): %v", s, err)
		}
	}
	for _, s := range []string{"", "spiffe://", "spiffe://TD/x", "spiffe://td/x/", "spiffe://td//x", "http://td/x", "spiffe://td/x?y"} {
		if id, err := Parse(s); err == nil {
			t.Errorf("Parse(%q) = %v, want an error", s, id)
		}
	}
}

func TestSourceContext(t *testing.T) {
	ctx := context.Background()
	if _, ok := SourceFrom(ctx); ok {
		t.Fatal("an empty context carries a source")
	}
	id := spiffeid.RequireFromString("spiffe://smesh.local/ns/a/sa/b")
	got, ok := SourceFrom(WithSource(ctx, id))
	if !ok || got != id {
		t.Fatalf("SourceFrom = %v, %v", got, ok)
	}
	if _, ok := SourceFrom(WithSource(ctx, spiffeid.ID{})); ok {
		t.Fatal("a zero ID counts as a source")
	}
}
