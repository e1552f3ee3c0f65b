// Package metrics holds smeshd's Prometheus metrics: a Metrics value owns its
// own registry, the outbound relay reports to it through a few cheap
// methods, and what others already count is read at scrape time: the bytes
// spliced in the kernel from BPF (through a callback the daemon supplies),
// the tunnel's connections, errors and handshakes from its tunnel.Stats.
// Nothing is counted twice.
//
// Where each path's series come from:
//
//	path        smesh_connections_total  smesh_active_connections  smesh_bytes_total
//	splice      BPF (sockops)            BPF (sockhash)            BPF
//	copy        ConnOpened               ConnOpened, ConnClosed    ConnClosed, AddBytes
//	tunnel_out  tunnel.Stats             ConnOpened, ConnClosed    ConnClosed, AddBytes
//	tunnel_in   tunnel.Stats             tunnel.Stats              tunnel.Stats
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

	"github.com/smesh-dev/smesh/pkg/tunnel"
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

// goPaths are the paths the Go-side counters (ConnOpened, ConnClosed,
// AddBytes) take part in; splice is all the kernel's, tunnel_in all the
// tunnel's.
var goPaths = []string{PathCopy, PathTunnelOut}

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
	// Demotions counts the directions sk_msg moved to TCP because their
	// reader fell datapath.splice_queue_limit behind; DemotedTxBytes and
	// DemotedRxBytes are what such directions sent by TCP afterwards, and
	// the directions that gave up splicing so that both ends of a demoted
	// hop could be released (close_own in skmsg.c).
	Demotions                      uint64
	DemotedTxBytes, DemotedRxBytes uint64
	// Released counts sockets of demoted hops taken out of the sockhash,
	// plain TCP sockets from then on.
	Released uint64
	// Conns counts spliced hops: connections whose both ends went into
	// the sockhash (an app's connection to a local server, or either
	// hop between an app and smeshd when those are spliced).
	Conns uint64
	// Raced counts spliced hops that ran as plain TCP because one end's
	// first send came before the other end was established.
	Raced uint64
}

// Metrics is smeshd's metric set. Its methods are safe for concurrent use.
type Metrics struct {
	reg     *prometheus.Registry
	handler http.Handler

	// paths is filled in New and only read afterwards, so the data path
	// looks a path up without a lock.
	paths map[string]*pathStats

	refused     *prometheus.CounterVec
	certExpiry  *prometheus.GaugeVec
	reloadOK    prometheus.Counter
	reloadError prometheus.Counter

	enrolled       *prometheus.GaugeVec
	enrolledEvents *prometheus.CounterVec

	splice atomic.Pointer[func() (SpliceCounters, error)]
	tunnel atomic.Pointer[tunnel.Stats]
	// parked[side] reads how many relayed directions of that side wait
	// without a goroutine (proxy.Parker); nil: 0.
	parked map[string]*atomic.Pointer[func() int]
}

// Sides of smesh_relay_parked.
const (
	SideOutbound = "outbound"  // the outbound proxy's relays
	SideTunnelIn = "tunnel_in" // the tunnel server's
)

// pathStats are the Go-side counters of one path, exported by
// dataPathCollector together with those read from BPF and the tunnel.
type pathStats struct {
	conns  atomic.Uint64
	active atomic.Int64
	tx, rx atomic.Uint64
}

// New makes a metric set with its own registry. version is exported as
// smesh_build_info{version}.
func New(version string) *Metrics {
	m := &Metrics{
		reg:   prometheus.NewRegistry(),
		paths: make(map[string]*pathStats, len(goPaths)),
	}
	for _, p := range goPaths {
		m.paths[p] = &pathStats{}
	}
	// Until SetTunnelStats, a tunnel that counted nothing: its series are
	// there, at 0.
	m.tunnel.Store(new(tunnel.Stats))

	m.refused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "smesh_refused_connections_total",
		Help: "Connections refused or cut by a limit (connection limit, handshake or idle timeout), by reason.",
	}, []string{"reason"})

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

	m.enrolled = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "smesh_enrolled_cgroups",
		Help: "Enrolled cgroups (capture.cgroups) with the capture attached, and those missing (nothing is captured there until they exist again).",
	}, []string{"state"})
	m.enrolledEvents = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "smesh_enrolled_cgroup_events_total",
		Help: "Enrolled cgroups seen removed, and seen made (again) and attached to, while smeshd runs.",
	}, []string{"event"})
	for _, state := range []string{"attached", "missing"} {
		m.enrolled.WithLabelValues(state)
	}
	for _, ev := range []string{EnrolledRemoved, EnrolledCreated} {
		m.enrolledEvents.WithLabelValues(ev)
	}

	buildInfo := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "smesh_build_info",
		Help: "Always 1; the version label says which smeshd runs.",
	}, []string{"version"})
	buildInfo.WithLabelValues(version).Set(1)

	m.parked = map[string]*atomic.Pointer[func() int]{}
	for _, side := range []string{SideOutbound, SideTunnelIn} {
		src := new(atomic.Pointer[func() int])
		m.parked[side] = src
		m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "smesh_relay_parked",
			Help:        "Directions of relayed connections idle long enough to wait without a goroutine (in smeshd's own epoll set), by side.",
			ConstLabels: prometheus.Labels{"side": side},
		}, func() float64 {
			if f := src.Load(); f != nil {
				return float64((*f)())
			}
			return 0
		}))
	}

	m.reg.MustRegister(
		m.refused, m.certExpiry, reloads, buildInfo, m.enrolled, m.enrolledEvents,
		dataPathCollector{m},
		tunnelCollector{m},
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

// SetTunnelStats sets the tunnel counters that every scrape reads:
// connections, active connections and bytes of tunnel_in, connections of
// tunnel_out, tunnel errors and TLS handshakes.
func (m *Metrics) SetTunnelStats(s *tunnel.Stats) {
	m.tunnel.Store(s)
}

// SetParked sets what smesh_relay_parked{side} reads at every scrape
// (SideOutbound, SideTunnelIn).
func (m *Metrics) SetParked(side string, fn func() int) {
	if src := m.parked[side]; src != nil {
		src.Store(&fn)
	}
}

// ConnOpened counts a new connection on path. For PathTunnelOut only the
// active count uses it (the tunnel counts its connections); PathSplice is
// all the kernel's and PathTunnelIn all the tunnel's: both are ignored
// here, as is any other path.
func (m *Metrics) ConnOpened(path string) {
	if s := m.paths[path]; s != nil {
		if path != PathTunnelOut {
			s.conns.Add(1)
		}
		s.active.Add(1)
	}
}

// ConnClosed ends a connection opened with ConnOpened and adds the bytes it
// moved that AddBytes has not already counted: tx from the client to the
// server, rx back.
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

// Refused counts a connection refused or cut by a limit. reason is a short
// fixed word (e.g. "max_connections", "handshake_timeout", "idle_timeout").
func (m *Metrics) Refused(reason string) {
	m.refused.WithLabelValues(reason).Inc()
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

// The values of the event label of smesh_enrolled_cgroup_events_total.
const (
	EnrolledRemoved = "removed"
	EnrolledCreated = "created"
)

// EnrolledCgroups sets how many enrolled cgroups have the capture attached
// and how many are missing.
func (m *Metrics) EnrolledCgroups(attached, missing int) {
	m.enrolled.WithLabelValues("attached").Set(float64(attached))
	m.enrolled.WithLabelValues("missing").Set(float64(missing))
}

// EnrolledCgroupEvent counts an enrolled cgroup seen removed
// (EnrolledRemoved) or made again (EnrolledCreated).
func (m *Metrics) EnrolledCgroupEvent(event string) {
	m.enrolledEvents.WithLabelValues(event).Inc()
}
