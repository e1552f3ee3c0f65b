package deploy

import (
	"context"
	"io"
	"net/http"
	"net/url"
	"testing"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/smesh-dev/smesh/pkg/kube"
	"github.com/smesh-dev/smesh/pkg/testenv/kubecp"
)

// mustNot are requests smeshd's ServiceAccount must be refused: what a
// node agent compromised through smeshd could use to read credentials, run
// code in pods, reach kubelets, change workloads, or grant itself more.
var mustNot = []authorizationv1.ResourceAttributes{
	// Least privilege: smeshd lists and watches, it never gets one object.
	{Verb: "get", Resource: "pods", Namespace: "default"},
	{Verb: "get", Resource: "namespaces"},
	{Verb: "get", Resource: "secrets", Namespace: "kube-system"},
	{Verb: "list", Resource: "secrets"},
	{Verb: "watch", Resource: "secrets", Namespace: "smesh-system"},
	{Verb: "create", Resource: "pods", Subresource: "exec", Namespace: "default"},
	{Verb: "get", Resource: "nodes", Subresource: "proxy"},
	{Verb: "list", Resource: "nodes"},
	{Verb: "delete", Resource: "pods", Namespace: "default"},
	{Verb: "patch", Resource: "pods", Namespace: "default"},
	{Verb: "update", Resource: "pods", Subresource: "status", Namespace: "default"},
	{Verb: "update", Resource: "namespaces"},
	{Verb: "get", Resource: "configmaps", Namespace: "kube-system"},
	{Verb: "list", Resource: "configmaps", Namespace: "default"},
	{Verb: "create", Resource: "serviceaccounts", Subresource: "token", Namespace: "smesh-system"},
	{Verb: "bind", Group: "rbac.authorization.k8s.io", Resource: "clusterroles"},
	{Verb: "escalate", Group: "rbac.authorization.k8s.io", Resource: "clusterroles"},
	{Verb: "impersonate", Resource: "serviceaccounts"},
	// Services and EndpointSlices are read, never written: a node agent
	// that could rewrite them could send any Service's traffic anywhere.
	{Verb: "get", Resource: "services", Namespace: "default"},
	{Verb: "create", Resource: "services", Namespace: "default"},
	{Verb: "update", Resource: "services", Namespace: "default"},
	{Verb: "patch", Resource: "services", Namespace: "default"},
	{Verb: "delete", Resource: "services", Namespace: "default"},
	{Verb: "update", Resource: "services", Subresource: "status", Namespace: "default"},
	{Verb: "get", Group: "discovery.k8s.io", Resource: "endpointslices", Namespace: "default"},
	{Verb: "create", Group: "discovery.k8s.io", Resource: "endpointslices", Namespace: "default"},
	{Verb: "update", Group: "discovery.k8s.io", Resource: "endpointslices", Namespace: "default"},
	{Verb: "patch", Group: "discovery.k8s.io", Resource: "endpointslices", Namespace: "default"},
	{Verb: "delete", Group: "discovery.k8s.io", Resource: "endpointslices", Namespace: "default"},
	{Verb: "deletecollection", Group: "discovery.k8s.io", Resource: "endpointslices", Namespace: "default"},
	// Authorization policies are read, never written: a node agent that
	// could change them could open any workload to any source.
	{Verb: "get", Group: "security.istio.io", Resource: "authorizationpolicies", Namespace: "default"},
	{Verb: "create", Group: "security.istio.io", Resource: "authorizationpolicies", Namespace: "default"},
	{Verb: "update", Group: "security.istio.io", Resource: "authorizationpolicies", Namespace: "istio-system"},
	{Verb: "delete", Group: "security.istio.io", Resource: "authorizationpolicies", Namespace: "default"},
	// The older Endpoints API is not what smeshd reads.
	{Verb: "list", Resource: "endpoints"},
}

// TestRBACOnAPIServer applies namespace.yaml and rbac.yaml as shipped to a
// real kube-apiserver (RBAC on) and asks it, with smeshd's own
// ServiceAccount token, about every request smeshd's code makes
// (kube.Requests, which pkg/kube's client refuses to step outside of) and
// about requests it must not be allowed; then makes smeshd's pod list and a
// forbidden request for real.
func TestRBACOnAPIServer(t *testing.T) {
	cp := kubecp.Start(t)
	admin, err := kubernetes.NewForConfig(cp.Admin)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// namespace.yaml and rbac.yaml as shipped, and smeshd's token.
	sa := cp.Smeshd(t)
	smeshd, err := kubernetes.NewForConfig(sa)
	if err != nil {
		t.Fatal(err)
	}

	ask := func(ra authorizationv1.ResourceAttributes) (bool, string) {
		t.Helper()
		r, err := smeshd.AuthorizationV1().SelfSubjectAccessReviews().Create(ctx,
			&authorizationv1.SelfSubjectAccessReview{Spec: authorizationv1.SelfSubjectAccessReviewSpec{ResourceAttributes: &ra}},
			metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("SelfSubjectAccessReview %+v: %v", ra, err)
		}
		// RBAC gives a reason for what it allows (the binding), none for a
		// denial.
		reason := r.Status.Reason
		if reason == "" {
			reason = "no reason given"
		}
		return r.Status.Allowed, reason
	}
	reqs := kube.Requests()
	if len(reqs) == 0 {
		t.Fatal("kube.Requests is empty")
	}
	for _, r := range reqs {
		if ok, reason := ask(attributes(r)); !ok {
			t.Errorf("smeshd's code makes %s, but rbac.yaml does not allow it (%s)", describe(attributes(r)), reason)
		}
	}
	for _, ra := range mustNot {
		if ok, reason := ask(ra); ok {
			t.Errorf("smeshd's ServiceAccount may %s: it must not (%s)", describe(ra), reason)
		}
	}

	// The pod list smeshd makes, through its own client: the server
	// answers it, with this node's pods only.
	pods := []struct{ name, node string }{{"on-this-node", "node-a"}, {"elsewhere", "node-b"}}
	// No controller-manager makes the default ServiceAccount a pod needs.
	if _, err := admin.CoreV1().ServiceAccounts("default").Create(ctx,
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, p := range pods {
		if _, err := admin.CoreV1().Pods("default").Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: p.name},
			Spec:       corev1.PodSpec{NodeName: p.node, Containers: []corev1.Container{{Name: "c", Image: "pause"}}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	api, err := kube.NewAPI(sa)
	if err != nil {
		t.Fatal(err)
	}
	obj, err := api.List(ctx, "pods", metav1.ListOptions{FieldSelector: kube.NodeSelector("node-a")})
	if err != nil {
		t.Fatalf("smeshd's pod list with its token: %v", err)
	}
	if l := obj.(*corev1.PodList); len(l.Items) != 1 || l.Items[0].Name != "on-this-node" {
		t.Errorf("smeshd's pod list for node-a: %d pods %v, want on-this-node alone", len(l.Items), names(l))
	}

	// The Service and EndpointSlice lists its service watcher makes,
	// through its own client (discovery.k8s.io's too).
	for _, res := range []string{"services", "endpointslices"} {
		if _, err := api.List(ctx, res, metav1.ListOptions{}); err != nil {
			t.Errorf("smeshd's %s list with its token: %v", res, err)
		}
	}

	// The status codes themselves, on the wire.
	hc, err := rest.HTTPClientFor(sa)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		path string
		want int
	}{
		{"/api/v1/pods?fieldSelector=" + url.QueryEscape(kube.NodeSelector("node-a")), http.StatusOK},
		{"/api/v1/namespaces", http.StatusOK},
		{"/api/v1/namespaces/kube-system/secrets", http.StatusForbidden},
		{"/api/v1/nodes/node-a/proxy/pods", http.StatusForbidden},
		{"/api/v1/namespaces/kube-system/configmaps", http.StatusForbidden},
		{"/api/v1/services", http.StatusOK},
		{"/apis/discovery.k8s.io/v1/endpointslices", http.StatusOK},
		{"/api/v1/namespaces/default/services/kubernetes", http.StatusForbidden},
		{"/api/v1/endpoints", http.StatusForbidden},
	} {
		if got, body := status(ctx, t, hc, sa.Host+tc.path); got != tc.want {
			t.Errorf("GET %s with smeshd's token: %d, want %d: %s", tc.path, got, tc.want, body)
		}
	}
}

// attributes is r as an access review asks it.
func attributes(r kube.Request) authorizationv1.ResourceAttributes {
	return authorizationv1.ResourceAttributes{Verb: r.Verb, Group: r.Group, Resource: r.Resource, Namespace: r.Namespace}
}

func describe(ra authorizationv1.ResourceAttributes) string {
	s := ra.Verb + " " + ra.Resource
	if ra.Group != "" {
		s += "." + ra.Group
	}
	if ra.Subresource != "" {
		s += "/" + ra.Subresource
	}
	if ra.Namespace != "" {
		return s + " in namespace " + ra.Namespace
	}
	return s + " (all namespaces)"
}

func status(ctx context.Context, t *testing.T, hc *http.Client, u string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	return resp.StatusCode, string(body)
}

func names(l *corev1.PodList) []string {
	var n []string
	for _, p := range l.Items {
		n = append(n, p.Name)
	}
	return n
}
