package config

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/smesh-dev/smesh/pkg/policy"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

const policyDoc = `
[[policy]]
name = "web-from-clients"
action = "ALLOW"
workloads = ["spiffe://smesh.local/node/a/unit/web.service"]
rules = [
  { from = [{ principals = ["smesh.local/node/b/*"], not_principals = ["*/unit/batch.service"] }], to = [{ ports = [80, 443] }] },
  { from = [{ ip_blocks = ["198.18.0.0/15", "fd00:5e::7"], not_ip_blocks = ["198.18.9.9"] }] },
]

[[policy]]
name = "no-ssh-from-outside"
action = "DENY"

[[policy.rules]]
to = [{ not_ports = [80, 443] }]
[[policy.rules.from]]
not_namespaces = ["prod"]
namespaces = ["dev*"]

[[policy]]
name = "nothing"
`

func TestPolicies(t *testing.T) {
	c, err := Parse([]byte(policyDoc))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Policies) != 3 {
		t.Fatalf("got %d policies", len(c.Policies))
	}
	ps := ToPolicies(c.Policies)
	if ps[0].Action != policy.Allow || ps[1].Action != policy.Deny || ps[2].Action != policy.Allow || ps[2].Rules != nil {
		t.Fatalf("converted: %+v", ps)
	}
	if got := ps[1].Rules[0]; got.From[0].NotNamespaces[0] != "prod" || got.To[0].NotPorts[1] != 443 {
		t.Fatalf("policy.rules tables: %+v", got)
	}

	set := policy.NewSet(ps, "")
	if p := set.Problems(); len(p) != 0 {
		t.Fatalf("valid [[policy]] entries have problems: %+v", p)
	}
	web := policy.Workload{ID: spiffeid.RequireFromString("spiffe://smesh.local/node/a/unit/web.service")}
	client := policy.Source{ID: spiffeid.RequireFromString("spiffe://smesh.local/node/b/unit/client.service")}
	batch := policy.Source{ID: spiffeid.RequireFromString("spiffe://smesh.local/node/b/unit/batch.service")}
	byIP := policy.Source{IP: netip.MustParseAddr("fd00:5e::7")}
	dev := policy.Source{ID: spiffeid.RequireFromString("spiffe://smesh.local/ns/dev/sa/x")}
	for _, d := range []struct {
		src  policy.Source
		port uint16
		want policy.Verdict
	}{
		{client, 80, policy.Verdict{Allow: true, Policy: "web-from-clients"}},
		{client, 22, policy.Verdict{Reason: policy.ReasonNotAllowed}},
		{batch, 80, policy.Verdict{Reason: policy.ReasonNotAllowed}},
		{byIP, 22, policy.Verdict{Allow: true, Policy: "web-from-clients"}},
		{policy.Source{IP: netip.MustParseAddr("198.18.9.9")}, 22, policy.Verdict{Reason: policy.ReasonNotAllowed}},
		{dev, 22, policy.Verdict{Policy: "no-ssh-from-outside", Reason: policy.ReasonDenied}},
	} {
		if got := set.Decide(d.src, web, d.port); got != d.want {
			t.Errorf("Decide(%v %v, web, %d) = %+v, want %+v", d.src.ID, d.src.IP, d.port, got, d.want)
		}
	}
	// "nothing" (ALLOW, no rules, every workload) denies to the others.
	other := policy.Workload{ID: spiffeid.RequireFromString("spiffe://smesh.local/node/a/unit/db.service")}
	if got := set.Decide(client, other, 80); got.Allow {
		t.Errorf("an ALLOW policy without rules allowed: %+v", got)
	}
}

func TestPolicyErrors(t *testing.T) {
	for _, bad := range []struct{ doc, want string }{
		{"[[policy]]\naction = \"ALLOW\"\n", "policy[0].name: is empty"},
		{"[kubernetes]\npolicy_root_namespace = \"\"\n", `kubernetes.policy_root_namespace: "" is not a namespace name`},
		{"[kubernetes]\npolicy_root_namespace = \"Istio_System\"\n", `kubernetes.policy_root_namespace: "Istio_System" is not a namespace name`},
		{"[[policy]]\nname = \"a\"\n[[policy]]\nname = \"a\"\n", `policy[1].name: "a" is also the name of policy[0]`},
		{"[[policy]]\nname = \"a\"\naction = \"allow\"\n", `policy[0].action: "allow" is not allowed (want one of "ALLOW", "DENY")`},
		{"[[policy]]\nname = \"a\"\naction = \"CUSTOM\"\n", `policy[0].action: "CUSTOM" is not allowed`},
		{"[[policy]]\nname = \"a\"\nrules = [{to = [{ports = [0]}]}]\n", "policy[0].rules[0].to[0].ports: port 0 is not a port (want 1 to 65535)"},
		{"[[policy]]\nname = \"a\"\nrules = [{to = [{not_ports = [8080, 0]}]}]\n", "policy[0].rules[0].to[0].not_ports: port 0"},
		{"[[policy]]\nname = \"a\"\nrules = [{to = [{ports = [70000]}]}]\n", "policy.rules.to.ports"},
		{"[[policy]]\nname = \"a\"\nrules = [{from = [{ip_blocks = [\"10.0.0.0/33\"]}]}]\n", `policy[0].rules[0].from[0].ip_blocks: "10.0.0.0/33" is not a CIDR or an IP address`},
		{"[[policy]]\nname = \"a\"\nrules = [{from = [{not_ip_blocks = [\"10.0.0.x\"]}]}]\n", `not_ip_blocks: "10.0.0.x" is not a CIDR`},
		{"[[policy]]\nname = \"a\"\nrules = [{from = [{}]}]\n", "policy[0].rules[0].from[0]: is empty"},
		{"[[policy]]\nname = \"a\"\nrules = [{to = [{}]}]\n", "policy[0].rules[0].to[0]: is empty"},
		{"[[policy]]\nname = \"a\"\nrules = [{from = [{principals = [\"\"]}]}]\n", `principals: "" matches nothing`},
		{"[[policy]]\nname = \"a\"\nworkloads = [\"web.service\"]\n", `policy[0].workloads: workload identity "web.service"`},
		// Unknown keys, L7 ones included, are refused with their line.
		{"[[policy]]\nname = \"a\"\nrules = [{to = [{methods = [\"GET\"]}]}]\n", "line 3: unknown key policy.rules.to.methods"},
		{"[[policy]]\nname = \"a\"\n[[policy.rules]]\nwhen = []\n", "line 4: unknown key policy.rules.when"},
		{"[[policy]]\nname = \"a\"\nselector = {app = \"web\"}\n", "line 3: unknown key policy.selector"},
		{"[[policy]]\nname = \"a\"\n[[policy.rules]]\n[[policy.rules.from]]\nipBlocks = [\"10.0.0.0/8\"]\n", "line 5: unknown key policy.rules.from.ipBlocks"},
	} {
		_, err := Parse([]byte(bad.doc))
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%q: error %v, want one containing %q", bad.doc, err, bad.want)
		}
	}
}

// TestPolicyExample keeps the commented [[policy]] example of the shipped
// smesh.toml valid.
func TestPolicyExample(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("..", "..", "smesh.toml"))
	if err != nil {
		t.Fatal(err)
	}
	_, example, ok := strings.Cut(string(data), "\n# [[policy]]\n")
	if !ok {
		t.Fatal("smesh.toml has no commented [[policy]] example")
	}
	var doc strings.Builder
	doc.WriteString("[[policy]]\n")
	for line := range strings.SplitSeq(example, "\n") {
		if l, ok := strings.CutPrefix(line, "# "); ok && !strings.HasPrefix(l, "#") {
			doc.WriteString(l + "\n")
		}
	}
	c, err := Parse([]byte(doc.String()))
	if err != nil {
		t.Fatalf("%v\n%s", err, doc.String())
	}
	if len(c.Policies) != 1 || len(c.Policies[0].Rules) != 2 {
		t.Fatalf("example parsed as %+v", c.Policies)
	}
}
