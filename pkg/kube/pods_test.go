package kube

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

const (
	node     = "node-1"
	labelKey = "smesh.dev/mesh"
)

// world is a fake API server and a fake cgroupfs tree (cgroupfs driver).
type world struct {
	t      *testing.T
	client *fake.Clientset
	mount  string
	w      *Watcher
}

func newWorld(t *testing.T, objs ...*corev1.Namespace) *world {
	t.Helper()
	wd := &world{t: t, client: fake.NewClientset(), mount: t.TempDir()}
	mkdirs(t, wd.mount, "kubepods/burstable", "kubepods/besteffort", "system.slice")
	for _, ns := range objs {
		wd.createNamespace(ns)
	}
	return wd
}

func (wd *world) start() {
	t := wd.t
	ctx, cancel := context.WithCancel(context.Background())
	wd.w = NewWatcher(Options{
		API:         fakeAPI{wd.client},
		NoWatchList: wd.client.IsWatchListSemanticsUnSupported(),
		NodeName:    node,
		TrustDomain: spiffeid.RequireTrustDomainFromString("smesh.local"),
		LabelKey:    labelKey,
		LabelValue:  "enabled",
		StrictKey:   "smesh.dev/inbound",
		StrictValue: "strict",
		Resolver:    NewResolver(wd.mount, ""),
		Retry:       20 * time.Millisecond,
		Recheck:     50 * time.Millisecond,
		Logger:      zerolog.New(zerolog.NewTestWriter(t)),
	})
	go wd.w.Run(ctx)
	t.Cleanup(func() {
		cancel()
		<-wd.w.done
	})
	sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
	defer scancel()
	if err := wd.w.WaitSynced(sctx); err != nil {
		t.Fatal(err)
	}
	// The fake clientset's watches see only what happens after they
	// start: wait for both before changing anything.
	deadline := time.Now().Add(10 * time.Second)
	for !wd.watching("pods") || !wd.watching("namespaces") {
		if time.Now().After(deadline) {
			t.Fatal("the informers never started watching")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (wd *world) watching(resource string) bool {
	for _, a := range wd.client.Actions() {
		if a.GetVerb() == "watch" && a.GetResource().Resource == resource {
			return true
		}
	}
	return false
}

// fakeAPI is API over client-go's fake clientset.
type fakeAPI struct{ c *fake.Clientset }

func (f fakeAPI) List(ctx context.Context, resource string, opts metav1.ListOptions) (runtime.Object, error) {
	if resource == "pods" {
		return f.c.CoreV1().Pods(metav1.NamespaceAll).List(ctx, opts)
	}
	return f.c.CoreV1().Namespaces().List(ctx, opts)
}

func (f fakeAPI) Watch(ctx context.Context, resource string, opts metav1.ListOptions) (watch.Interface, error) {
	if resource == "pods" {
		return f.c.CoreV1().Pods(metav1.NamespaceAll).Watch(ctx, opts)
	}
	return f.c.CoreV1().Namespaces().Watch(ctx, opts)
}

func namespace(name string, labels map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
}

func pod(ns, name, uid, nodeName string, labels map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID(uid), Labels: labels},
		Spec:       corev1.PodSpec{NodeName: nodeName},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, QOSClass: corev1.PodQOSBurstable},
	}
}

func meshLabel(v string) map[string]string { return map[string]string{labelKey: v} }

func (wd *world) createNamespace(ns *corev1.Namespace) {
	wd.t.Helper()
	if _, err := wd.client.CoreV1().Namespaces().Create(context.Background(), ns, metav1.CreateOptions{}); err != nil {
		wd.t.Fatal(err)
	}
}

func (wd *world) updateNamespace(ns *corev1.Namespace) {
	wd.t.Helper()
	if _, err := wd.client.CoreV1().Namespaces().Update(context.Background(), ns, metav1.UpdateOptions{}); err != nil {
		wd.t.Fatal(err)
	}
}

// createPod creates the pod and, when withCgroup, its cgroup (as the
// kubelet would on its node).
func (wd *world) createPod(p *corev1.Pod, withCgroup bool) string {
	wd.t.Helper()
	cg := filepath.Join(wd.mount, "kubepods/burstable/pod"+string(p.UID))
	if withCgroup {
		mkdirs(wd.t, cg, ".")
	}
	if _, err := wd.client.CoreV1().Pods(p.Namespace).Create(context.Background(), p, metav1.CreateOptions{}); err != nil {
		wd.t.Fatal(err)
	}
	return cg
}

func (wd *world) updatePod(p *corev1.Pod) {
	wd.t.Helper()
	if _, err := wd.client.CoreV1().Pods(p.Namespace).Update(context.Background(), p, metav1.UpdateOptions{}); err != nil {
		wd.t.Fatal(err)
	}
}

func (wd *world) deletePod(p *corev1.Pod) {
	wd.t.Helper()
	if err := wd.client.CoreV1().Pods(p.Namespace).Delete(context.Background(), p.Name, metav1.DeleteOptions{}); err != nil {
		wd.t.Fatal(err)
	}
}

// expect waits until the watcher's set is want (in any order).
func (wd *world) expect(why string, want ...string) {
	wd.t.Helper()
	slices.Sort(want)
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := wd.w.Cgroups()
		if slices.Equal(got, want) || (len(got) == 0 && len(want) == 0) {
			return
		}
		if time.Now().After(deadline) {
			wd.t.Fatalf("%s: cgroups = %v, want %v\npods: %+v", why, got, want, wd.w.Pods())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestWatcherEnrolsByLabel(t *testing.T) {
	wd := newWorld(t, namespace("meshed", meshLabel("enabled")), namespace("plain", nil))
	// Pods that exist before smeshd starts.
	a := pod("plain", "a", "uid-a", node, meshLabel("enabled"))
	cgA := wd.createPod(a, true)
	b := pod("meshed", "b", "uid-b", node, nil)
	cgB := wd.createPod(b, true)
	optOut := pod("meshed", "opt-out", "uid-c", node, meshLabel("disabled"))
	wd.createPod(optOut, true)
	unlabelled := pod("plain", "unlabelled", "uid-u", node, nil)
	cgU := wd.createPod(unlabelled, true)
	// On another node: the API server would not even send it; the fake
	// does, and it must still be ignored. Its cgroup "exists" here so
	// that only the node decides.
	elsewhere := pod("meshed", "elsewhere", "uid-d", "node-2", meshLabel("enabled"))
	wd.createPod(elsewhere, true)
	done := pod("meshed", "done", "uid-f", node, nil)
	done.Status.Phase = corev1.PodSucceeded
	wd.createPod(done, true)

	wd.start()
	// Synced means the first set is there already, no waiting.
	if got, want := wd.w.Cgroups(), []string{cgA, cgB}; !slices.Equal(got, want) {
		t.Fatalf("after WaitSynced: %v, want %v", got, want)
	}

	// Every list and watch of pods asked the API server for this node's
	// pods only.
	for _, act := range wd.client.Actions() {
		if act.GetResource().Resource != "pods" {
			continue
		}
		var sel string
		switch a := act.(type) {
		case k8stesting.ListAction:
			sel = a.GetListRestrictions().Fields.String()
		case k8stesting.WatchAction:
			sel = a.GetWatchRestrictions().Fields.String()
		default:
			continue
		}
		if sel != "spec.nodeName="+node {
			t.Errorf("%s pods with field selector %q, want spec.nodeName=%s", act.GetVerb(), sel, node)
		}
	}

	// The pod label goes: a leaves the mesh.
	a.Labels = nil
	wd.updatePod(a)
	wd.expect("pod label removed", cgB)

	// Its namespace gets the label: a and unlabelled are back in.
	wd.updateNamespace(namespace("plain", meshLabel("enabled")))
	wd.expect("namespace label added", cgA, cgB, cgU)

	// A pod of the meshed namespace opts out with its own label.
	b.Labels = meshLabel("disabled")
	wd.updatePod(b)
	wd.expect("pod opts out", cgA, cgU)
	b.Labels = nil
	wd.updatePod(b)
	wd.expect("pod opts back in", cgA, cgB, cgU)

	// The namespace label goes: only pods with their own label stay.
	unlabelled.Labels = meshLabel("enabled")
	wd.updatePod(unlabelled)
	wd.updateNamespace(namespace("plain", map[string]string{labelKey: "no"}))
	wd.expect("namespace label changed", cgB, cgU)

	// A deleted pod leaves.
	wd.deletePod(b)
	wd.expect("pod deleted", cgU)

	// A pod that finishes leaves.
	unlabelled.Status.Phase = corev1.PodFailed
	wd.updatePod(unlabelled)
	wd.expect("pod failed")

	// Pods on other nodes never count, whatever their labels.
	other := pod("plain", "other", "uid-o", "node-2", meshLabel("enabled"))
	wd.createPod(other, true)
	time.Sleep(100 * time.Millisecond)
	wd.expect("pod on another node")
	for _, p := range wd.w.Pods().([]Pod) {
		if p.Name == "other" || p.Name == "elsewhere" {
			if p.Enrolled {
				t.Errorf("pod %s of node-2 enrolled: %+v", p.Name, p)
			}
		}
	}
}

// A pod enrolled before the kubelet made its cgroup joins once the cgroup
// is there; one whose cgroup goes away (while the object lingers) leaves.
func TestWatcherWaitsForTheCgroup(t *testing.T) {
	wd := newWorld(t, namespace("meshed", meshLabel("enabled")))
	wd.start()
	wd.expect("no pods")
	p := pod("meshed", "new", "uid-new", node, nil)
	cg := wd.createPod(p, false)
	time.Sleep(100 * time.Millisecond)
	wd.expect("cgroup not made yet")
	var view []Pod
	deadline := time.Now().Add(10 * time.Second)
	for len(view) == 0 && time.Now().Before(deadline) {
		view = wd.w.Pods().([]Pod)
		time.Sleep(5 * time.Millisecond)
	}
	if len(view) != 1 || !view[0].Enrolled || view[0].Error == "" || view[0].Why != "namespace label" {
		t.Errorf("/debug/pods before the cgroup exists: %+v, want the pod enrolled with an error", view)
	}
	mkdirs(t, cg, ".")
	wd.expect("cgroup made", cg)

	// The cgroup is removed (the object lingers): the periodic check
	// notices.
	if err := os.Remove(cg); err != nil {
		t.Fatal(err)
	}
	wd.expect("cgroup removed")
}

// Changed fires after a change, so a consumer can wait on it.
func TestWatcherChanged(t *testing.T) {
	wd := newWorld(t, namespace("meshed", nil))
	wd.start()
	drain := func() {
		for {
			select {
			case <-wd.w.Changed():
			default:
				return
			}
		}
	}
	drain()
	cg := wd.createPod(pod("meshed", "p", "uid-p", node, meshLabel("enabled")), true)
	select {
	case <-wd.w.Changed():
	case <-time.After(10 * time.Second):
		t.Fatal("no change reported")
	}
	if got := wd.w.Cgroups(); !slices.Equal(got, []string{cg}) {
		t.Fatalf("Cgroups after Changed = %v, want [%s]", got, cg)
	}
}

// An enrolled pod's identity is its namespace's and service account's
// (the API server's "default" when the spec names none), by cgroup, and
// /debug/pods shows both; pods out of the mesh have none.
func TestWatcherKeepsIdentities(t *testing.T) {
	wd := newWorld(t, namespace("prod", meshLabel("enabled")), namespace("plain", nil))
	a := pod("prod", "a", "uid-a", node, nil)
	a.Spec.ServiceAccountName = "payments"
	cgA := wd.createPod(a, true)
	b := pod("prod", "b", "uid-b", node, nil)
	cgB := wd.createPod(b, true)
	out := pod("plain", "out", "uid-o", node, nil)
	out.Spec.ServiceAccountName = "web"
	wd.createPod(out, true)
	wd.start()
	want := map[string]string{
		cgA: "spiffe://smesh.local/ns/prod/sa/payments",
		cgB: "spiffe://smesh.local/ns/prod/sa/default",
	}
	got := wd.w.Identities()
	if len(got) != len(want) {
		t.Errorf("identities %v, want %v", got, want)
	}
	for cg, id := range want {
		if got[cg].String() != id {
			t.Errorf("identity of %s: %v, want %s", cg, got[cg], id)
		}
	}
	for _, p := range wd.w.Pods().([]Pod) {
		switch p.Name {
		case "a":
			if p.ServiceAccount != "payments" || p.Identity != want[cgA] {
				t.Errorf("/debug/pods shows %+v", p)
			}
		case "out":
			if p.ServiceAccount != "" || p.Identity != "" {
				t.Errorf("a pod out of the mesh shows an identity: %+v", p)
			}
		}
	}
}
