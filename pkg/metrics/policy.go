package metrics

import "github.com/prometheus/client_golang/prometheus"

// The values of the path label of smesh_policy_denied_total: where the
// connection was decided (docs/identity.md, section 5).
const (
	PolicyPathTunnel   = "tunnel"    // the receiving smeshd, after the header
	PolicyPathSameNode = "same_node" // connect4/6, in the kernel
)

// PolicyDenials counts the connections denied on one path by one policy
// for one reason (pkg/policy's Verdict: Policy is "" for not_allowed).
type PolicyDenials struct {
	Path, Policy, Reason string
	Count                uint64
}

// PolicyCounts are the authorization policies' counters and state, read at
// scrape time from whoever keeps them (the tunnel server's counters, BPF's
// per-policy counters, the current policy.Set).
type PolicyCounts struct {
	Denied []PolicyDenials
	// Invalid are the keys ("namespace/name") of the policies that cannot
	// be enforced as written (policy.Set.Problems): each denies every
	// connection to what it selects.
	Invalid []string
}

var (
	policyDeniedDesc = prometheus.NewDesc("smesh_policy_denied_total",
		"Connections refused by authorization policy, by path (tunnel: by the receiving smeshd; same_node: by connect4/6), deciding policy (\"\" when ALLOW policies select the destination and none matched) and reason (denied_by_policy, not_allowed, invalid_policy).",
		[]string{"path", "policy", "reason"}, nil)
	policyInvalidDesc = prometheus.NewDesc("smesh_policy_invalid",
		"1 for each authorization policy that cannot be enforced as written (L7 fields, CUSTOM or AUDIT, unknown fields): it denies every connection to the workloads it selects; /debug/policy and the log say why.",
		[]string{"policy"}, nil)
)

// PolicyCollector exports PolicyCounts read from fn on every scrape.
// Register it with Metrics.Registry.
func PolicyCollector(fn func() (PolicyCounts, error)) prometheus.Collector {
	return policyCollector(fn)
}

type policyCollector func() (PolicyCounts, error)

func (c policyCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- policyDeniedDesc
	ch <- policyInvalidDesc
}

func (c policyCollector) Collect(ch chan<- prometheus.Metric) {
	pc, err := c()
	for _, p := range pc.Invalid {
		ch <- prometheus.MustNewConstMetric(policyInvalidDesc, prometheus.GaugeValue, 1, p)
	}
	if err != nil {
		// The counters could not be read: leave them out rather than
		// report a wrong value.
		ch <- prometheus.NewInvalidMetric(policyDeniedDesc, err)
		return
	}
	for _, d := range pc.Denied {
		ch <- prometheus.MustNewConstMetric(policyDeniedDesc, prometheus.CounterValue, float64(d.Count), d.Path, d.Policy, d.Reason)
	}
}
