package metrics

import "github.com/prometheus/client_golang/prometheus"

// ServiceCounts are what the data path did with connections to Services,
// and how full its service maps are, read at scrape time.
type ServiceCounts struct {
	// Connections connect4/6 sent to a backend: on this node (spliced;
	// relayed in copy mode), elsewhere through the tunnel, elsewhere
	// directly (not captured); and those refused for want of a backend.
	// From BPF.
	LocalSplice, Tunnel, Direct, NoBackend uint64
	// Services and Backends are the entries in the service maps.
	Services, Backends int
}

var (
	serviceConnsDesc = prometheus.NewDesc("smesh_service_connections_total",
		"Connections to a Service address sent to a backend by connect4/connect6, by result: local_splice (a backend on this node), tunnel (captured to a backend on another node), direct (a backend elsewhere, not captured), no_backend (refused: the Service had no usable backend).",
		[]string{"result"}, nil)
	serviceEntriesDesc = prometheus.NewDesc("smesh_service_map_entries",
		"Entries in the kernel's service maps: services (one per Service address and port) and backends (slots of usable backends).",
		[]string{"map"}, nil)
)

// ServiceCollector exports ServiceCounts read from fn on every scrape.
// Register it with Metrics.Registry.
func ServiceCollector(fn func() (ServiceCounts, error)) prometheus.Collector {
	return serviceCollector(fn)
}

type serviceCollector func() (ServiceCounts, error)

func (c serviceCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- serviceConnsDesc
	ch <- serviceEntriesDesc
}

func (c serviceCollector) Collect(ch chan<- prometheus.Metric) {
	sc, err := c()
	ch <- prometheus.MustNewConstMetric(serviceEntriesDesc, prometheus.GaugeValue, float64(sc.Services), "services")
	ch <- prometheus.MustNewConstMetric(serviceEntriesDesc, prometheus.GaugeValue, float64(sc.Backends), "backends")
	if err != nil {
		// The BPF counters could not be read: leave them out rather than
		// report a wrong value.
		ch <- prometheus.NewInvalidMetric(serviceConnsDesc, err)
		return
	}
	for _, r := range []struct {
		result string
		v      uint64
	}{{"local_splice", sc.LocalSplice}, {"tunnel", sc.Tunnel}, {"direct", sc.Direct}, {"no_backend", sc.NoBackend}} {
		ch <- prometheus.MustNewConstMetric(serviceConnsDesc, prometheus.CounterValue, float64(r.v), r.result)
	}
}
