package policy

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

func istio(t testing.TB, doc string) Policy {
	t.Helper()
	var spec any
	if err := yaml.Unmarshal([]byte(doc), &spec); err != nil {
		t.Fatalf("test policy: %v", err)
	}
	return FromIstio("prod", "p", spec)
}

func TestFromIstio(t *testing.T) {
	p := istio(t, `
selector:
  matchLabels: {app: web}
action: DENY
rules:
- from:
  - source:
      principals: ["cluster.local/ns/prod/sa/sleep", "*/sa/x"]
      notPrincipals: ["a*"]
      namespaces: ["prod"]
      notNamespaces: ["dev"]
      ipBlocks: ["10.0.0.0/8", "fd00::1"]
      notIpBlocks: ["10.1.0.0/16"]
  - source: {namespaces: ["x"]}
  to:
  - operation: {ports: ["80", "443"], notPorts: ["8080"]}
- {}
`)
	if p.Invalid != "" {
		t.Fatalf("Invalid = %q", p.Invalid)
	}
	want := Policy{
		Name: "p", Namespace: "prod", Selector: map[string]string{"app": "web"}, Action: Deny,
		Rules: []Rule{{
			From: []Peer{{
				Principals: []string{"cluster.local/ns/prod/sa/sleep", "*/sa/x"}, NotPrincipals: []string{"a*"},
				Namespaces: []string{"prod"}, NotNamespaces: []string{"dev"},
				IPBlocks: []string{"10.0.0.0/8", "fd00::1"}, NotIPBlocks: []string{"10.1.0.0/16"},
			}, {Namespaces: []string{"x"}}},
			To: []Operation{{Ports: []uint16{80, 443}, NotPorts: []uint16{8080}}},
		}, {}},
	}
	got, _ := json.Marshal(p)
	exp, _ := json.Marshal(want)
	if string(got) != string(exp) {
		t.Fatalf("FromIstio =\n%s\nwant\n%s", got, exp)
	}

	for doc, want := range map[string]Policy{
		"":              {Action: Allow},                    // allow nothing
		"{}":            {Action: Allow},                    // idem
		"action: ALLOW": {Action: Allow},                    // no rules
		"rules: [{}]":   {Action: Allow, Rules: []Rule{{}}}, // allow all
		"rules: []":     {Action: Allow, Rules: []Rule{}},
	} {
		p := istio(t, doc)
		if p.Invalid != "" || p.Action != want.Action || len(p.Rules) != len(want.Rules) {
			t.Errorf("%q: %+v, want %+v", doc, p, want)
		}
	}
}

func TestFromIstioInvalid(t *testing.T) {
	for doc, want := range map[string]string{
		"action: CUSTOM\nprovider: {name: x}": "action \"CUSTOM\"",
		"action: AUDIT":                       "action \"AUDIT\"",
		"action: 1":                           "not a string",
		"rules: [{to: [{operation: {methods: [GET]}}]}]":              "rules[0].to[0].operation.methods is not supported at L4",
		"rules: [{to: [{operation: {paths: [/a], ports: ['80']}}]}]":  "paths is not supported",
		"rules: [{to: [{operation: {hosts: [a]}}]}]":                  "hosts",
		"rules: [{to: [{operation: {notMethods: [GET]}}]}]":           "notMethods",
		"rules: [{from: [{source: {requestPrincipals: ['*']}}]}]":     "requestPrincipals is not supported",
		"rules: [{from: [{source: {remoteIpBlocks: [1.2.3.4]}}]}]":    "remoteIpBlocks",
		"rules: [{from: [{source: {principal: [a]}}]}]":               `unknown field "principal"`,
		"rules: [{when: [{key: 'request.headers[x]', values: [y]}]}]": "rules[0].when is not supported",
		"rules: [{from: [{}]}]":                                       "rules[0].from[0].source is empty",
		"rules: [{to: [{operation: {}}]}]":                            "operation is empty",
		"rules: [{to: [{operation: {ports: ['0']}}]}]":                "is not a port",
		"rules: [{to: [{operation: {ports: ['http']}}]}]":             "is not a port",
		"rules: [{to: [{operation: {ports: [70000]}}]}]":              "is not a port",
		"rules: [{to: [{operation: {notPorts: ['1-2']}}]}]":           "is not a port",
		"rules: [{from: [{source: {principals: a}}]}]":                "is not a list",
		"rules: [{from: [{source: {principals: [1]}}]}]":              "is not a string",
		"rules: {}":                              "is not a list",
		"rules: [{}, 3]":                         "rules[1]",
		"targetRefs: [{kind: Service, name: x}]": "targetRefs is not supported",
		"selector: {matchExpressions: []}":       "matchExpressions",
		"selector: {matchLabels: {app: 1}}":      "is not a string",
		"spiffe: true":                           `unknown field "spiffe"`,
		"rules: [{from: [{source: {namespaces: [a]}, extra: 1}]}]":            `unknown field "extra"`,
		"rules: [{from: [{source: {namespaces: [a]}}], to: [], extra: true}]": `unknown field "extra"`,
	} {
		p := istio(t, doc)
		if !strings.Contains(p.Invalid, want) {
			t.Errorf("%q: Invalid = %q, want it to say %q", doc, p.Invalid, want)
			continue
		}
		// Deny-all for what it selects, never ignored.
		s := NewSet([]Policy{p, allow("prod", "all", Rule{})}, DefaultRootNamespace)
		if v := s.Decide(sleep, Workload{Namespace: "prod", Labels: map[string]string{"app": "web"}}, 80); v != invalid("prod/p") {
			t.Errorf("%q: Decide = %+v, want denied as invalid", doc, v)
		}
	}
	// A spec that is not an object.
	if p := FromIstio("prod", "p", []any{}); p.Invalid == "" {
		t.Error("a list as spec is valid")
	}
	// An invalid selector is not dropped: the policy then denies to its
	// whole namespace; a valid one keeps its reach.
	s := NewSet([]Policy{istio(t, "selector: {matchLabels: {app: db}}\nrules: [{when: []}]")}, DefaultRootNamespace)
	if s.Decide(sleep, web, 80).Reason != "" || s.Decide(sleep, db, 80).Reason != ReasonInvalid {
		t.Error("an invalid policy with a valid selector does not keep to it")
	}
}

// FuzzFromIstio checks that no AuthorizationPolicy spec makes the converter
// or the compiler panic, that every problem is reported, and that an
// invalid policy denies to what it selects.
func FuzzFromIstio(f *testing.F) {
	for _, s := range []string{
		`{}`, `null`, `[]`,
		`{"action":"DENY","selector":{"matchLabels":{"app":"web"}},"rules":[{"from":[{"source":{"principals":["cluster.local/ns/a/sa/b","*"],"ipBlocks":["10.0.0.0/8","::1"]}}],"to":[{"operation":{"ports":["80"],"notPorts":["81"]}}]}]}`,
		`{"rules":[{}]}`,
		`{"rules":[{"to":[{"operation":{"methods":["GET"]}}]}]}`,
		`{"rules":[{"from":[{"source":{"notNamespaces":["x*"],"notIpBlocks":["1.2.3.4"]}}],"when":[]}]}`,
		`{"action":"CUSTOM","provider":{"name":"x"}}`,
		`{"rules":[{"to":[{"operation":{"ports":[80, 1.5, "0", -1]}}]}]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var spec any
		if json.Unmarshal(data, &spec) != nil {
			return
		}
		p := FromIstio("prod", "p", spec)
		s := NewSet([]Policy{p}, DefaultRootNamespace)
		probs := s.Problems()
		if p.Invalid != "" && (len(probs) != 1 || !strings.Contains(probs[0].Reason, p.Invalid)) {
			t.Fatalf("invalid policy %q reported as %+v", p.Invalid, probs)
		}
		dst := Workload{Namespace: "prod", Labels: p.Selector}
		if len(probs) > 0 {
			if v := s.Decide(sleep, dst, 80); v != invalid("prod/p") {
				t.Fatalf("invalid policy (%+v): Decide = %+v", probs, v)
			}
			return
		}
		// Valid: the Set decides every port as its named ones or port 0.
		zero := s.Decide(anon, dst, 0)
		for _, port := range []uint16{1, 80, 65535} {
			if !slices.Contains(s.Ports(dst), port) && s.Decide(anon, dst, port) != zero {
				t.Fatalf("port %d decides unlike port 0", port)
			}
		}
	})
}
