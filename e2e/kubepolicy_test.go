package e2e

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/smesh-dev/smesh/pkg/kube"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// authorizationPolicyCRD is a minimal structural schema of Istio's
// AuthorizationPolicy CRD, the spec kept as written (L7 fields included).
func authorizationPolicyCRD() *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "apiextensions.k8s.io/v1",
		"kind":       "CustomResourceDefinition",
		"metadata":   map[string]any{"name": "authorizationpolicies.security.istio.io"},
		"spec": map[string]any{
			"group": "security.istio.io",
			"scope": "Namespaced",
			"names": map[string]any{
				"plural": "authorizationpolicies", "singular": "authorizationpolicy",
				"kind": "AuthorizationPolicy", "listKind": "AuthorizationPolicyList",
			},
			"versions": []any{map[string]any{
				"name": "v1", "served": true, "storage": true,
				"schema": map[string]any{"openAPIV3Schema": map[string]any{
					"type": "object",
					"properties": map[string]any{
						"spec": map[string]any{"type": "object", "x-kubernetes-preserve-unknown-fields": true},
					},
				}},
			}},
		},
	}}
}

// TestPolicyKubernetes: AuthorizationPolicy objects of a real API server
// enforced by smeshd in Kubernetes mode: a policy selecting pods by label
// allows one namespace on one port, across nodes (the receiving smeshd
// verifies the sending node runs the asserted pod) and on the same node
// (connect4: ECONNREFUSED); a policy with L7 fields denies everything to
// what it selects and is reported (/debug/policy, smesh_policy_invalid).
func TestPolicyKubernetes(t *testing.T) {
	testenv.RequirePrivileged(t)
	kc := startKubeCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dyn, err := dynamic.NewForConfig(kc.cp.Admin)
	if err != nil {
		t.Fatal(err)
	}
	crds := dyn.Resource(schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"})
	if _, err := crds.Create(ctx, authorizationPolicyCRD(), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	mesh := map[string]string{"smesh.dev/mesh": "enabled"}
	for _, ns := range []string{"front", "batch", "pay", "l7"} {
		kc.namespace(t, ns, mesh)
	}
	apply := func(ns, name string, spec map[string]any) {
		t.Helper()
		obj := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
			"metadata": map[string]any{"name": name, "namespace": ns},
			"spec":     spec,
		}}
		// The API server serves a new CRD's resource a moment after it
		// accepted the CRD.
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			_, err := dyn.Resource(kube.AuthorizationPolicies).Namespace(ns).Create(ctx, obj, metav1.CreateOptions{})
			if err == nil {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("creating AuthorizationPolicy %s/%s: %v", ns, name, err)
			}
		}
	}
	apply("pay", "pay-from-front", map[string]any{
		"selector": map[string]any{"matchLabels": map[string]any{"app": "pay"}},
		"action":   "ALLOW",
		"rules": []any{map[string]any{
			"from": []any{map[string]any{"source": map[string]any{"namespaces": []any{"front"}}}},
			"to":   []any{map[string]any{"operation": map[string]any{"ports": []any{"9000"}}}},
		}},
	})
	apply("l7", "l7-only", map[string]any{
		"action": "ALLOW",
		"rules": []any{map[string]any{
			"to": []any{map[string]any{"operation": map[string]any{"methods": []any{"GET"}}}},
		}},
	})

	c := testenv.NewCluster()
	cnA, cnB := c.AddNode(t), c.AddNode(t)
	testenv.JoinNodes(t, cnA, cnB)
	a, b := nodeOn(t, cnA.Node), nodeOn(t, cnB.Node)
	k := &kubelet{t: t, api: kc.admin, nodes: map[string]*kubeNode{}}
	ka, kb := k.addNode("node-a", cnA), k.addNode("node-b", cnB)
	web := k.create(podSpec("front", "web", "node-a", nil, corev1.PodQOSBestEffort))
	other := k.create(podSpec("batch", "other", "node-a", nil, corev1.PodQOSBestEffort))
	srv := k.create(podSpec("pay", "srv", "node-b", map[string]string{"app": "pay"}, corev1.PodQOSBestEffort))
	api := k.create(podSpec("l7", "api", "node-b", nil, corev1.PodQOSBestEffort))
	near := k.create(podSpec("front", "near", "node-b", nil, corev1.PodQOSBestEffort))
	far := k.create(podSpec("batch", "far", "node-b", nil, corev1.PodQOSBestEffort))
	p9000, p9001, apiAddr := srv.addr(t, 9000), srv.addr(t, 9001), api.addr(t, 9000)
	podServerAt(t, srv.container(), p9000)
	podServerAt(t, srv.container(), p9001)
	podServerAt(t, api.container(), apiAddr)

	kc.startSmeshd(b, "node-b", kb)
	kc.startSmeshd(a, "node-a", ka)
	b.waitServed(srv.Name, api.Name, near.Name, far.Name)
	a.waitServed(web.Name, other.Name)

	eventually(t, 5*time.Second, "same-node policy in force", far.container(), "refused", p9000)
	(&podNode{node: a}).podClient(web.container(), "oneway", p9000, "4000000") // namespace front, port 9000
	(&podNode{node: a}).podClient(other.container(), "reset", p9000)           // namespace batch: not allowed
	(&podNode{node: a}).podClient(web.container(), "reset", p9001)             // port
	(&podNode{node: b}).podClient(near.container(), "oneway", p9000, "4000000")
	(&podNode{node: b}).podClient(near.container(), "refused", p9001)
	(&podNode{node: a}).podClient(web.container(), "reset", apiAddr) // L7 policy: deny-all
	(&podNode{node: b}).podClient(near.container(), "refused", apiAddr)

	_, m := b.admin("/metrics")
	if v := testenv.Metric(t, m, "smesh_policy_invalid", map[string]string{"policy": "l7/l7-only"}); v != 1 {
		t.Errorf("smesh_policy_invalid{policy=l7/l7-only} = %v, want 1", v)
	}
	for _, l := range []map[string]string{
		{"path": "tunnel", "policy": "", "reason": "not_allowed"},
		{"path": "tunnel", "policy": "l7/l7-only", "reason": "invalid_policy"},
		{"path": "same_node", "policy": "l7/l7-only", "reason": "invalid_policy"},
	} {
		if v := testenv.Metric(t, m, "smesh_policy_denied_total", l); v < 1 {
			t.Errorf("smesh_policy_denied_total%v = %v, want at least 1\n%s", l, v, grepLines(m, "smesh_policy"))
		}
	}
	_, body := b.admin("/debug/policy")
	var dbg struct {
		Problems  []struct{ Policy, Reason string }
		Workloads []struct {
			Cgroup   string
			Policies []struct{ Policy string }
		}
	}
	if err := json.Unmarshal([]byte(body), &dbg); err != nil {
		t.Fatalf("/debug/policy: %v: %s", err, body)
	}
	selected := false
	for _, w := range dbg.Workloads {
		if w.Cgroup == srv.Cgroup {
			selected = len(w.Policies) == 1 && w.Policies[0].Policy == "pay/pay-from-front"
		}
	}
	if !selected {
		t.Errorf("/debug/policy does not show pay/pay-from-front selecting srv by its labels: %s", body)
	}
	if len(dbg.Problems) != 1 || dbg.Problems[0].Policy != "l7/l7-only" || !strings.Contains(dbg.Problems[0].Reason, "methods") {
		t.Errorf("/debug/policy problems %+v, want l7/l7-only for its methods", dbg.Problems)
	}
}
