package kube

import (
	"bytes"
	"context"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/smesh-dev/smesh/pkg/policy"
	"github.com/smesh-dev/smesh/pkg/testenv/kubecp"
)

// policyCRD is a minimal structural schema of Istio's AuthorizationPolicy
// CRD: the spec is kept as written, so that the watcher sees L7 and unknown
// fields as a real cluster would send them.
func policyCRD() *unstructured.Unstructured {
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

// syncBuffer is a log the watcher writes while the test reads it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestPoliciesOnAPIServer runs a PolicyWatcher with smeshd's own
// ServiceAccount (the shipped rbac.yaml) against a real kube-apiserver that
// first has no AuthorizationPolicy CRD, then gets one, and checks that the
// Set's decisions follow the objects created, updated and deleted.
func TestPoliciesOnAPIServer(t *testing.T) {
	cp := kubecp.Start(t)
	sa := cp.Smeshd(t)
	sa.UserAgent = "smeshd"
	admin, err := kubernetes.NewForConfig(cp.Admin)
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(cp.Admin)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, ns := range []string{"prod", "dev", "istio-system"} {
		if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	// The watcher starts in a cluster without the CRD.
	var logs syncBuffer
	client, err := dynamic.NewForConfig(sa)
	if err != nil {
		t.Fatal(err)
	}
	w := NewPolicyWatcher(PolicyOptions{Client: client, Retry: 100 * time.Millisecond,
		Logger: zerolog.New(zerolog.MultiLevelWriter(&logs, zerolog.NewTestWriter(t)))})
	wctx, wcancel := context.WithCancel(ctx)
	go w.Run(wctx)
	t.Cleanup(func() {
		wcancel()
		<-w.done
	})
	if err := w.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "AuthorizationPolicy CRD not installed: no policies") {
		t.Fatalf("no clear word about the missing CRD; log:\n%s", logs.String())
	}

	web := policy.Workload{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/prod/sa/web"), Namespace: "prod", Labels: map[string]string{"app": "web"}}
	db := policy.Workload{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/prod/sa/db"), Namespace: "prod", Labels: map[string]string{"app": "db"}}
	devWeb := policy.Workload{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/dev/sa/web"), Namespace: "dev", Labels: map[string]string{"app": "web"}}
	sleep := policy.Source{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/prod/sa/sleep"), IP: netip.MustParseAddr("10.1.0.5")}
	devSleep := policy.Source{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/dev/sa/sleep"), IP: netip.MustParseAddr("10.2.0.5")}
	if v := w.Set().Decide(devSleep, web, 80); !v.Allow {
		t.Fatalf("without policies: %+v", v)
	}

	// expect waits for a decision; a change must show within a second.
	expect := func(why string, within time.Duration, src policy.Source, dst policy.Workload, port uint16, want policy.Verdict) {
		t.Helper()
		start := time.Now()
		for {
			got := w.Set().Decide(src, dst, port)
			if got == want {
				t.Logf("%s: %v", why, time.Since(start).Round(time.Millisecond))
				return
			}
			if time.Since(start) > within {
				t.Fatalf("%s: after %v Decide(%v, %v, %d) = %+v, want %+v", why, within, src.ID, dst.ID, port, got, want)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}

	crds := dyn.Resource(schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"})
	if _, err := crds.Create(ctx, policyCRD(), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	aps := dyn.Resource(AuthorizationPolicies)
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
			old, err := aps.Namespace(ns).Get(ctx, name, metav1.GetOptions{})
			if err == nil {
				obj.SetResourceVersion(old.GetResourceVersion())
				_, err = aps.Namespace(ns).Update(ctx, obj, metav1.UpdateOptions{})
			} else {
				_, err = aps.Namespace(ns).Create(ctx, obj, metav1.CreateOptions{})
			}
			if err == nil {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("applying %s/%s: %v", ns, name, err)
			}
		}
	}
	remove := func(ns, name string) {
		t.Helper()
		if err := aps.Namespace(ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	drain := func() {
		select {
		case <-w.Changed():
		default:
		}
	}

	apply("prod", "no-dev", map[string]any{
		"action": "DENY",
		"rules":  []any{map[string]any{"from": []any{map[string]any{"source": map[string]any{"namespaces": []any{"dev"}}}}}},
	})
	// The first one waits for the watcher's next look for the CRD too.
	expect("DENY created with the CRD", 30*time.Second, devSleep, web, 80, policy.Verdict{Policy: "prod/no-dev", Reason: policy.ReasonDenied})
	if !strings.Contains(logs.String(), "AuthorizationPolicy CRD found") {
		t.Errorf("the CRD's arrival is not logged")
	}
	expect("same namespace still allowed", 0, sleep, web, 80, policy.Verdict{Allow: true})

	drain()
	apply("prod", "no-dev", map[string]any{
		"action": "DENY",
		"rules": []any{map[string]any{
			"from": []any{map[string]any{"source": map[string]any{"namespaces": []any{"dev"}}}},
			"to":   []any{map[string]any{"operation": map[string]any{"ports": []any{"22"}}}},
		}},
	})
	expect("DENY narrowed to port 22", time.Second, devSleep, web, 80, policy.Verdict{Allow: true})
	expect("port 22 still denied", 0, devSleep, web, 22, policy.Verdict{Policy: "prod/no-dev", Reason: policy.ReasonDenied})
	select {
	case <-w.Changed():
	case <-time.After(time.Second):
		t.Error("no signal on Changed after an update")
	}

	apply("prod", "db-from-prod", map[string]any{
		"selector": map[string]any{"matchLabels": map[string]any{"app": "db"}},
		"rules": []any{map[string]any{
			"from": []any{map[string]any{"source": map[string]any{"principals": []any{"cluster.local/ns/prod/*"}}}},
			"to":   []any{map[string]any{"operation": map[string]any{"ports": []any{"5432"}, "methods": []any{"GET"}}}},
		}},
	})
	expect("L7 policy denies to what it selects", time.Second, sleep, db, 5432, policy.Verdict{Policy: "prod/db-from-prod", Reason: policy.ReasonInvalid})
	expect("and nothing else", 0, sleep, web, 5432, policy.Verdict{Allow: true})
	if p := w.Set().Problems(); len(p) != 1 || p[0].Policy != "prod/db-from-prod" || !strings.Contains(p[0].Reason, "methods is not supported") {
		t.Errorf("Problems = %+v", p)
	}
	if !strings.Contains(logs.String(), "cannot be enforced at L4") {
		t.Errorf("the invalid policy is not logged")
	}

	apply("prod", "db-from-prod", map[string]any{
		"selector": map[string]any{"matchLabels": map[string]any{"app": "db"}},
		"rules": []any{map[string]any{
			"from": []any{map[string]any{"source": map[string]any{"principals": []any{"cluster.local/ns/prod/*"}}}},
			"to":   []any{map[string]any{"operation": map[string]any{"ports": []any{"5432"}}}},
		}},
	})
	expect("fixed: ALLOW matches", time.Second, sleep, db, 5432, policy.Verdict{Allow: true, Policy: "prod/db-from-prod"})
	expect("fixed: other port not allowed", 0, sleep, db, 80, policy.Verdict{Reason: policy.ReasonNotAllowed})
	expect("fixed: other namespace not allowed", 0, devSleep, db, 5432, policy.Verdict{Reason: policy.ReasonNotAllowed})

	apply("istio-system", "allow-nothing", map[string]any{})
	expect("root namespace: allow-nothing mesh-wide", time.Second, sleep, devWeb, 80, policy.Verdict{Reason: policy.ReasonNotAllowed})
	expect("an ALLOW of the namespace still allows", 0, sleep, db, 5432, policy.Verdict{Allow: true, Policy: "prod/db-from-prod"})

	remove("istio-system", "allow-nothing")
	expect("root policy deleted", time.Second, sleep, devWeb, 80, policy.Verdict{Allow: true})
	remove("prod", "db-from-prod")
	remove("prod", "no-dev")
	expect("all deleted", time.Second, devSleep, web, 22, policy.Verdict{Allow: true})
	expect("all deleted", 0, devSleep, db, 5432, policy.Verdict{Allow: true})
	if w.Set().Len() != 0 {
		t.Errorf("%d policies left", w.Set().Len())
	}

	// The CRD removed while watching: its objects go with it, and the
	// watcher says the CRD is gone, as at the start.
	apply("prod", "no-dev", map[string]any{"action": "DENY", "rules": []any{map[string]any{}}})
	expect("DENY all", time.Second, sleep, web, 80, policy.Verdict{Policy: "prod/no-dev", Reason: policy.ReasonDenied})
	if err := crds.Delete(ctx, "authorizationpolicies.security.istio.io", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	expect("CRD deleted", 30*time.Second, sleep, web, 80, policy.Verdict{Allow: true})
	for deadline := time.Now().Add(30 * time.Second); strings.Count(logs.String(), "AuthorizationPolicy CRD not installed") < 2; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the CRD's removal is not logged:\n%s", logs.String())
		}
	}
}
