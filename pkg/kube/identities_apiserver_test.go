package kube

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/smesh-dev/smesh/pkg/identity"
	"github.com/smesh-dev/smesh/pkg/testenv/kubecp"
)

// TestPodIdentitiesAPIServer runs PodIdentities with smeshd's own token
// against a real API server: pods of service accounts on nodes a and b; a
// node asserting a pod of the other node is refused, its own accepted,
// and the answers follow pods starting, moving and going.
func TestPodIdentitiesAPIServer(t *testing.T) {
	cp := kubecp.Start(t)
	admin, err := kubernetes.NewForConfig(cp.Admin)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), settle)
	defer cancel()
	if _, err := admin.CoreV1().Namespaces().Create(ctx, namespace("prod", nil), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, sa := range []string{"default", "payments", "ledger"} {
		if _, err := admin.CoreV1().ServiceAccounts("prod").Create(ctx,
			&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// pod creates a pod of sa on node; running with ip, as a kubelet
	// would report it, unless ip is "".
	pod := func(name, sa, node, ip string) *corev1.Pod {
		t.Helper()
		p, err := admin.CoreV1().Pods("prod").Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: sa,
				Containers: []corev1.Container{{Name: "c", Image: "pause"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if ip == "" {
			return p
		}
		p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}}
		if p, err = admin.CoreV1().Pods("prod").UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		return p
	}
	pod("pay-a", "payments", realNode, "198.18.10.1")
	pod("ledger-b", "ledger", otherNode, "198.18.10.2")
	pod("pending-b", "payments", otherNode, "")
	pod("plain-a", "", realNode, "198.18.10.3")

	sa := cp.Smeshd(t)
	sa.UserAgent = "smeshd"
	api, err := NewAPI(sa)
	if err != nil {
		t.Fatal(err)
	}
	td := spiffeid.RequireTrustDomainFromString("smesh.local")
	// Not yet running: it refuses.
	early := NewPodIdentities(PodIdentityOptions{API: api, TrustDomain: td, Logger: zerolog.Nop()})
	if err := early.Verify(spiffeid.RequireFromString("spiffe://smesh.local/node/node-a"), spiffeid.ID{}, netip.Addr{}); err == nil {
		t.Error("Verify accepted before the first list")
	}
	rctx, stop := context.WithCancel(context.Background())
	p, err := StartPodIdentities(rctx, api, td, zerolog.New(zerolog.NewTestWriter(t)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stop(); <-p.done })
	if err := p.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}

	id := spiffeid.RequireFromString
	nodeA, nodeB := id("spiffe://smesh.local/node/"+realNode), id("spiffe://smesh.local/node/"+otherNode)
	payments, ledger := id("spiffe://smesh.local/ns/prod/sa/payments"), id("spiffe://smesh.local/ns/prod/sa/ledger")
	addr := netip.MustParseAddr
	type check struct {
		node, workload spiffeid.ID
		addr           netip.Addr
		ok             bool
	}
	verify := func(when string, checks []check) {
		t.Helper()
		for _, c := range checks {
			err := p.Verify(c.node, c.workload, c.addr)
			if errors.Is(err, identity.ErrUnverifiable) != (!c.ok && c.workload.IsZero()) {
				t.Errorf("%s: %s asserting %s at %s: %v: ErrUnverifiable is for addresses alone", when, c.node, c.workload, c.addr, err)
			}
			if (err == nil) != c.ok {
				t.Errorf("%s: %s asserting %s at %s: %v, want ok %v", when, c.node, c.workload, c.addr, err, c.ok)
			}
		}
	}
	verify("synced", []check{
		{nodeA, payments, netip.Addr{}, true},
		{nodeA, payments, addr("198.18.10.1"), true},
		{nodeA, payments, addr("198.18.10.2"), false}, // ledger-b's address
		{nodeA, ledger, netip.Addr{}, false},          // a pod of node b
		{nodeB, ledger, addr("198.18.10.2"), true},
		{nodeB, payments, netip.Addr{}, false}, // pending-b is not running
		{nodeA, id("spiffe://smesh.local/ns/prod/sa/default"), addr("198.18.10.3"), true},
		{nodeA, spiffeid.ID{}, addr("198.18.10.1"), true},
		{nodeB, spiffeid.ID{}, addr("198.18.10.1"), false}, // ErrUnverifiable: dropped, not refused
		{id("spiffe://smesh.local/node/node-c"), payments, netip.Addr{}, false},
		{id("spiffe://other.local/node/node-a"), payments, netip.Addr{}, false},
		{nodeA, id("spiffe://smesh.local/node/node-a/unit/x.service"), netip.Addr{}, false},
		{nodeA, id("spiffe://other.local/ns/prod/sa/payments"), netip.Addr{}, false},
	})

	// payments starts on node b too, and its pod on node a goes: the
	// answers follow the watch.
	pod("pay-b", "payments", otherNode, "198.18.10.4")
	zero := int64(0)
	if err := admin.CoreV1().Pods("prod").Delete(ctx, "pay-a", metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(settle)
	for p.Verify(nodeB, payments, addr("198.18.10.4")) != nil || p.Verify(nodeA, payments, netip.Addr{}) == nil {
		if time.Now().After(deadline) {
			t.Fatal("the pods' changes did not reach the verifier")
		}
		time.Sleep(10 * time.Millisecond)
	}
	verify("after the move", []check{
		{nodeA, payments, netip.Addr{}, false},
		{nodeB, payments, addr("198.18.10.4"), true},
		{nodeB, payments, addr("198.18.10.1"), false},
	})
}
