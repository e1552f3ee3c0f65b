package tunnel

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// Wire protocols v1 and v2. Which one a TLS connection speaks is chosen in
// its handshake, by ALPN: a client of this version offers "smesh/2", and a
// server of this version that is offered it accepts it; anything else (a
// peer of an older version, which knows no ALPN, or a plaintext tunnel)
// speaks v1. So a node of this version talks to an older one in v1, and
// an older one to it in v1: nobody is refused for its version. The header
// and status carry the version too, and a header whose version is not the
// connection's is refused (unsupported_version).
//
// v1: one tunnelled connection per TLS connection. Inside the TLS session
// the client sends one header and nothing else until the server has
// answered with a status; then the bytes of the connection flow as they
// are, half-close is TLS close_notify and reset a TCP reset:
//
//	header (24 bytes)                  status (8 bytes)
//	 0  4  magic "SMSH"                 0  4  magic "SMSH"
//	 4  1  version (1 or 2)             4  1  version (1 or 2)
//	 5  1  address family (4 or 6)      5  1  status (0 ok, 1 refused)
//	 6  2  destination port, big-endian 6  1  reason code (0 with ok)
//	 8 16  destination address          7  1  reserved, 0
//	       (IPv4: 4 bytes, then 12 zeros)
//
// v2: one tunnelled connection after another on the same TLS connection,
// never two at once, so that a node keeps warm connections to its peers
// and a new connection costs no handshake. Each starts with a header
// (version 2) that the client may follow at once with frames, without
// waiting for the status: the server reads nothing after the header until
// it has checked the destination and connected to it (TCP's flow control
// holds the rest), and a refusal discards what came early. The server
// answers a status (version 2; it may hold it back a moment to send it
// with its first frames), then frames:
//
//	frame header (4 bytes), then length bytes of data
//	 0  1  type: 'D' (0x44) data, 'F' (0x46) end of this direction
//	 1  3  length, big-endian: 1 to 65536 for 'D', 0 for 'F'
//
// Once the status was ok and both directions ended with 'F', the
// connection is idle and the client may send the next header. Anything
// else ends the TLS connection: a refusal (status, close_notify), a reset
// (a TCP reset, as in v1: no later connection rides on a reset one), a
// frame that breaks these rules (bad_frame, a reset). The server retires
// an idle connection with close_notify and nothing else, and answers the
// header of one it may no longer use (its certificate or identity policy
// changed since the handshake, or it is draining) with the refusal
// "retired": in both cases nothing was delivered, and the client sends the
// same header and early data again on a new connection.
//
// Every field has exactly one valid encoding, so a header either parses to a
// destination or is refused: no padding to ignore, no optional parts. The
// header has a fixed size so that the server reads it in one bounded read;
// later versions keep magic and version at the same offsets, so an old
// server can name the version it refuses.
const (
	// HeaderSize is the size of a header (v1 and v2).
	HeaderSize = 24
	// StatusSize is the size of a status (v1 and v2).
	StatusSize = 8
	// Version is protocol v1, which every node speaks.
	Version = 1
	// Version2 is protocol v2, negotiated with ALPN (ALPN2).
	Version2 = 2
)

// ALPN2 is the ALPN protocol name of wire protocol v2.
const ALPN2 = "smesh/2"

// magic opens every header and status: a smeshd talking to something else
// finds out at once.
var magic = [4]byte{'S', 'M', 'S', 'H'}

const (
	family4 = 4
	family6 = 6
)

const (
	statusOK      = 0
	statusRefused = 1
)

// HeaderError is a header the server refuses, with the reason it counts and
// answers.
type HeaderError struct {
	Reason Reason
	Detail string
}

func (e *HeaderError) Error() string {
	return fmt.Sprintf("tunnel header: %s: %s", e.Reason, e.Detail)
}

func headerErr(r Reason, format string, args ...any) error {
	return &HeaderError{Reason: r, Detail: fmt.Sprintf(format, args...)}
}

// AppendHeader appends the v1 header for destination dst to b. dst must be a
// valid address (IPv4 or IPv6, not an IPv4-mapped IPv6 one) with a port.
func AppendHeader(b []byte, dst netip.AddrPort) ([]byte, error) {
	return appendHeader(b, dst, Version)
}

func appendHeader(b []byte, dst netip.AddrPort, version byte) ([]byte, error) {
	if err := checkDst(dst); err != nil {
		return b, err
	}
	var h [HeaderSize]byte
	copy(h[0:4], magic[:])
	h[4] = version
	h[5] = family6
	if dst.Addr().Is4() {
		h[5] = family4
	}
	binary.BigEndian.PutUint16(h[6:8], dst.Port())
	a := dst.Addr().AsSlice()
	copy(h[8:], a)
	return append(b, h[:]...), nil
}

// ParseHeader decodes a v1 header. Errors are *HeaderError.
func ParseHeader(h []byte) (netip.AddrPort, error) { return parseHeader(h, Version) }

// parseHeader decodes a header of the given version.
func parseHeader(h []byte, version byte) (netip.AddrPort, error) {
	if len(h) < HeaderSize {
		return netip.AddrPort{}, headerErr(ReasonTruncatedHeader, "%d bytes, want %d", len(h), HeaderSize)
	}
	if len(h) > HeaderSize {
		return netip.AddrPort{}, headerErr(ReasonOversizedHeader, "%d bytes, want %d", len(h), HeaderSize)
	}
	if [4]byte(h[0:4]) != magic {
		return netip.AddrPort{}, headerErr(ReasonBadMagic, "magic %q", h[0:4])
	}
	if h[4] != version {
		return netip.AddrPort{}, headerErr(ReasonUnsupportedVersion, "version %d on a connection of protocol v%d", h[4], version)
	}
	port := binary.BigEndian.Uint16(h[6:8])
	var addr netip.Addr
	switch h[5] {
	case family4:
		for _, b := range h[12:] {
			if b != 0 {
				return netip.AddrPort{}, headerErr(ReasonBadHeader, "IPv4 address with nonzero padding")
			}
		}
		addr = netip.AddrFrom4([4]byte(h[8:12]))
	case family6:
		addr = netip.AddrFrom16([16]byte(h[8:24]))
	default:
		return netip.AddrPort{}, headerErr(ReasonBadHeader, "address family %d", h[5])
	}
	dst := netip.AddrPortFrom(addr, port)
	if err := checkDst(dst); err != nil {
		return netip.AddrPort{}, err
	}
	return dst, nil
}

// checkDst rejects destinations no connection can have: they could only be
// a client's bug or a probe. 0.0.0.0 and :: matter most, because connecting
// to them reaches this very host.
func checkDst(dst netip.AddrPort) error {
	a := dst.Addr()
	switch {
	case !a.IsValid():
		return headerErr(ReasonBadHeader, "no destination address")
	case a.Is4In6():
		return headerErr(ReasonBadHeader, "IPv4-mapped address %s (send it as IPv4)", a)
	case a.Zone() != "":
		return headerErr(ReasonBadHeader, "address %s has a zone", a)
	case a.IsUnspecified(), a.IsMulticast(), a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return headerErr(ReasonBadHeader, "destination %s is not a unicast address", a)
	case dst.Port() == 0:
		return headerErr(ReasonBadHeader, "destination port 0")
	}
	return nil
}

// Status is the server's answer to a header.
type Status struct {
	// OK: the server connected to the destination and relays from now on.
	OK bool
	// Reason says why a connection was refused (ReasonNone with OK).
	Reason Reason
}

// AppendStatus appends the v1 encoding of s to b.
func AppendStatus(b []byte, s Status) []byte { return appendStatus(b, s, Version) }

func appendStatus(b []byte, s Status, version byte) []byte {
	var st [StatusSize]byte
	copy(st[0:4], magic[:])
	st[4] = version
	if s.OK {
		st[5] = statusOK
	} else {
		st[5] = statusRefused
		st[6] = byte(s.Reason)
	}
	return append(b, st[:]...)
}

// ParseStatus decodes a status. A refusal with a reason code this version
// does not know is still a refusal (ReasonUnknown keeps the code readable in
// logs through its number). It parses v1.
func ParseStatus(st []byte) (Status, error) { return parseStatus(st, Version) }

func parseStatus(st []byte, version byte) (Status, error) {
	if len(st) != StatusSize {
		return Status{}, fmt.Errorf("tunnel status: %d bytes, want %d", len(st), StatusSize)
	}
	if [4]byte(st[0:4]) != magic {
		return Status{}, fmt.Errorf("tunnel status: magic %q: the peer is not a smesh tunnel", st[0:4])
	}
	if st[4] != version {
		return Status{}, fmt.Errorf("tunnel status: version %d, want %d", st[4], version)
	}
	if st[7] != 0 {
		return Status{}, fmt.Errorf("tunnel status: reserved byte %d", st[7])
	}
	switch st[5] {
	case statusOK:
		if st[6] != 0 {
			return Status{}, fmt.Errorf("tunnel status: ok with reason code %d", st[6])
		}
		return Status{OK: true}, nil
	case statusRefused:
		if st[6] == byte(ReasonNone) {
			return Status{}, fmt.Errorf("tunnel status: refused without a reason")
		}
		return Status{Reason: Reason(st[6])}, nil
	}
	return Status{}, fmt.Errorf("tunnel status: status %d", st[5])
}
