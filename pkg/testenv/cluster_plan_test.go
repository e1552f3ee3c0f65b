package testenv

import (
	"net/netip"
	"testing"
)

func TestClusterAddressPlan(t *testing.T) {
	c := NewCluster()
	if got, want := c.subnet4(0), netip.MustParsePrefix("198.18.0.0/24"); got != want {
		t.Errorf("subnet4(0) = %v, want %v", got, want)
	}
	if got, want := c.subnet4(linkSubnets-1), netip.MustParsePrefix("198.19.255.0/24"); got != want {
		t.Errorf("subnet4(%d) = %v, want %v", linkSubnets-1, got, want)
	}
	six := c.subnet6(0x1ff)
	if b := six.Addr().As16(); six.Bits() != 64 || !clusterNet6.Contains(six.Addr()) ||
		uint16(b[4])<<8|uint16(b[5]) != c.tag || b[6] != 0x01 || b[7] != 0xff {
		t.Errorf("subnet6(0x1ff) = %v, want fd00:5e:%x:1ff::/64", six, c.tag)
	}

	// Every /24 once, then no more.
	seen := make(map[int]bool)
	for range linkSubnets {
		s, err := c.reserve()
		if err != nil {
			t.Fatalf("after %d subnets: %v", len(seen), err)
		}
		if seen[s] || s < 0 || s >= linkSubnets {
			t.Fatalf("reserve() = %d, after %d subnets", s, len(seen))
		}
		seen[s] = true
	}
	if s, err := c.reserve(); err == nil {
		t.Errorf("reserve() with all subnets in use = %d, want an error", s)
	}
	c.release(7)
	if s, err := c.reserve(); err != nil || s != 7 {
		t.Errorf("reserve() after release(7) = %d, %v; want 7", s, err)
	}
}
