package metrics

import "github.com/prometheus/client_golang/prometheus"

// NamespaceCounts are what smeshd knows of the network namespaces it serves,
// read at scrape time.
type NamespaceCounts struct {
	// Ready and NotReady count the namespaces (enrolled ones and smeshd's
	// own) by whether smeshd's listeners in them are up.
	Ready, NotReady int
	// UnreadyOpen and UnreadyClosed count the connections connect4 would
	// have captured in a namespace without a ready listener: let through
	// uncaptured (on_failure = "open") or refused ("closed"). From BPF.
	UnreadyOpen, UnreadyClosed uint64
}

var (
	namespacesDesc = prometheus.NewDesc("smesh_namespaces",
		"Network namespaces smeshd serves (those enrolled processes live in, and its own), by whether its listeners in them are up.",
		[]string{"state"}, nil)
	unreadyDesc = prometheus.NewDesc("smesh_capture_unready_total",
		"Connections connect4 would have captured in a namespace where smeshd had no listener yet, by what capture.on_failure did with them (open: let through uncaptured, closed: refused).",
		[]string{"action"}, nil)
)

// NamespaceCollector exports NamespaceCounts read from fn on every scrape.
// Register it with Metrics.Registry.
func NamespaceCollector(fn func() (NamespaceCounts, error)) prometheus.Collector {
	return namespaceCollector(fn)
}

type namespaceCollector func() (NamespaceCounts, error)

func (c namespaceCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- namespacesDesc
	ch <- unreadyDesc
}

func (c namespaceCollector) Collect(ch chan<- prometheus.Metric) {
	nc, err := c()
	ch <- prometheus.MustNewConstMetric(namespacesDesc, prometheus.GaugeValue, float64(nc.Ready), "ready")
	ch <- prometheus.MustNewConstMetric(namespacesDesc, prometheus.GaugeValue, float64(nc.NotReady), "not_ready")
	if err != nil {
		// The BPF counters could not be read: leave them out rather than
		// report a wrong value.
		ch <- prometheus.NewInvalidMetric(unreadyDesc, err)
		return
	}
	ch <- prometheus.MustNewConstMetric(unreadyDesc, prometheus.CounterValue, float64(nc.UnreadyOpen), "open")
	ch <- prometheus.MustNewConstMetric(unreadyDesc, prometheus.CounterValue, float64(nc.UnreadyClosed), "closed")
}
