package kube

import (
	"maps"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// probed gives p a container with a readiness probe on a named port, a
// liveness probe on a number, a startup probe over gRPC, and an init
// container (a sidecar) with a TCP probe.
func probed(p *corev1.Pod) *corev1.Pod {
	p.Spec.Containers = []corev1.Container{{
		Name:           "app",
		Ports:          []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}, {Name: "udp", ContainerPort: 53, Protocol: corev1.ProtocolUDP}},
		ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromString("http")}}},
		LivenessProbe:  &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromInt32(9090)}}},
		StartupProbe:   &corev1.Probe{ProbeHandler: corev1.ProbeHandler{GRPC: &corev1.GRPCAction{Port: 9091}}},
	}, {
		Name:          "exec-only",
		LivenessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"true"}}}},
		// A probe on a name no port has, or a UDP port: none.
		ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromString("nope")}}},
	}}
	p.Spec.InitContainers = []corev1.Container{{
		Name:           "sidecar",
		ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(15021)}}},
	}}
	return p
}

func TestProbePorts(t *testing.T) {
	p := probed(pod("ns", "p", "uid", node, nil))
	want := []uint16{8080, 9090, 9091, 15021}
	if got := ProbePorts(p); !slices.Equal(got, want) {
		t.Errorf("ProbePorts = %v, want %v", got, want)
	}
	// What the informer keeps (trimPod) gives the same ports.
	trimmed, _ := trimPod(p)
	if got := ProbePorts(trimmed.(*corev1.Pod)); !slices.Equal(got, want) {
		t.Errorf("ProbePorts of the trimmed pod = %v, want %v", got, want)
	}
	// A UDP port of the same name is not a probe's.
	p.Spec.Containers[0].Ports = []corev1.ContainerPort{{Name: "http", ContainerPort: 53, Protocol: corev1.ProtocolUDP}}
	if got := ProbePorts(p); slices.Contains(got, 53) {
		t.Errorf("ProbePorts = %v: a UDP port", got)
	}
}

// TestWatcherStrictByLabel: a pod in the mesh is strict by its own strict
// label or its namespace's (the pod's own wins), with its probes' ports
// exempt; a strict label alone does not put a pod in the mesh.
func TestWatcherStrictByLabel(t *testing.T) {
	strictNS := map[string]string{labelKey: "enabled", "smesh.dev/inbound": "strict"}
	wd := newWorld(t, namespace("strictns", strictNS), namespace("plain", nil))
	a := probed(pod("plain", "a", "uid-a", node, map[string]string{labelKey: "enabled", "smesh.dev/inbound": "strict"}))
	cgA := wd.createPod(a, true)
	b := pod("strictns", "b", "uid-b", node, nil)
	cgB := wd.createPod(b, true)
	optOut := pod("strictns", "c", "uid-c", node, map[string]string{"smesh.dev/inbound": "open"})
	cgC := wd.createPod(optOut, true)
	notMeshed := pod("plain", "d", "uid-d", node, map[string]string{"smesh.dev/inbound": "strict"})
	wd.createPod(notMeshed, true)
	wd.start()
	want := map[string][]uint16{cgA: {8080, 9090, 9091, 15021}, cgB: nil}
	if got := wd.w.Strict(); !maps.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("Strict = %v, want %v (cgroups %v)\npods: %+v", got, want, wd.w.Cgroups(), wd.w.Pods())
	}
	if got := wd.w.Cgroups(); !slices.Contains(got, cgC) {
		t.Errorf("opted out of strict, c must stay in the mesh: %v", got)
	}
	// Labelled off: no longer strict, Changed says so.
	a.Labels["smesh.dev/inbound"] = "open"
	wd.updatePod(a)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, ok := wd.w.Strict()[cgA]; !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod a still strict after its label changed: %v", wd.w.Strict())
		}
		time.Sleep(5 * time.Millisecond)
	}
}
