package metrics

import "github.com/prometheus/client_golang/prometheus"

// Bytes and active connections of the splice path are counted in BPF, those
// of the other paths in Go. One collector produces both metric families
// whole, so a series can never be registered twice.
var (
	bytesDesc = prometheus.NewDesc("smesh_bytes_total",
		"Bytes moved, by data path and direction (tx: client to server, rx: server to client). Spliced bytes are counted in BPF.",
		[]string{"path", "direction"}, nil)
	activeDesc = prometheus.NewDesc("smesh_active_connections",
		"Connections open now, by data path. For splice: spliced hops, half the sockets in the sockhash.",
		[]string{"path"}, nil)
	splicedMsgsDesc = prometheus.NewDesc("smesh_spliced_messages_total",
		"sendmsg calls spliced by sk_msg, by direction (tx: client to server, rx: server to client).",
		[]string{"direction"}, nil)
	spliceUpDesc = prometheus.NewDesc("smesh_splice_source_up",
		"1 if the BPF splice counters were read for this scrape, 0 if reading them failed (their series are then left out).",
		nil, nil)
)

// dataPathCollector exports the per-path bytes and active connections.
type dataPathCollector struct{ m *Metrics }

func (c dataPathCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- bytesDesc
	ch <- activeDesc
	ch <- splicedMsgsDesc
	ch <- spliceUpDesc
}

func (c dataPathCollector) Collect(ch chan<- prometheus.Metric) {
	for _, p := range paths {
		if p == PathSplice {
			continue
		}
		s := c.m.paths[p]
		ch <- prometheus.MustNewConstMetric(bytesDesc, prometheus.CounterValue, float64(s.tx.Load()), p, "tx")
		ch <- prometheus.MustNewConstMetric(bytesDesc, prometheus.CounterValue, float64(s.rx.Load()), p, "rx")
		ch <- prometheus.MustNewConstMetric(activeDesc, prometheus.GaugeValue, float64(s.active.Load()), p)
	}

	sc, ok, err := c.m.Splice()
	if !ok {
		return
	}
	if err != nil {
		ch <- prometheus.MustNewConstMetric(spliceUpDesc, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(spliceUpDesc, prometheus.GaugeValue, 1)
	ch <- prometheus.MustNewConstMetric(bytesDesc, prometheus.CounterValue, float64(sc.TxBytes), PathSplice, "tx")
	ch <- prometheus.MustNewConstMetric(bytesDesc, prometheus.CounterValue, float64(sc.RxBytes), PathSplice, "rx")
	ch <- prometheus.MustNewConstMetric(splicedMsgsDesc, prometheus.CounterValue, float64(sc.TxMsgs), "tx")
	ch <- prometheus.MustNewConstMetric(splicedMsgsDesc, prometheus.CounterValue, float64(sc.RxMsgs), "rx")
	ch <- prometheus.MustNewConstMetric(activeDesc, prometheus.GaugeValue, float64(sc.Sockets/2), PathSplice)
}
