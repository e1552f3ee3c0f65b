package kube

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
)

// TestRESTAPI drives the API smeshd uses in a cluster against a server that
// answers as the API server does: the requests carry the node's field
// selector, and lists and watch events decode into core types.
func TestRESTAPI(t *testing.T) {
	p := corev1.Pod{
		TypeMeta:   metav1.TypeMeta{Kind: "Pod", APIVersion: "v1"},
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "p", UID: "uid-p", Labels: meshLabel("enabled"), ResourceVersion: "7"},
		Spec:       corev1.PodSpec{NodeName: node},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, QOSClass: corev1.PodQOSBestEffort},
	}
	var mu sync.Mutex
	var seen []*http.Request
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r)
		mu.Unlock()
		if r.URL.Path != "/api/v1/pods" {
			http.Error(w, "unexpected path "+r.URL.Path, http.StatusNotFound)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		if r.URL.Query().Get("watch") != "true" {
			enc.Encode(corev1.PodList{TypeMeta: metav1.TypeMeta{Kind: "PodList", APIVersion: "v1"},
				ListMeta: metav1.ListMeta{ResourceVersion: "7"}, Items: []corev1.Pod{p}})
			return
		}
		enc.Encode(map[string]any{"type": "MODIFIED", "object": p})
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	}))
	defer srv.Close()

	api, err := NewAPI(&rest.Config{Host: srv.URL, UserAgent: "smeshd"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	opts := metav1.ListOptions{FieldSelector: "spec.nodeName=" + node}
	obj, err := api.List(ctx, "pods", opts)
	if err != nil {
		t.Fatal(err)
	}
	list, ok := obj.(*corev1.PodList)
	if !ok || len(list.Items) != 1 || list.Items[0].UID != "uid-p" || list.Items[0].Status.QOSClass != corev1.PodQOSBestEffort {
		t.Fatalf("List = %#v", obj)
	}
	wi, err := api.Watch(ctx, "pods", opts)
	if err != nil {
		t.Fatal(err)
	}
	defer wi.Stop()
	select {
	case ev := <-wi.ResultChan():
		got, ok := ev.Object.(*corev1.Pod)
		if ev.Type != watch.Modified || !ok || got.Name != "p" || got.Labels[labelKey] != "enabled" {
			t.Fatalf("watch event %s %#v", ev.Type, ev.Object)
		}
	case <-ctx.Done():
		t.Fatal("no watch event")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 2 {
		t.Fatalf("%d requests, want 2", len(seen))
	}
	for _, r := range seen {
		if got := r.URL.Query().Get("fieldSelector"); got != "spec.nodeName="+node {
			t.Errorf("%s: fieldSelector %q", r.URL, got)
		}
		if ua := r.Header.Get("User-Agent"); ua != "smeshd" {
			t.Errorf("%s: User-Agent %q", r.URL, ua)
		}
	}
	// Outside Requests, which deploy's RBAC test checks against
	// rbac.yaml: refused before a request is made.
	if _, err := api.List(ctx, "secrets", metav1.ListOptions{}); err == nil {
		t.Error("List(secrets) worked: smeshd reads pods and namespaces only")
	}
	if _, err := api.Watch(ctx, "secrets", metav1.ListOptions{}); err == nil {
		t.Error("Watch(secrets) worked: smeshd reads pods and namespaces only")
	}
	if len(seen) != 2 {
		t.Errorf("%d requests after the refused ones, want still 2", len(seen))
	}
}
