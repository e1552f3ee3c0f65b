package identity

import (
	"context"
	"net/netip"
	"testing"
)

func TestSourceAddr(t *testing.T) {
	if a, ok := SourceAddrFrom(context.Background()); ok {
		t.Errorf("empty context carries %s", a)
	}
	for in, want := range map[string]string{
		"10.0.1.7":          "10.0.1.7",
		"::ffff:10.0.1.7":   "10.0.1.7",
		"fe80::1%eth0":      "fe80::1",
		"fd00:5e::7":        "fd00:5e::7",
		"0.0.0.0":           "",
		"::":                "",
		"::ffff:0.0.0.0":    "",
		"2001:db8::1%lo":    "2001:db8::1",
		"198.18.0.1":        "198.18.0.1",
		"::ffff:198.18.0.1": "198.18.0.1",
	} {
		a, ok := SourceAddrFrom(WithSourceAddr(context.Background(), netip.MustParseAddr(in)))
		if want == "" {
			if ok {
				t.Errorf("%s: carried as %s", in, a)
			}
			continue
		}
		if !ok || a != netip.MustParseAddr(want) {
			t.Errorf("%s: %s, %v, want %s", in, a, ok, want)
		}
	}
	if _, ok := SourceAddrFrom(WithSourceAddr(context.Background(), netip.Addr{})); ok {
		t.Error("an invalid address is carried")
	}
}
