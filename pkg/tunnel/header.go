package tunnel

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/smesh-dev/smesh/pkg/identity"
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
// v3 (ALPN "smesh/3", offered before "smesh/2": a v3 node talks v2 to a
// v2 node and v1 to older ones, either way round) is v2 with the source of
// the tunnelled connection in its header: the workload it comes from (a
// SPIFFE ID the sending node asserts for it, docs/identity.md) and its
// address. Status and frames are v2's, with version 3. The header is a
// fixed part, then the SPIFFE ID:
//
//	header (44 bytes + ID)
//	 0  4  magic "SMSH"
//	 4  1  version 3
//	 5  1  destination address family (4 or 6)
//	 6  2  destination port, big-endian
//	 8 16  destination address (IPv4: 4 bytes, then 12 zeros)
//	24  1  source address family: 0 none, 4 or 6
//	25  1  reserved, 0
//	26  2  source ID length, big-endian: 0 (none) to 2048
//	28 16  source address (IPv4: 4 bytes, then 12 zeros; none: 16 zeros)
//	44  n  source SPIFFE ID, n = the length: its canonical string form
//	       (what identity.Parse accepts), with a path, in the server's
//	       trust domain (else refused identity_not_on_node)
//
// The server reads the fixed part, then exactly the ID's length, both under
// the header deadline. It checks that the peer node may speak for that
// workload at that address (SourceVerifier: refused identity_not_on_node
// otherwise), then asks its authorization hook (ServerOptions.Authorize:
// refused policy_denied), both before it connects to the destination. No
// source (length 0, family 0) is the node itself: what a v1 or v2 peer
// always asserts. A source address is a unicast address like a
// destination, IPv4 as IPv4; unspecified is sent as none.
//
// Every field has exactly one valid encoding, so a header either parses to a
// destination or is refused: no padding to ignore, no optional parts. The
// header has a fixed size (v3: a fixed part and a length it announces) so
// that the server reads it in bounded reads; later versions keep magic and
// version at the same offsets, so an old server can name the version it
// refuses.
const (
	// HeaderSize is the size of a header (v1 and v2).
	HeaderSize = 24
	// HeaderSizeV3 is the size of a v3 header's fixed part.
	HeaderSizeV3 = 44
	// MaxSourceID is the longest source SPIFFE ID a v3 header carries
	// (the SPIFFE maximum for a URI SAN).
	MaxSourceID = 2048
	// StatusSize is the size of a status (v1, v2 and v3).
	StatusSize = 8
	// Version is protocol v1, which every node speaks.
	Version = 1
	// Version2 is protocol v2, negotiated with ALPN (ALPN2).
	Version2 = 2
	// Version3 is protocol v3, negotiated with ALPN (ALPN3).
	Version3 = 3
)

// ALPN2 and ALPN3 are the ALPN protocol names of wire protocols v2 and v3.
const (
	ALPN2 = "smesh/2"
	ALPN3 = "smesh/3"
)

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

// Header is a decoded header: the destination and, in v3, the source the
// sending node asserts (zero values: none, the node itself).
type Header struct {
	Dst netip.AddrPort
	// Workload is the source workload's identity; zero: none.
	Workload spiffeid.ID
	// SrcAddr is the source's address; invalid: none.
	SrcAddr netip.Addr
}

// AppendHeaderV3 appends the v3 header of h to b.
func AppendHeaderV3(b []byte, h Header) ([]byte, error) {
	if err := checkDst(h.Dst); err != nil {
		return b, err
	}
	if err := checkSrc(h.SrcAddr); err != nil {
		return b, err
	}
	id := ""
	if !h.Workload.IsZero() {
		id = h.Workload.String()
	}
	if len(id) > MaxSourceID {
		return b, headerErr(ReasonBadHeader, "source ID of %d bytes, at most %d", len(id), MaxSourceID)
	}
	if !h.Workload.IsZero() && h.Workload.Path() == "" {
		return b, headerErr(ReasonBadHeader, "source %s names a trust domain, not a workload", id)
	}
	b, _ = appendHeader(b, h.Dst, Version3)
	var f [HeaderSizeV3 - HeaderSize]byte
	switch {
	case h.SrcAddr.Is4():
		f[0] = family4
	case h.SrcAddr.Is6():
		f[0] = family6
	}
	binary.BigEndian.PutUint16(f[2:4], uint16(len(id)))
	if h.SrcAddr.IsValid() {
		copy(f[4:], h.SrcAddr.AsSlice())
	}
	b = append(b, f[:]...)
	return append(b, id...), nil
}

// headerV3Len checks a v3 header's fixed part (HeaderSizeV3 bytes) as far
// as the length it announces and returns that length: the server reads
// no further when it is out of bounds. ParseHeaderV3 checks the rest.
func headerV3Len(fixed []byte) (int, error) {
	if len(fixed) < HeaderSizeV3 {
		return 0, headerErr(ReasonTruncatedHeader, "%d bytes, want %d", len(fixed), HeaderSizeV3)
	}
	if [4]byte(fixed[0:4]) != magic {
		return 0, headerErr(ReasonBadMagic, "magic %q", fixed[0:4])
	}
	if fixed[4] != Version3 {
		return 0, headerErr(ReasonUnsupportedVersion, "version %d on a connection of protocol v%d", fixed[4], Version3)
	}
	n := int(binary.BigEndian.Uint16(fixed[26:28]))
	if n > MaxSourceID {
		return 0, headerErr(ReasonBadHeader, "source ID of %d bytes, at most %d", n, MaxSourceID)
	}
	return n, nil
}

// ParseHeaderV3 decodes a whole v3 header (fixed part and source ID). The
// source ID must be in td. Errors are *HeaderError.
func ParseHeaderV3(h []byte, td spiffeid.TrustDomain) (Header, error) {
	n, err := headerV3Len(h)
	if err != nil {
		return Header{}, err
	}
	if len(h) < HeaderSizeV3+n {
		return Header{}, headerErr(ReasonTruncatedHeader, "%d bytes, want %d", len(h), HeaderSizeV3+n)
	}
	if len(h) > HeaderSizeV3+n {
		return Header{}, headerErr(ReasonOversizedHeader, "%d bytes, want %d", len(h), HeaderSizeV3+n)
	}
	dst, err := parseHeader(h[:HeaderSize], Version3)
	if err != nil {
		return Header{}, err
	}
	out := Header{Dst: dst}
	f := h[HeaderSize:HeaderSizeV3]
	if f[1] != 0 {
		return Header{}, headerErr(ReasonBadHeader, "reserved byte %d", f[1])
	}
	a := f[4:20]
	switch f[0] {
	case 0:
		for _, b := range a {
			if b != 0 {
				return Header{}, headerErr(ReasonBadHeader, "no source address, with nonzero address bytes")
			}
		}
	case family4:
		for _, b := range a[4:] {
			if b != 0 {
				return Header{}, headerErr(ReasonBadHeader, "IPv4 source address with nonzero padding")
			}
		}
		out.SrcAddr = netip.AddrFrom4([4]byte(a[:4]))
	case family6:
		out.SrcAddr = netip.AddrFrom16([16]byte(a))
	default:
		return Header{}, headerErr(ReasonBadHeader, "source address family %d", f[0])
	}
	if err := checkSrc(out.SrcAddr); err != nil {
		return Header{}, err
	}
	if n > 0 {
		id, err := identity.Parse(string(h[HeaderSizeV3:]))
		if err != nil {
			return Header{}, headerErr(ReasonBadHeader, "source: %v", err)
		}
		if id.Path() == "" {
			return Header{}, headerErr(ReasonBadHeader, "source %s names a trust domain, not a workload", id)
		}
		if id.TrustDomain() != td {
			return Header{}, headerErr(ReasonIdentityNotOnNode, "source %s is not in trust domain %q", id, td.Name())
		}
		out.Workload = id
	}
	return out, nil
}

// checkSrc rejects source addresses no TCP connection has; invalid is none.
func checkSrc(a netip.Addr) error {
	switch {
	case !a.IsValid():
		return nil
	case a.Is4In6():
		return headerErr(ReasonBadHeader, "IPv4-mapped source address %s (send it as IPv4)", a)
	case a.Zone() != "":
		return headerErr(ReasonBadHeader, "source address %s has a zone", a)
	case a.IsUnspecified(), a.IsMulticast(), a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return headerErr(ReasonBadHeader, "source %s is not a unicast address", a)
	}
	return nil
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
