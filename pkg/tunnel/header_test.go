package tunnel

import (
	"bytes"
	"errors"
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestHeaderRoundTrip(t *testing.T) {
	for _, s := range []string{"10.0.2.2:80", "198.18.0.2:65535", "127.0.0.1:1", "[2001:db8::1]:443", "[::1]:8080"} {
		dst := netip.MustParseAddrPort(s)
		h, err := AppendHeader(nil, dst)
		if err != nil {
			t.Fatalf("%s: %v", s, err)
		}
		if len(h) != HeaderSize {
			t.Fatalf("%s: header is %d bytes, want %d", s, len(h), HeaderSize)
		}
		got, err := ParseHeader(h)
		if err != nil || got != dst {
			t.Errorf("%s: parsed %v, %v", s, got, err)
		}
	}
}

// TestHeaderLayout pins the wire format: other implementations follow it.
func TestHeaderLayout(t *testing.T) {
	h, err := AppendHeader(nil, netip.MustParseAddrPort("10.1.2.3:8080"))
	if err != nil {
		t.Fatal(err)
	}
	want := []byte{'S', 'M', 'S', 'H', 1, 4, 0x1f, 0x90, 10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	if !bytes.Equal(h, want) {
		t.Errorf("header\n got % x\nwant % x", h, want)
	}
	st := AppendStatus(nil, Status{Reason: ReasonNotLocal})
	if want := []byte{'S', 'M', 'S', 'H', 1, 1, 5, 0}; !bytes.Equal(st, want) {
		t.Errorf("status\n got % x\nwant % x", st, want)
	}
	if st := AppendStatus(nil, Status{OK: true}); !bytes.Equal(st, []byte{'S', 'M', 'S', 'H', 1, 0, 0, 0}) {
		t.Errorf("ok status: % x", st)
	}
}

func TestHeaderRefusals(t *testing.T) {
	valid, _ := AppendHeader(nil, netip.MustParseAddrPort("10.1.2.3:8080"))
	mod := func(f func(h []byte) []byte) []byte {
		return f(append([]byte(nil), valid...))
	}
	cases := []struct {
		name string
		h    []byte
		want Reason
	}{
		{"empty", nil, ReasonTruncatedHeader},
		{"truncated", valid[:HeaderSize-1], ReasonTruncatedHeader},
		{"oversized", append(append([]byte(nil), valid...), 0), ReasonOversizedHeader},
		{"bad magic", mod(func(h []byte) []byte { h[0] = 'X'; return h }), ReasonBadMagic},
		{"plaintext HTTP", []byte("GET / HTTP/1.1\r\nHost: xy"), ReasonBadMagic},
		{"version 0", mod(func(h []byte) []byte { h[4] = 0; return h }), ReasonUnsupportedVersion},
		{"version 2", mod(func(h []byte) []byte { h[4] = 2; return h }), ReasonUnsupportedVersion},
		{"family 5", mod(func(h []byte) []byte { h[5] = 5; return h }), ReasonBadHeader},
		{"IPv4 padding", mod(func(h []byte) []byte { h[20] = 1; return h }), ReasonBadHeader},
		{"port 0", mod(func(h []byte) []byte { h[6], h[7] = 0, 0; return h }), ReasonBadHeader},
		{"0.0.0.0", mod(func(h []byte) []byte { copy(h[8:12], []byte{0, 0, 0, 0}); return h }), ReasonBadHeader},
		{"broadcast", mod(func(h []byte) []byte { copy(h[8:12], []byte{255, 255, 255, 255}); return h }), ReasonBadHeader},
		{"multicast", mod(func(h []byte) []byte { copy(h[8:12], []byte{224, 0, 0, 1}); return h }), ReasonBadHeader},
		{"IPv6 unspecified", mod(func(h []byte) []byte { h[5] = 6; clear(h[8:]); return h }), ReasonBadHeader},
		{"IPv4-mapped IPv6", mod(func(h []byte) []byte {
			h[5] = 6
			m := netip.MustParseAddr("::ffff:10.1.2.3").As16()
			copy(h[8:], m[:])
			return h
		}), ReasonBadHeader},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dst, err := ParseHeader(c.h)
			var he *HeaderError
			if !errors.As(err, &he) {
				t.Fatalf("parsed %v, %v: want a HeaderError", dst, err)
			}
			if he.Reason != c.want {
				t.Errorf("reason %s, want %s (%v)", he.Reason, c.want, err)
			}
		})
	}
}

func TestAppendHeaderRejects(t *testing.T) {
	for _, dst := range []netip.AddrPort{
		{},
		netip.MustParseAddrPort("10.0.0.1:0"),
		netip.MustParseAddrPort("0.0.0.0:80"),
		netip.MustParseAddrPort("[::ffff:10.0.0.1]:80"),
	} {
		if h, err := AppendHeader(nil, dst); err == nil {
			t.Errorf("AppendHeader(%v) = % x, want an error", dst, h)
		}
	}
}

func TestStatus(t *testing.T) {
	for _, s := range []Status{{OK: true}, {Reason: ReasonNotLocal}, {Reason: ReasonTooManyConnections}, {Reason: Reason(200)}} {
		got, err := ParseStatus(AppendStatus(nil, s))
		if err != nil || got != s {
			t.Errorf("%+v: parsed %+v, %v", s, got, err)
		}
	}
	bad := [][]byte{
		nil,
		[]byte("HTTP/1.1"),
		{'S', 'M', 'S', 'H', 2, 0, 0, 0},
		{'S', 'M', 'S', 'H', 1, 0, 5, 0}, // ok with a reason
		{'S', 'M', 'S', 'H', 1, 1, 0, 0}, // refused without one
		{'S', 'M', 'S', 'H', 1, 2, 0, 0},
		{'S', 'M', 'S', 'H', 1, 0, 0, 1},
	}
	for _, b := range bad {
		if s, err := ParseStatus(b); err == nil {
			t.Errorf("ParseStatus(% x) = %+v, want an error", b, s)
		}
	}
}

func TestReasonNames(t *testing.T) {
	seen := map[string]bool{}
	for _, r := range Reasons() {
		name := r.String()
		for _, c := range name {
			if (c < 'a' || c > 'z') && c != '_' {
				t.Errorf("reason %d name %q is not snake_case", r, name)
			}
		}
		if seen[name] {
			t.Errorf("reason name %q used twice", name)
		}
		seen[name] = true
	}
	if got := Reason(99).String(); got != "reason_99" {
		t.Errorf("unknown reason reads %q", got)
	}
}

// FuzzParseHeader: any input either parses to a destination that encodes
// back to exactly the input, or is refused with a HeaderError; never a
// panic.
func FuzzParseHeader(f *testing.F) {
	for _, s := range []string{"10.0.2.2:80", "[2001:db8::1]:443"} {
		h, _ := AppendHeader(nil, netip.MustParseAddrPort(s))
		f.Add(h)
	}
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Add([]byte{0x16, 3, 1, 0, 0xff})
	f.Fuzz(func(t *testing.T, h []byte) {
		dst, err := ParseHeader(h)
		if err != nil {
			var he *HeaderError
			if !errors.As(err, &he) || he.Reason == ReasonNone {
				t.Fatalf("error without a reason: %v", err)
			}
			return
		}
		back, err := AppendHeader(nil, dst)
		if err != nil {
			t.Fatalf("parsed %v, which does not encode: %v", dst, err)
		}
		if !bytes.Equal(back, h) {
			t.Fatalf("parsed %v from % x, which encodes as % x", dst, h, back)
		}
	})
}

// FuzzParseStatus: a status parses to something that encodes back to the
// input, or is an error.
func FuzzParseStatus(f *testing.F) {
	f.Add(AppendStatus(nil, Status{OK: true}))
	f.Add(AppendStatus(nil, Status{Reason: ReasonNotLocal}))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ParseStatus(b)
		if err != nil {
			return
		}
		if back := AppendStatus(nil, s); !bytes.Equal(back, b) {
			t.Fatalf("parsed %+v from % x, which encodes as % x", s, b, back)
		}
	})
}

var testTD = spiffeid.RequireTrustDomainFromString("test.local")

func TestHeaderV3RoundTrip(t *testing.T) {
	w := spiffeid.RequireFromString("spiffe://test.local/ns/prod/sa/payments")
	for _, h := range []Header{
		{Dst: netip.MustParseAddrPort("10.0.2.2:80")},
		{Dst: netip.MustParseAddrPort("10.0.2.2:80"), Workload: w},
		{Dst: netip.MustParseAddrPort("10.0.2.2:80"), SrcAddr: netip.MustParseAddr("10.0.1.7")},
		{Dst: netip.MustParseAddrPort("[2001:db8::1]:443"), Workload: w, SrcAddr: netip.MustParseAddr("fd00:5e::7")},
	} {
		b, err := AppendHeaderV3(nil, h)
		if err != nil {
			t.Fatalf("%+v: %v", h, err)
		}
		want := HeaderSizeV3
		if !h.Workload.IsZero() {
			want += len(h.Workload.String())
		}
		if len(b) != want {
			t.Errorf("%+v: %d bytes, want %d", h, len(b), want)
		}
		got, err := ParseHeaderV3(b, testTD)
		if err != nil || got != h {
			t.Errorf("%+v: parsed %+v, %v", h, got, err)
		}
	}
}

// TestHeaderV3Layout pins the v3 wire format.
func TestHeaderV3Layout(t *testing.T) {
	b, err := AppendHeaderV3(nil, Header{
		Dst:      netip.MustParseAddrPort("10.1.2.3:8080"),
		Workload: spiffeid.RequireFromString("spiffe://t/a"),
		SrcAddr:  netip.MustParseAddr("10.9.8.7"),
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []byte{'S', 'M', 'S', 'H', 3, 4, 0x1f, 0x90, 10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
		4, 0, 0, 12, 10, 9, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	want = append(want, "spiffe://t/a"...)
	if !bytes.Equal(b, want) {
		t.Errorf("header\n got % x\nwant % x", b, want)
	}
	// An old server reads magic and version where they always were.
	if _, err := ParseHeader(b[:HeaderSize]); err == nil || err.(*HeaderError).Reason != ReasonUnsupportedVersion {
		t.Errorf("v1 parser on a v3 header: %v, want unsupported_version", err)
	}
}

func TestHeaderV3Refusals(t *testing.T) {
	valid, _ := AppendHeaderV3(nil, Header{
		Dst:      netip.MustParseAddrPort("10.1.2.3:8080"),
		Workload: spiffeid.RequireFromString("spiffe://test.local/ns/a/sa/b"),
		SrcAddr:  netip.MustParseAddr("10.9.8.7"),
	})
	noSrc, _ := AppendHeaderV3(nil, Header{Dst: netip.MustParseAddrPort("10.1.2.3:8080")})
	mod := func(base []byte, f func(h []byte) []byte) []byte {
		return f(append([]byte(nil), base...))
	}
	withID := func(id string) []byte {
		h := append([]byte(nil), noSrc...)
		h[26], h[27] = byte(len(id)>>8), byte(len(id))
		return append(h, id...)
	}
	cases := []struct {
		name string
		h    []byte
		want Reason
	}{
		{"empty", nil, ReasonTruncatedHeader},
		{"fixed part short", valid[:HeaderSizeV3-1], ReasonTruncatedHeader},
		{"ID short", valid[:len(valid)-1], ReasonTruncatedHeader},
		{"oversized", append(append([]byte(nil), valid...), 0), ReasonOversizedHeader},
		{"version 2", mod(valid, func(h []byte) []byte { h[4] = 2; return h }), ReasonUnsupportedVersion},
		{"bad magic", mod(valid, func(h []byte) []byte { h[1] = 'X'; return h }), ReasonBadMagic},
		{"dst port 0", mod(valid, func(h []byte) []byte { h[6], h[7] = 0, 0; return h }), ReasonBadHeader},
		{"reserved", mod(valid, func(h []byte) []byte { h[25] = 1; return h }), ReasonBadHeader},
		{"src family 5", mod(valid, func(h []byte) []byte { h[24] = 5; return h }), ReasonBadHeader},
		{"src IPv4 padding", mod(valid, func(h []byte) []byte { h[40] = 1; return h }), ReasonBadHeader},
		{"no src with bytes", mod(valid, func(h []byte) []byte { h[24] = 0; return h }), ReasonBadHeader},
		{"src unspecified", mod(valid, func(h []byte) []byte { clear(h[28:32]); return h }), ReasonBadHeader},
		{"src IPv4-mapped", mod(valid, func(h []byte) []byte {
			h[24] = 6
			m := netip.MustParseAddr("::ffff:10.1.2.3").As16()
			copy(h[28:44], m[:])
			return h
		}), ReasonBadHeader},
		{"ID too long", mod(noSrc, func(h []byte) []byte { h[26], h[27] = 0x08, 0x01; return h }), ReasonBadHeader},
		{"ID not SPIFFE", withID("https://test.local/a"), ReasonBadHeader},
		{"ID not canonical", withID("spiffe://TEST.local/a"), ReasonBadHeader},
		{"ID without path", withID("spiffe://test.local"), ReasonBadHeader},
		{"ID in another trust domain", withID("spiffe://other.local/ns/a/sa/b"), ReasonIdentityNotOnNode},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h, err := ParseHeaderV3(c.h, testTD)
			var he *HeaderError
			if !errors.As(err, &he) {
				t.Fatalf("parsed %+v, %v: want a HeaderError", h, err)
			}
			if he.Reason != c.want {
				t.Errorf("reason %s, want %s (%v)", he.Reason, c.want, err)
			}
		})
	}
}

// FuzzParseHeaderV3: any input either parses to a header that encodes back
// to exactly the input, or is refused with a HeaderError; never a panic.
func FuzzParseHeaderV3(f *testing.F) {
	for _, h := range []Header{
		{Dst: netip.MustParseAddrPort("10.0.2.2:80")},
		{Dst: netip.MustParseAddrPort("[2001:db8::1]:443"), Workload: spiffeid.RequireFromString("spiffe://test.local/ns/a/sa/b"),
			SrcAddr: netip.MustParseAddr("10.0.1.2")},
	} {
		b, _ := AppendHeaderV3(nil, h)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseHeaderV3(b, testTD)
		if err != nil {
			var he *HeaderError
			if !errors.As(err, &he) || he.Reason == ReasonNone {
				t.Fatalf("error without a reason: %v", err)
			}
			return
		}
		back, err := AppendHeaderV3(nil, h)
		if err != nil {
			t.Fatalf("parsed %+v, which does not encode: %v", h, err)
		}
		if !bytes.Equal(back, b) {
			t.Fatalf("parsed %+v from % x, which encodes as % x", h, b, back)
		}
	})
}
