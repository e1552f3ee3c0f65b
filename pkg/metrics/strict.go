package metrics

import "github.com/prometheus/client_golang/prometheus"

// StrictCounts are strict inbound's BPF counters (docs/identity.md 5.3),
// read at scrape time.
type StrictCounts struct {
	// Dropped are SYNs to strict workloads that no mesh socket sent; Mesh
	// those a mesh socket sent, Exempt those to an exempt port, Loopback
	// those over loopback inside a workload's own network namespace.
	Dropped, Mesh, Exempt, Loopback uint64
}

var (
	strictDroppedDesc = prometheus.NewDesc("smesh_strict_dropped_total",
		"SYNs to strict workloads dropped because no mesh socket sent them (each retransmission counts again).",
		nil, nil)
	strictPassedDesc = prometheus.NewDesc("smesh_strict_passed_total",
		"SYNs to strict workloads let in, by reason: mesh (a mesh socket sent it), exempt (an exempt port), loopback (inside the workload's own network namespace).",
		[]string{"reason"}, nil)
)

// StrictCollector exports StrictCounts read from fn on every scrape; none
// when fn says strict inbound is unavailable (ok false). Register it with
// Metrics.Registry.
func StrictCollector(fn func() (c StrictCounts, ok bool, err error)) prometheus.Collector {
	return strictCollector(fn)
}

type strictCollector func() (StrictCounts, bool, error)

func (c strictCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- strictDroppedDesc
	ch <- strictPassedDesc
}

func (c strictCollector) Collect(ch chan<- prometheus.Metric) {
	sc, ok, err := c()
	if !ok {
		return
	}
	if err != nil {
		ch <- prometheus.NewInvalidMetric(strictDroppedDesc, err)
		return
	}
	ch <- prometheus.MustNewConstMetric(strictDroppedDesc, prometheus.CounterValue, float64(sc.Dropped))
	for _, r := range []struct {
		reason string
		v      uint64
	}{{"mesh", sc.Mesh}, {"exempt", sc.Exempt}, {"loopback", sc.Loopback}} {
		ch <- prometheus.MustNewConstMetric(strictPassedDesc, prometheus.CounterValue, float64(r.v), r.reason)
	}
}
