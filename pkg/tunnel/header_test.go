package tunnel

import (
	"bytes"
	"errors"
	"net/netip"
	"testing"
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
