// Package metrics holds smeshd's Prometheus metrics: a Metrics value owns its
// own registry, the data path reports to it through a few cheap methods, and
// the bytes spliced in the kernel are read from BPF at scrape time through a
// callback the daemon supplies.
//
// The metric names and labels are a contract (docs/design.md): dashboards and
// alerts depend on them.
package metrics

import (
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// The values of the path label. Only these are counted: the data path passes
// these constants, and a fixed set keeps the per-call cost to a map lookup of
// a map that never changes, with no lock.
const (
	// PathSplice is a same-node hop spliced by sk_msg.
	PathSplice = "splice"
	// PathCopy is a connection relayed through smeshd's userspace copy.
	PathCopy = "copy"
	// PathTunnelOut is a connection sent to another node through the tunnel.
	PathTunnelOut = "tunnel_out"
	// PathTunnelIn is a connection received from another node's tunnel.
	PathTunnelIn = "tunnel_in"
)

var paths = []string{PathSplice, PathCopy, PathTunnelOut, PathTunnelIn}

// The values of the role label of the TLS metrics.
const (
	RoleClient = "client"
	RoleServer = "server"
)

// SpliceCounters are the kernel's view of the spliced data path, read at
// scrape time. Tx is client to server, Rx server to client (by the role of
// the sending socket, as counted in BPF).
type SpliceCounters struct {
	TxBytes, RxBytes uint64
	TxMsgs, RxMsgs   uint64
	// Sockets is the number of sockets in the sockhash: both ends of every
	// spliced hop, so twice the number of hops.
	Sockets int
}

// Metrics is smeshd's metric set. Its methods are safe for concurrent use.
type Metrics struct {
	reg     *prometheus.Registry
	handler http.Handler

	// paths is filled in New and only read afterwards, so the data path
	// looks a path up without a lock.
	paths map[string]*pathStats

	tunnelErrors *prometheus.CounterVec
	refused      *prometheus.CounterVec
	// handshakes is indexed by role, result (ok) and resumed.
	handshakes       [2][2][2]prometheus.Counter
	handshakeSeconds [2]prometheus.Observer
	certExpiry       *prometheus.GaugeVec
	reloadOK         prometheus.Counter
	reloadError      prometheus.Counter

	splice atomic.Pointer[func() (SpliceCounters, error)]
}

// pathStats are the Go-side counters of one path. Bytes and active
// connections are plain atomics, exported by dataPathCollector together with
// the BPF counters of the splice path.
type pathStats struct {
	conns  prometheus.Counter
	active atomic.Int64
	tx, rx atomic.Uint64
}

// New makes a metric set with its own registry. version is exported as
// smesh_build_info{version}.
func New(version string) *Metrics {
	m := &Metrics{
		reg:   prometheus.NewRegistry(),
		paths: make(map[string]*pathStats, len(paths)),
	}

	conns := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "smesh_connections_total",
		Help: "Connections opened, by data path.",
	}, []string{"path"})
	for _, p := range paths {
		m.paths[p] = &pathStats{conns: conns.WithLabelValues(p)}
	}

	m.tunnelErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "smesh_tunnel_errors_total",
		Help: "Tunnel connections that failed, by reason.",
	}, []string{"reason"})
	m.refused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "smesh_refused_connections_total",
		Help: "Connections refused or cut by a limit (connection limit, handshake or idle timeout), by reason.",
	}, []string{"reason"})

	handshakes := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "smesh_tls_handshakes_total",
		Help: "Tunnel TLS handshakes, by role, result and session resumption.",
	}, []string{"role", "result", "resumed"})
	handshakeSeconds := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "smesh_tls_handshake_seconds",
		Help: "Duration of successful tunnel TLS handshakes, by role.",
		// 0.5 ms to about 4 s: a resumed handshake on a LAN is well under a
		// millisecond, a loaded peer across regions takes seconds.
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
	}, []string{"role"})
	for ri, role := range []string{RoleClient, RoleServer} {
		for oi, result := range []string{"error", "ok"} {
			for si, resumed := range []string{"false", "true"} {
				m.handshakes[ri][oi][si] = handshakes.WithLabelValues(role, result, resumed)
			}
		}
		m.handshakeSeconds[ri] = handshakeSeconds.WithLabelValues(role)
	}

	m.certExpiry = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "smesh_certificate_expiry_seconds",
		Help: "Expiry (notAfter) of each loaded certificate, as a Unix timestamp.",
	}, []string{"file"})

	reloads := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "smesh_config_reloads_total",
		Help: "Configuration reloads, by result.",
	}, []string{"result"})
	m.reloadOK = reloads.WithLabelValues("ok")
	m.reloadError = reloads.WithLabelValues("error")

	buildInfo := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "smesh_build_info",
		Help: "Always 1; the version label says which smeshd runs.",
	}, []string{"version"})
	buildInfo.WithLabelValues(version).Set(1)

	m.reg.MustRegister(
		conns, m.tunnelErrors, m.refused, handshakes, handshakeSeconds,
		m.certExpiry, reloads, buildInfo,
		dataPathCollector{m},
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)

	m.handler = promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		// A collector that fails must not hide the others.
		ErrorHandling: promhttp.ContinueOnError,
		// Scrapes are rare; more than a few at once is a misbehaving client.
		MaxRequestsInFlight: 4,
		Timeout:             10 * time.Second,
	})
	return m
}

// Handler serves the metrics in the Prometheus exposition formats.
func (m *Metrics) Handler() http.Handler { return m.handler }

// Registry is the registry behind Handler, for tests and for registering
// collectors of other parts.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// SetSpliceSource sets the callback that reads the BPF splice counters; it is
// called on every scrape. nil removes it. While no source is set, or when it
// fails, the splice series of smesh_bytes_total, smesh_active_connections and
// smesh_spliced_messages_total are left out of the scrape (an absent counter
// is better than a wrong one), and smesh_splice_source_up says which.
func (m *Metrics) SetSpliceSource(fn func() (SpliceCounters, error)) {
	if fn == nil {
		m.splice.Store(nil)
		return
	}
	m.splice.Store(&fn)
}

// ConnOpened counts a new connection on path.
func (m *Metrics) ConnOpened(path string) {
	if s := m.paths[path]; s != nil {
		s.conns.Inc()
		s.active.Add(1)
	}
}

// ConnClosed ends a connection opened with ConnOpened and adds the bytes it
// moved that AddBytes has not already counted: tx from the client to the
// server, rx back. For PathSplice the bytes and the active count come from
// the splice source, so only the connection count uses what is reported here.
func (m *Metrics) ConnClosed(path string, tx, rx int64) {
	if s := m.paths[path]; s != nil {
		s.active.Add(-1)
		s.add(tx, rx)
	}
}

// AddBytes counts bytes of a connection that is still open, so that
// long-lived connections show their traffic before they close.
func (m *Metrics) AddBytes(path string, tx, rx int64) {
	if s := m.paths[path]; s != nil {
		s.add(tx, rx)
	}
}

func (s *pathStats) add(tx, rx int64) {
	if tx > 0 {
		s.tx.Add(uint64(tx))
	}
	if rx > 0 {
		s.rx.Add(uint64(rx))
	}
}

// TunnelError counts a failed tunnel connection. reason is a short fixed
// word (e.g. "handshake", "refused", "dial"), never an error string: each
// distinct value is a new series.
func (m *Metrics) TunnelError(reason string) {
	m.tunnelErrors.WithLabelValues(reason).Inc()
}

// Refused counts a connection refused or cut by a limit. reason is a short
// fixed word (e.g. "max_connections", "handshake_timeout", "idle_timeout").
func (m *Metrics) Refused(reason string) {
	m.refused.WithLabelValues(reason).Inc()
}

// Handshake counts a tunnel TLS handshake as RoleClient or RoleServer. Only
// successful handshakes go into the duration histogram: a failure's duration
// is mostly the timeout that ended it.
func (m *Metrics) Handshake(role string, ok, resumed bool, d time.Duration) {
	var ri int
	switch role {
	case RoleClient:
		ri = 0
	case RoleServer:
		ri = 1
	default:
		return
	}
	m.handshakes[ri][b2i(ok)][b2i(resumed)].Inc()
	if ok {
		m.handshakeSeconds[ri].Observe(d.Seconds())
	}
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// CertExpiry records the notAfter of the certificate loaded from file. A zero
// notAfter removes the series, for a file no longer in the configuration.
func (m *Metrics) CertExpiry(file string, notAfter time.Time) {
	if notAfter.IsZero() {
		m.certExpiry.DeleteLabelValues(file)
		return
	}
	m.certExpiry.WithLabelValues(file).Set(float64(notAfter.Unix()))
}

// Reload counts a configuration reload.
func (m *Metrics) Reload(ok bool) {
	if ok {
		m.reloadOK.Inc()
	} else {
		m.reloadError.Inc()
	}
}

// Splice reads the splice source, for callers other than the scrape (the
// admin /debug/connections page). ok is false when no source is set.
func (m *Metrics) Splice() (c SpliceCounters, ok bool, err error) {
	fn := m.splice.Load()
	if fn == nil {
		return SpliceCounters{}, false, nil
	}
	c, err = (*fn)()
	return c, true, err
}
