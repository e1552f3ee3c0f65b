package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/smesh-dev/smesh/pkg/tunnel"
)

// The per-path series come from three sources (see the package comment):
// Go counters, BPF and the tunnel's Stats. One collector produces each of
// these metric families whole, so a series can never be registered twice.
var (
	connsDesc = prometheus.NewDesc("smesh_connections_total",
		"Connections opened, by data path.",
		[]string{"path"}, nil)
	bytesDesc = prometheus.NewDesc("smesh_bytes_total",
		"Bytes moved, by data path and direction (tx: client to server, rx: server to client). Spliced bytes are counted in BPF.",
		[]string{"path", "direction"}, nil)
	activeDesc = prometheus.NewDesc("smesh_active_connections",
		"Connections open now, by data path. For splice: spliced hops, half the sockets in the sockhash.",
		[]string{"path"}, nil)
	splicedMsgsDesc = prometheus.NewDesc("smesh_spliced_messages_total",
		"sendmsg calls spliced by sk_msg, by direction (tx: client to server, rx: server to client).",
		[]string{"direction"}, nil)
	demotionsDesc = prometheus.NewDesc("smesh_splice_demotions_total",
		"Directions of spliced connections moved to TCP for good because their reader fell datapath.splice_queue_limit behind.",
		nil, nil)
	releasedDesc = prometheus.NewDesc("smesh_splice_released_total",
		"Sockets of demoted hops taken out of the sockhash once nothing their peer spliced to them can still arrive or wait unread: they run as plain TCP sockets from then on.",
		nil, nil)
	racedDesc = prometheus.NewDesc("smesh_splice_raced_total",
		"Same-node hops that ran as plain TCP, not spliced, because one end sent before the other end's handshake had completed (a client writing right after connect()). Their bytes count as demoted.",
		nil, nil)
	demotedBytesDesc = prometheus.NewDesc("smesh_splice_demoted_bytes_total",
		"Bytes that demoted directions sent by TCP (and spliced directions that gave up splicing so that both ends of a demoted hop could be released), by direction (tx: client to server, rx: server to client).",
		[]string{"direction"}, nil)
	spliceUpDesc = prometheus.NewDesc("smesh_splice_source_up",
		"1 if the BPF splice counters were read for this scrape, 0 if reading them failed (their series are then left out).",
		nil, nil)

	tunnelErrorsDesc = prometheus.NewDesc("smesh_tunnel_errors_total",
		"Tunnel connections that failed, by reason.",
		[]string{"reason"}, nil)
	handshakesDesc = prometheus.NewDesc("smesh_tls_handshakes_total",
		"Tunnel TLS handshakes, by role, result and session resumption.",
		[]string{"role", "result", "resumed"}, nil)
	handshakeSecondsDesc = prometheus.NewDesc("smesh_tls_handshake_seconds",
		"Duration of successful tunnel TLS handshakes, by role.",
		[]string{"role"}, nil)
)

// dataPathCollector exports the per-path connections, bytes and active
// connections.
type dataPathCollector struct{ m *Metrics }

func (c dataPathCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- connsDesc
	ch <- bytesDesc
	ch <- activeDesc
	ch <- splicedMsgsDesc
	ch <- demotionsDesc
	ch <- releasedDesc
	ch <- racedDesc
	ch <- demotedBytesDesc
	ch <- spliceUpDesc
}

func (c dataPathCollector) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v int64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, float64(v), labels...)
	}
	ts := c.m.tunnel.Load()

	for _, p := range []string{PathCopy, PathTunnelOut} {
		s := c.m.paths[p]
		conns := s.conns.Load()
		if p == PathTunnelOut {
			conns = ts.Out.Connections.Load()
		}
		counter(connsDesc, conns, p)
		counter(bytesDesc, s.tx.Load(), p, "tx")
		counter(bytesDesc, s.rx.Load(), p, "rx")
		gauge(activeDesc, s.active.Load(), p)
	}
	// The remote client sends (tx, client to server) what this node's
	// tunnel server receives.
	counter(connsDesc, ts.In.Connections.Load(), PathTunnelIn)
	counter(bytesDesc, ts.In.BytesRx.Load(), PathTunnelIn, "tx")
	counter(bytesDesc, ts.In.BytesTx.Load(), PathTunnelIn, "rx")
	gauge(activeDesc, ts.In.Active.Load(), PathTunnelIn)

	sc, ok, err := c.m.Splice()
	if !ok {
		// No splice source (no data path yet): nothing spliced.
		counter(connsDesc, 0, PathSplice)
		return
	}
	if err != nil {
		gauge(spliceUpDesc, 0)
		return
	}
	gauge(spliceUpDesc, 1)
	counter(connsDesc, sc.Conns, PathSplice)
	counter(bytesDesc, sc.TxBytes, PathSplice, "tx")
	counter(bytesDesc, sc.RxBytes, PathSplice, "rx")
	counter(splicedMsgsDesc, sc.TxMsgs, "tx")
	counter(splicedMsgsDesc, sc.RxMsgs, "rx")
	counter(demotionsDesc, sc.Demotions)
	counter(releasedDesc, sc.Released)
	counter(racedDesc, sc.Raced)
	counter(demotedBytesDesc, sc.DemotedTxBytes, "tx")
	counter(demotedBytesDesc, sc.DemotedRxBytes, "rx")
	gauge(activeDesc, int64(sc.Sockets/2), PathSplice)
}

// tunnelCollector exports the tunnel's errors and TLS handshakes.
type tunnelCollector struct{ m *Metrics }

func (c tunnelCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- tunnelErrorsDesc
	ch <- handshakesDesc
	ch <- handshakeSecondsDesc
}

func (c tunnelCollector) Collect(ch chan<- prometheus.Metric) {
	ts := c.m.tunnel.Load()
	// A reason's series appears once it has been counted.
	for _, r := range tunnel.Reasons() {
		if n := ts.Errors(r); n > 0 {
			ch <- prometheus.MustNewConstMetric(tunnelErrorsDesc, prometheus.CounterValue, float64(n), r.String())
		}
	}
	for _, role := range []struct {
		name string
		h    *tunnel.HandshakeStats
	}{{RoleClient, &ts.ClientHandshakes}, {RoleServer, &ts.ServerHandshakes}} {
		for _, ok := range []bool{false, true} {
			result := "error"
			if ok {
				result = "ok"
			}
			for _, resumed := range []bool{false, true} {
				ch <- prometheus.MustNewConstMetric(handshakesDesc, prometheus.CounterValue,
					float64(role.h.Count(ok, resumed)), role.name, result, fmtBool(resumed))
			}
		}
		buckets, count, sum := role.h.Durations()
		ch <- prometheus.MustNewConstHistogram(handshakeSecondsDesc, count, sum, buckets, role.name)
	}
}

func fmtBool(b bool) string {
	if b {
		return "true"
	}
	return "false"
}
