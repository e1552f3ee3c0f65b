package tunnel

import (
	"crypto/tls"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
)

// Reason says why a tunnel connection was refused or failed. The codes of
// the reasons a server answers in a status are part of wire protocol v1:
// never renumber them, only add.
type Reason uint8

const (
	ReasonNone Reason = 0

	// Answered in a status (wire codes).
	ReasonBadMagic           Reason = 1 // header does not start with "SMSH"
	ReasonUnsupportedVersion Reason = 2 // header version is not the connection's protocol version
	ReasonBadHeader          Reason = 3 // bad family, padding, port 0, non-unicast address
	ReasonOversizedHeader    Reason = 4 // more than a header before the status
	ReasonNotLocal           Reason = 5 // destination is not an address of the server's node: a relay attempt
	ReasonPortNotAllowed     Reason = 6 // destination port outside [tunnel] allow_ports
	ReasonOwnPort            Reason = 7 // destination is one of smeshd's own listeners
	ReasonTooManyConnections Reason = 8 // [tunnel] max_connections reached
	ReasonUnreachable        Reason = 9 // the local destination refused or did not answer
	// Destination is a loopback address: a captured connection's original
	// destination is never another node's loopback, so only a peer that
	// wants to reach services bound to localhost sends one. A peer older
	// than this code still reads a refusal, named "reason_10".
	ReasonLoopback Reason = 10
	// Protocol v2 only: the server will not use this pooled connection
	// any more (its certificate files or identity policy changed since
	// the handshake, or it is draining). Nothing was delivered: the client
	// opens a new connection and sends the header and early data again.
	ReasonRetired Reason = 11
	// The source a v3 header asserts is not one the peer node may speak
	// for (SourceVerifier), or is in another trust domain.
	ReasonIdentityNotOnNode Reason = 12
	// The server's authorization hook (ServerOptions.Authorize) denied the
	// connection: nothing was dialled. An older peer reads "reason_13".
	ReasonPolicyDenied Reason = 13

	// Counted and logged only: the connection ends before a status can be
	// sent, or the failure is on the client's side.
	ReasonNotTLS               Reason = 64 // plaintext or garbage where a TLS handshake belongs
	ReasonTLSHandshake         Reason = 65 // any other handshake failure
	ReasonHandshakeTimeout     Reason = 66 // handshake not done within handshake_timeout
	ReasonUnknownCA            Reason = 67 // peer certificate not signed by [tunnel.tls] ca
	ReasonCertExpired          Reason = 68 // peer certificate expired or not yet valid
	ReasonBadIdentity          Reason = 69 // peer certificate has no valid SPIFFE ID (every peer needs one)
	ReasonIdentityNotAllowed   Reason = 70 // peer SPIFFE ID not in allow_identities
	ReasonHeaderTimeout        Reason = 71 // header not complete within handshake_timeout
	ReasonTruncatedHeader      Reason = 72 // connection ended inside the header
	ReasonWrongTrustDomain     Reason = 73 // peer SPIFFE ID not in [tunnel.tls] trust_domain
	ReasonTooManyHandshakes    Reason = 74 // max_handshakes(_per_source) reached, none stale: reset at once
	ReasonHandshakeEvicted     Reason = 75 // a stale handshake reset to make room for a new connection
	ReasonIdleTimeout          Reason = 76 // a tunnelled connection moved nothing for [tunnel] idle_timeout
	ReasonBadFrame             Reason = 77 // v2: a frame that breaks the protocol's rules (the connection is reset)
	ReasonPeerUnreachable      Reason = 80 // client: the peer's tunnel port did not answer
	ReasonPeerHandshake        Reason = 81 // client: TLS handshake with the peer failed
	ReasonPeerRefused          Reason = 82 // client: the peer refused (its reason is logged)
	ReasonPeerProtocol         Reason = 83 // client: the peer's status did not parse
	ReasonPeerRefusedHandshake Reason = 84 // client: the peer refused this node's certificate (a TLS alert)
	ReasonPeerIdentity         Reason = 85 // client: the server's identity is not pinned for the destination

	// ReasonUnknown stands for a reason code this version does not know,
	// e.g. one answered by a newer peer.
	ReasonUnknown Reason = 255
)

// reasonNames are the label values of smesh_tunnel_errors_total{reason}.
var reasonNames = map[Reason]string{
	ReasonNone:                 "none",
	ReasonBadMagic:             "bad_magic",
	ReasonUnsupportedVersion:   "unsupported_version",
	ReasonBadHeader:            "bad_header",
	ReasonOversizedHeader:      "oversized_header",
	ReasonNotLocal:             "not_local",
	ReasonPortNotAllowed:       "port_not_allowed",
	ReasonOwnPort:              "own_port",
	ReasonTooManyConnections:   "too_many_connections",
	ReasonUnreachable:          "unreachable",
	ReasonLoopback:             "loopback",
	ReasonRetired:              "retired",
	ReasonIdentityNotOnNode:    "identity_not_on_node",
	ReasonPolicyDenied:         "policy_denied",
	ReasonNotTLS:               "not_tls",
	ReasonTLSHandshake:         "tls_handshake",
	ReasonHandshakeTimeout:     "handshake_timeout",
	ReasonUnknownCA:            "unknown_ca",
	ReasonCertExpired:          "cert_expired",
	ReasonBadIdentity:          "bad_identity",
	ReasonIdentityNotAllowed:   "identity_not_allowed",
	ReasonHeaderTimeout:        "header_timeout",
	ReasonTruncatedHeader:      "truncated_header",
	ReasonWrongTrustDomain:     "wrong_trust_domain",
	ReasonTooManyHandshakes:    "too_many_handshakes",
	ReasonHandshakeEvicted:     "handshake_evicted",
	ReasonIdleTimeout:          "idle_timeout",
	ReasonBadFrame:             "bad_frame",
	ReasonPeerUnreachable:      "peer_unreachable",
	ReasonPeerHandshake:        "peer_handshake",
	ReasonPeerRefused:          "peer_refused",
	ReasonPeerProtocol:         "peer_protocol",
	ReasonPeerRefusedHandshake: "peer_refused_handshake",
	ReasonPeerIdentity:         "peer_identity",
	ReasonUnknown:              "unknown",
}

// String returns the reason's snake_case name; a code this version does not
// know reads "reason_N".
func (r Reason) String() string {
	if s, ok := reasonNames[r]; ok {
		return s
	}
	return "reason_" + strconv.Itoa(int(r))
}

// Reasons lists every reason but ReasonNone, in code order: the label values
// a metrics exporter can pre-declare.
func Reasons() []Reason {
	var rs []Reason
	for r := 1; r < 256; r++ {
		if _, ok := reasonNames[Reason(r)]; ok {
			rs = append(rs, Reason(r))
		}
	}
	return rs
}

// Stats are the tunnel's counters, shared by client and server: the one
// place where tunnel events are counted. /metrics reads them at every scrape
// (pkg/metrics) and smeshd logs them when it stops (MarshalZerologObject),
// so the two always agree. All fields are safe for concurrent use.
type Stats struct {
	// In counts the connections the server accepted and relays
	// (tunnel_in).
	In PathStats
	// Out counts the connections the client opened (tunnel_out).
	Out OutStats
	// ClientHandshakes and ServerHandshakes count the TLS handshakes of
	// each role.
	ClientHandshakes, ServerHandshakes HandshakeStats

	errors [256]atomic.Uint64
}

// PathStats count the connections the server relays. Tx is what this node
// sent into the tunnel connection, Rx what it received from it; bytes are
// added when a connection ends.
type PathStats struct {
	Connections atomic.Uint64 // established: the status was ok
	Active      atomic.Int64
	BytesTx     atomic.Uint64
	BytesRx     atomic.Uint64
}

// OutStats count the connections the client opened. Their bytes and how
// many are open are counted by what relays them: the outbound proxy, as
// path tunnel_out.
type OutStats struct {
	Connections atomic.Uint64 // established: the peer's status was ok
}

// handshake counts one TLS handshake of role "client" or "server".
func (s *Stats) handshake(role string, tc *tls.Conn, err error, start time.Time) {
	h := &s.ClientHandshakes
	if role == "server" {
		h = &s.ServerHandshakes
	}
	h.Add(err == nil, err == nil && tc.ConnectionState().DidResume, time.Since(start))
}

// Count adds one error of reason r.
func (s *Stats) Count(r Reason) {
	s.errors[r].Add(1)
}

// Errors returns the count of reason r.
func (s *Stats) Errors(r Reason) uint64 { return s.errors[r].Load() }

// ErrorCounts returns the nonzero error counts by reason name.
func (s *Stats) ErrorCounts() map[string]uint64 {
	m := make(map[string]uint64)
	for i := range s.errors {
		if n := s.errors[i].Load(); n > 0 {
			m[Reason(i).String()] = n
		}
	}
	return m
}

// MarshalZerologObject logs the counters: connections out and in, and
// errors by reason (the same numbers /metrics exports).
func (s *Stats) MarshalZerologObject(e *zerolog.Event) {
	errs := zerolog.Dict()
	for name, n := range s.ErrorCounts() {
		errs.Uint64(name, n)
	}
	e.Uint64("out", s.Out.Connections.Load()).Uint64("in", s.In.Connections.Load()).Dict("errors", errs)
}

// handshakeBuckets is the number of upper bounds of the handshake duration
// histogram (HandshakeBuckets).
const handshakeBuckets = 14

// HandshakeBuckets returns the upper bounds, in seconds, of the handshake
// duration histogram: 0.5 ms to about 4 s. A resumed handshake on a LAN is
// well under a millisecond, a loaded peer across regions takes seconds.
func HandshakeBuckets() []float64 {
	b := make([]float64, handshakeBuckets)
	for i := range b {
		b[i] = 0.0005 * float64(uint(1)<<i)
	}
	return b
}

// HandshakeStats count the TLS handshakes of one role, by result and
// session resumption, and time the successful ones (a failure's duration is
// mostly the timeout that ended it).
type HandshakeStats struct {
	counts [2][2]atomic.Uint64 // [ok][resumed]
	// buckets[i] counts durations in (bound i-1, bound i]; the last one
	// those above every bound.
	buckets  [handshakeBuckets + 1]atomic.Uint64
	sumNanos atomic.Uint64
}

// Add counts one handshake.
func (h *HandshakeStats) Add(ok, resumed bool, d time.Duration) {
	h.counts[b2i(ok)][b2i(resumed)].Add(1)
	if !ok {
		return
	}
	i := 0
	for bound := 500 * time.Microsecond; i < handshakeBuckets && d > bound; bound *= 2 {
		i++
	}
	h.buckets[i].Add(1)
	h.sumNanos.Add(uint64(max(d, 0)))
}

// Count returns how many handshakes had that result and resumption.
func (h *HandshakeStats) Count(ok, resumed bool) uint64 {
	return h.counts[b2i(ok)][b2i(resumed)].Load()
}

// Durations returns the histogram of the successful handshakes' durations:
// cumulative counts by upper bound in seconds (HandshakeBuckets), the
// number of handshakes and the sum of their durations in seconds.
func (h *HandshakeStats) Durations() (cumulative map[float64]uint64, count uint64, sum float64) {
	cumulative = make(map[float64]uint64, handshakeBuckets)
	for i, bound := range HandshakeBuckets() {
		count += h.buckets[i].Load()
		cumulative[bound] = count
	}
	count += h.buckets[handshakeBuckets].Load()
	return cumulative, count, time.Duration(h.sumNanos.Load()).Seconds()
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// limitedLog lets through at most burst lines per interval and counts the
// rest, so that a flood of bad connections cannot flood the log. The next
// line that passes says how many were suppressed.
type limitedLog struct {
	log      zerolog.Logger
	burst    int
	interval time.Duration

	mu         sync.Mutex
	start      time.Time
	n          int
	suppressed int
}

func newLimitedLog(log zerolog.Logger, burst int, interval time.Duration) *limitedLog {
	return &limitedLog{log: log, burst: burst, interval: interval}
}

// warn returns an event to fill and send, or nil when over the limit
// (zerolog's nil *Event is a no-op, so callers chain on it regardless).
func (l *limitedLog) warn() *zerolog.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	if now.Sub(l.start) >= l.interval {
		l.start, l.n = now, 0
	}
	if l.n >= l.burst {
		l.suppressed++
		return nil
	}
	l.n++
	ev := l.log.Warn()
	if l.suppressed > 0 {
		ev = ev.Int("suppressed", l.suppressed)
		l.suppressed = 0
	}
	return ev
}
