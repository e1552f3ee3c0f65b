package deploy

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/smesh-dev/smesh/pkg/testenv/kubecp"
)

// TestDaemonSetRolloutOnAPIServer gives a real kube-apiserver the DaemonSet
// as shipped: it accepts the update strategy (maxSurge 1, maxUnavailable 0)
// and the exec readiness probe, and a pod made from the template, as the
// DaemonSet controller makes the new pod of a rollout, comes back with no
// hostPort, so the scheduler can place it beside the old one. The same pod
// with the tunnel port declared as before comes back with hostPort 18001
// (the server defaults it on the host network): two such pods never share
// a node, and the rollout would wait for ever.
func TestDaemonSetRolloutOnAPIServer(t *testing.T) {
	cp := kubecp.Start(t)
	cs, err := kubernetes.NewForConfig(cp.Admin)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := kubecp.Apply(ctx, cs, filepath.Join(manifestDir, "namespace.yaml"), filepath.Join(manifestDir, "rbac.yaml")); err != nil {
		t.Fatal(err)
	}
	ds := find[*appsv1.DaemonSet](t, objects(t), "smeshd")
	got, err := cs.AppsV1().DaemonSets(ds.Namespace).Create(ctx, ds, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("the API server refuses the DaemonSet: %v", err)
	}
	ru := got.Spec.UpdateStrategy.RollingUpdate
	if ru == nil || ru.MaxSurge == nil || ru.MaxSurge.IntValue() != 1 || ru.MaxUnavailable == nil || ru.MaxUnavailable.IntValue() != 0 {
		t.Errorf("update strategy as stored: %+v", got.Spec.UpdateStrategy)
	}

	pod := func(name string, ports []corev1.ContainerPort) *corev1.Pod {
		t.Helper()
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ds.Namespace, Labels: ds.Spec.Template.Labels},
			Spec:       *ds.Spec.Template.Spec.DeepCopy(),
		}
		p.Spec.NodeName = "node-a"
		p.Spec.Containers[0].Ports = ports
		out, err := cs.CoreV1().Pods(ds.Namespace).Create(ctx, p, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("the API server refuses the DaemonSet's pod %s: %v", name, err)
		}
		return out
	}
	hostPorts := func(p *corev1.Pod) []int32 {
		var out []int32
		for _, c := range p.Spec.Containers {
			for _, port := range c.Ports {
				if port.HostPort != 0 {
					out = append(out, port.HostPort)
				}
			}
		}
		return out
	}
	for _, name := range []string{"smeshd-old", "smeshd-new"} {
		p := pod(name, nil)
		if hp := hostPorts(p); len(hp) != 0 {
			t.Errorf("pod %s has host ports %v: the surge pod cannot be scheduled beside the old one", name, hp)
		}
		if rp := p.Spec.Containers[0].ReadinessProbe; rp == nil || rp.Exec == nil {
			t.Errorf("pod %s readiness probe as stored: %+v", name, rp)
		}
	}
	declared := pod("smeshd-declared", []corev1.ContainerPort{{Name: "tunnel", ContainerPort: 18001, Protocol: corev1.ProtocolTCP}})
	if hp := hostPorts(declared); len(hp) != 1 || hp[0] != 18001 {
		t.Errorf("a declared port on the host network as stored: host ports %v; want 18001 (defaulted: why the DaemonSet declares none)", hp)
	}
}
