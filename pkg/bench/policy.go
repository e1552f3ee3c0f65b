package bench

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/policy"
)

// The identities of the policy modes' workloads (docs/identity.md 2): the
// client the rules allow, the server they select, and an intruder, a
// process beside the client that the rules do not allow, whose refused
// probe shows the rules are in force before any figure is reported.
const (
	clientIdentity   = "spiffe://smesh.local/ns/bench/sa/client"
	serverIdentity   = "spiffe://smesh.local/ns/bench/sa/server"
	intruderIdentity = "spiffe://smesh.local/ns/bench/sa/intruder"
)

// serverPort is the port of every mode's bench server.
const serverPort = 9000

// policyMode says whether a mode is the twin of another (its base, same
// world and identities) with the bench's [[policy]] rules in force.
func policyMode(mode string) bool { return strings.HasSuffix(mode, "-policy") }

// policyBase is the mode a policy mode is compared with: the same world
// without rules.
func policyBase(mode string) string { return strings.TrimSuffix(mode, "-policy") }

// principal is a SPIFFE ID as Istio's principals write it.
func principal(id string) string { return strings.TrimPrefix(id, "spiffe://") }

// PolicyRules returns n [[policy]] tables (smesh.toml) that select the
// bench's server: the first allows the client to the server's port (with
// denyClient, it denies it instead: a run whose connections must all fail),
// the second denies the intruder, and the rest are what a node with many
// policies carries and this connection matches none of: allows from other
// principals and namespaces, an allow of the client to other ports, allows
// of other workloads, denies by foreign address blocks and for sources
// outside a list of namespaces that includes the client's. Every table is
// evaluated for the client's connections (only the other workloads' allows
// select another destination), so the cost is the rules', not a lookup's.
func PolicyRules(n int, denyClient bool) string {
	var b strings.Builder
	table := func(name, action string, workloads []string, from, to string) {
		fmt.Fprintf(&b, "[[policy]]\nname = %q\naction = %q\nworkloads = [%s]\nrules = [{", name, action, quoteAll(workloads))
		var parts []string
		if from != "" {
			parts = append(parts, "from = [{"+from+"}]")
		}
		if to != "" {
			parts = append(parts, "to = [{"+to+"}]")
		}
		b.WriteString(strings.Join(parts, ", "))
		b.WriteString("}]\n\n")
	}
	server := []string{serverIdentity}
	port := fmt.Sprintf("ports = [%d]", serverPort)
	for i := range n {
		switch {
		case i == 0 && denyClient:
			table("bench-deny-client", "DENY", server, fmt.Sprintf("principals = [%q]", principal(clientIdentity)), port)
		case i == 0:
			table("bench-allow-client", "ALLOW", server, fmt.Sprintf("principals = [%q]", principal(clientIdentity)), port)
		case i == 1:
			table("bench-deny-intruder", "DENY", server, fmt.Sprintf("principals = [%q]", principal(intruderIdentity)), "")
		default:
			switch i % 6 {
			case 0:
				table(fmt.Sprintf("allow-frontend-%d", i), "ALLOW", server,
					fmt.Sprintf("principals = [%q]", fmt.Sprintf("smesh.local/ns/shop-%d/sa/frontend", i)), port)
			case 1:
				table(fmt.Sprintf("allow-team-%d", i), "ALLOW", server,
					fmt.Sprintf("namespaces = [%q]", fmt.Sprintf("team-%d", i)), port)
			case 2:
				table(fmt.Sprintf("allow-client-admin-%d", i), "ALLOW", server,
					fmt.Sprintf("principals = [%q]", principal(clientIdentity)), fmt.Sprintf("ports = [%d]", 10000+i))
			case 3:
				table(fmt.Sprintf("allow-payments-%d", i), "ALLOW",
					[]string{fmt.Sprintf("spiffe://smesh.local/ns/shop-%d/sa/payments", i)},
					`namespaces = ["bench"]`, "ports = [8080]")
			case 4:
				table(fmt.Sprintf("deny-blocks-%d", i), "DENY", server,
					fmt.Sprintf("ip_blocks = [%q]", fmt.Sprintf("10.%d.0.0/16", i%250)), "")
			case 5:
				table(fmt.Sprintf("deny-outsiders-%d", i), "DENY", server,
					fmt.Sprintf("not_namespaces = [\"bench\", %q]", fmt.Sprintf("team-%d", i)), fmt.Sprintf("ports = [%d]", 20000+i))
			}
		}
	}
	return b.String()
}

func quoteAll(vs []string) string {
	q := make([]string, len(vs))
	for i, v := range vs {
		q[i] = fmt.Sprintf("%q", v)
	}
	return strings.Join(q, ", ")
}

// policySet compiles rules (PolicyRules' output) as smeshd does: parsed
// and validated as smesh.toml, converted, compiled.
func policySet(rules string) (*policy.Set, error) {
	cfg, err := config.Parse([]byte(rules))
	if err != nil {
		return nil, err
	}
	return policy.NewSet(config.ToPolicies(cfg.Policies), ""), nil
}

// DecideCost is the median time of one Set.Decide for the client's
// connection to the server, with rules (PolicyRules' output) compiled, and
// whether that decision allows it. Measured in batches (a clock read costs
// as much as a decision): the median of the batches' per-call means.
func DecideCost(rules string) (time.Duration, policy.Verdict, error) {
	set, err := policySet(rules)
	if err != nil {
		return 0, policy.Verdict{}, err
	}
	src := policy.Source{ID: spiffeid.RequireFromString(clientIdentity), IP: netip.MustParseAddr("198.18.100.1")}
	dst := policy.Workload{ID: spiffeid.RequireFromString(serverIdentity)}
	v := set.Decide(src, dst, serverPort)
	const batches, perBatch = 201, 2000
	per := make([]float64, 0, batches)
	for range batches {
		t0 := time.Now()
		for range perBatch {
			v = set.Decide(src, dst, serverPort)
		}
		per = append(per, float64(time.Since(t0))/perBatch)
	}
	slices.Sort(per)
	return time.Duration(per[len(per)/2]), v, nil
}
