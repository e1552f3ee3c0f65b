package bench

import (
	"context"
	"errors"
	"fmt"
	"maps"
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

// PolicyReport is what the rules cost: each policy mode against its base,
// and the decision itself in this process.
type PolicyReport struct {
	Rules int `json:"rules"`
	// DecideP50ns is the median time of one Set.Decide for the client's
	// connection with Rules rules compiled; DecideNoneP50ns without any.
	DecideP50ns     float64      `json:"decide_p50_ns"`
	DecideNoneP50ns float64      `json:"decide_none_p50_ns"`
	Pairs           []PolicyPair `json:"pairs"`
}

// PolicyPair is a policy mode against its base from the same run: ratios
// policy/none of the medians, and the probes that showed the rules in force.
type PolicyPair struct {
	Mode string `json:"mode"`
	Base string `json:"base"`
	// IntruderProbe is what a connection from the intruder met with the
	// rules in force ("refused: ..."), BaseIntruderProbe without them
	// ("allowed"); ClientProbe the client's ("allowed"; with
	// PolicyDenyClient "refused: ...").
	IntruderProbe     string  `json:"intruder_probe,omitempty"`
	BaseIntruderProbe string  `json:"base_intruder_probe,omitempty"`
	ClientProbe       string  `json:"client_probe"`
	ThroughputRatio   float64 `json:"throughput_ratio,omitempty"`
	RRP50Ratio        float64 `json:"rr_p50_ratio,omitempty"`
	RRP99Ratio        float64 `json:"rr_p99_ratio,omitempty"`
	ConnRatio         float64 `json:"conn_per_s_ratio,omitempty"`
	// ConnAddedUs is what the rules add to one connection (connect, one
	// request, close) of the connection-rate workload: 1/rate with
	// rules minus 1/rate without, in microseconds.
	ConnAddedUs float64 `json:"conn_added_us"`
}

// checkPolicy times the decision and shows, in every policy mode, that the
// rules are in force before anything is measured: the intruder's probe is
// refused with them and allowed without them (in the base mode), the
// client's allowed (with PolicyDenyClient: the client's refused). A probe
// that says otherwise stops the run: figures "with rules" that no rule
// touched would be worse than none.
func checkPolicy(ctx context.Context, opts Options, envs map[string]*modeEnv) (*PolicyReport, error) {
	rules := PolicyRules(opts.PolicyRules, opts.PolicyDenyClient)
	rep := &PolicyReport{Rules: opts.PolicyRules}
	d, v, err := DecideCost(rules)
	if err != nil {
		return nil, fmt.Errorf("compiling the bench's rules: %w", err)
	}
	if v.Allow == opts.PolicyDenyClient {
		return nil, fmt.Errorf("the bench's rules decide %+v for the client", v)
	}
	none, _, err := DecideCost("")
	if err != nil {
		return nil, err
	}
	rep.DecideP50ns, rep.DecideNoneP50ns = float64(d.Nanoseconds()), float64(none.Nanoseconds())
	var failed []error
	for _, m := range orderedModes(slices.Collect(maps.Keys(envs))) {
		if !policyMode(m) {
			continue
		}
		e := envs[m]
		p := PolicyPair{Mode: m, Base: policyBase(m)}
		if opts.PolicyDenyClient {
			if p.ClientProbe, err = e.probeRefused(ctx, opts.Exe, e.client); err != nil {
				return rep, err
			}
			rep.Pairs = append(rep.Pairs, p)
			if !strings.HasPrefix(p.ClientProbe, "refused") {
				failed = append(failed, fmt.Errorf("mode %s: with rules denying the client, its connection was %q: the rules are not in force", m, p.ClientProbe))
			}
			continue
		}
		if p.IntruderProbe, err = e.probeRefused(ctx, opts.Exe, e.intruder); err != nil {
			return rep, err
		}
		if p.ClientProbe, err = e.probe(ctx, opts.Exe, e.client); err != nil {
			return rep, err
		}
		if b := envs[p.Base]; b != nil {
			if p.BaseIntruderProbe, err = b.probe(ctx, opts.Exe, b.intruder); err != nil {
				return rep, err
			}
		}
		rep.Pairs = append(rep.Pairs, p)
		switch {
		case !strings.HasPrefix(p.IntruderProbe, "refused"):
			failed = append(failed, fmt.Errorf("mode %s: the rules are not in force (a connection from %s, which they deny, was %q): no policy figures", m, intruderIdentity, p.IntruderProbe))
		case p.ClientProbe != "allowed":
			failed = append(failed, fmt.Errorf("mode %s: the rules allow the client, yet its connection was %q", m, p.ClientProbe))
		case p.BaseIntruderProbe != "" && p.BaseIntruderProbe != "allowed":
			failed = append(failed, fmt.Errorf("mode %s: without rules the intruder's connection was %q too, so its refusal shows nothing", p.Base, p.BaseIntruderProbe))
		}
	}
	return rep, errors.Join(failed...)
}
