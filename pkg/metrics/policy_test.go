package metrics

import (
	"errors"
	"testing"

	dto "github.com/prometheus/client_model/go"
)

func TestPolicyCollector(t *testing.T) {
	m := New("v")
	var pc PolicyCounts
	var err error
	m.Registry().MustRegister(PolicyCollector(func() (PolicyCounts, error) { return pc, err }))

	fams := scrape(t, m)
	expect(t, fams, "smesh_policy_denied_total", dto.MetricType_COUNTER)
	expect(t, fams, "smesh_policy_invalid", dto.MetricType_GAUGE)

	pc = PolicyCounts{
		Denied: []PolicyDenials{
			{Path: PolicyPathTunnel, Policy: "prod/no-dev", Reason: "denied_by_policy", Count: 3},
			{Path: PolicyPathSameNode, Policy: "", Reason: "not_allowed", Count: 2},
			{Path: PolicyPathTunnel, Policy: "prod/l7", Reason: "invalid_policy", Count: 1},
		},
		Invalid: []string{"prod/l7"},
	}
	fams = scrape(t, m)
	expect(t, fams, "smesh_policy_denied_total", dto.MetricType_COUNTER,
		`{path="tunnel",policy="prod/no-dev",reason="denied_by_policy"} 3`,
		`{path="same_node",policy="",reason="not_allowed"} 2`,
		`{path="tunnel",policy="prod/l7",reason="invalid_policy"} 1`)
	expect(t, fams, "smesh_policy_invalid", dto.MetricType_GAUGE, `{policy="prod/l7"} 1`)

	// Counters that cannot be read are left out; the invalid policies
	// still show.
	err = errors.New("no map")
	fams = scrape(t, m)
	expect(t, fams, "smesh_policy_denied_total", dto.MetricType_COUNTER)
	expect(t, fams, "smesh_policy_invalid", dto.MetricType_GAUGE, `{policy="prod/l7"} 1`)
}
