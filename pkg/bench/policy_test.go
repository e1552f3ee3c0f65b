package bench

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/policy"
)

func TestPolicyRules(t *testing.T) {
	client := policy.Source{ID: spiffeid.RequireFromString(clientIdentity), IP: netip.MustParseAddr("198.18.100.1")}
	intruder := policy.Source{ID: spiffeid.RequireFromString(intruderIdentity), IP: netip.MustParseAddr("198.18.100.1")}
	stranger := policy.Source{ID: spiffeid.RequireFromString("spiffe://smesh.local/ns/elsewhere/sa/x")}
	server := policy.Workload{ID: spiffeid.RequireFromString(serverIdentity)}
	for _, n := range []int{1, 2, 7, 100} {
		rules := PolicyRules(n, false)
		cfg, err := config.Parse([]byte(rules))
		if err != nil {
			t.Fatalf("%d rules do not parse as smesh.toml: %v\n%s", n, err, rules)
		}
		if len(cfg.Policies) != n {
			t.Fatalf("%d rules asked, %d made", n, len(cfg.Policies))
		}
		set := policy.NewSet(config.ToPolicies(cfg.Policies), "")
		if p := set.Problems(); len(p) > 0 {
			t.Fatalf("%d rules: problems %v", n, p)
		}
		if v := set.Decide(client, server, serverPort); !v.Allow || v.Policy != "bench-allow-client" {
			t.Errorf("%d rules: client to the server's port: %+v, want allowed by bench-allow-client", n, v)
		}
		if v := set.Decide(client, server, serverPort+1); v.Allow {
			t.Errorf("%d rules: client to another port allowed: %+v", n, v)
		}
		if v := set.Decide(stranger, server, serverPort); v.Allow {
			t.Errorf("%d rules: a stranger allowed: %+v", n, v)
		}
		v := set.Decide(intruder, server, serverPort)
		if v.Allow {
			t.Errorf("%d rules: intruder allowed: %+v", n, v)
		}
		if n >= 2 && v.Policy != "bench-deny-intruder" {
			t.Errorf("%d rules: intruder %+v, want denied by bench-deny-intruder", n, v)
		}
		if n >= 100 {
			// Realistic: every kind of rule is there, and all but the
			// other workloads' select the server.
			for _, kind := range []string{"allow-frontend-", "allow-team-", "allow-client-admin-", "allow-payments-", "deny-blocks-", "deny-outsiders-", `action = "DENY"`, "not_namespaces", "ip_blocks"} {
				if !strings.Contains(rules, kind) {
					t.Errorf("no %q among %d rules", kind, n)
				}
			}
			if got := strings.Count(rules, serverIdentity); got < n*3/4 {
				t.Errorf("%d of %d rules select the server, want most", got, n)
			}
		}
	}

	deny, err := config.Parse([]byte(PolicyRules(100, true)))
	if err != nil {
		t.Fatal(err)
	}
	set := policy.NewSet(config.ToPolicies(deny.Policies), "")
	if v := set.Decide(client, server, serverPort); v.Allow || v.Reason != policy.ReasonDenied {
		t.Errorf("deny variant: client %+v, want denied_by_policy", v)
	}
}

func TestDecideCost(t *testing.T) {
	d, v, err := DecideCost(PolicyRules(100, false))
	if err != nil {
		t.Fatal(err)
	}
	if !v.Allow || d <= 0 {
		t.Fatalf("DecideCost: %v, %+v", d, v)
	}
	t.Logf("Set.Decide with 100 rules: %v p50", d)
}
