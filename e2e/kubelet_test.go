package e2e

import (
	"context"
	"encoding/hex"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// kubelet does for the test world what a kubelet does on each node for the
// pods the API server has there: a pod bound to one of its nodes
// (spec.nodeName) gets a sandbox, as containerd and the CNI bridge plugin
// make it (a network namespace, eth0 on the node's bridge, the pod's cgroup
// named as the kubelet's cgroup driver names it, a pause container), and its
// status written back through the status subresource; a deleted pod loses
// them. There is no watch loop: the test calls run after creating a pod, and
// delete to delete one, so that a failure stops the test where it happens.
type kubelet struct {
	t   *testing.T
	api kubernetes.Interface // as the admin
	// systemd: the kubelet's systemd cgroup driver, else cgroupfs.
	systemd bool
	nodes   map[string]*kubeNode // by node name
}

// kubeNode is a node of the test world as the kubelet sees it.
type kubeNode struct {
	cn *testenv.ClusterNode
	// kubepods is the kubelet's cgroup for all pods on the node. Nodes of
	// the test world (of this test and of tests running at the same time)
	// share the machine's cgroup tree, so each node's is below a cgroup of
	// its own, smesh-test-<random>/kubepods.slice or .../kubepods, which
	// the node's smeshd is told by [kubernetes] kubepods_cgroup.
	kubepods string
}

// kubePod is a pod the kubelet runs.
type kubePod struct {
	*testenv.Pod // Cgroup is the pod's cgroup, pod<UID>
	obj          *corev1.Pod
	// app is the cgroup of the pod's application container, below the
	// pod's: the test's processes in the pod run there.
	app string
}

// container returns the pod with app as its cgroup, for StartHelper and
// the node's pod helpers.
func (p *kubePod) container() *testenv.Pod {
	c := *p.Pod
	c.Cgroup = p.app
	return &c
}

// addr is the pod's IPv4 address from its status, as a client finds it
// through the API server, with port.
func (p *kubePod) addr(t *testing.T, port uint16) string {
	t.Helper()
	ip, err := netip.ParseAddr(p.obj.Status.PodIP)
	if err != nil {
		t.Fatalf("pod %s/%s: status.podIP: %v", p.obj.Namespace, p.obj.Name, err)
	}
	return netip.AddrPortFrom(ip, port).String()
}

// addNode makes cn a node of the kubelet named name, with its kubepods
// cgroup, as the kubelet makes it when it starts.
func (k *kubelet) addNode(name string, cn *testenv.ClusterNode) *kubeNode {
	kubepods := "kubepods"
	if k.systemd {
		kubepods = "kubepods.slice"
	}
	n := &kubeNode{cn: cn, kubepods: filepath.Join(testenv.NewCgroup(k.t), kubepods)}
	if err := os.Mkdir(n.kubepods, 0o755); err != nil {
		k.t.Fatal(err)
	}
	k.nodes[name] = n
	return n
}

// podCgroup is where the kubelet puts the cgroup of pod, by its QoS class:
//
//	systemd   kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<UID, - as _>.slice
//	          kubepods.slice/kubepods-pod<UID, - as _>.slice (Guaranteed)
//	cgroupfs  kubepods/besteffort/pod<UID>
//	          kubepods/pod<UID> (Guaranteed)
func (k *kubelet) podCgroup(n *kubeNode, pod *corev1.Pod) string {
	qos := strings.ToLower(string(pod.Status.QOSClass))
	if k.systemd {
		uid := strings.ReplaceAll(string(pod.UID), "-", "_")
		if qos == "guaranteed" {
			return filepath.Join(n.kubepods, "kubepods-pod"+uid+".slice")
		}
		return filepath.Join(n.kubepods, "kubepods-"+qos+".slice", "kubepods-"+qos+"-pod"+uid+".slice")
	}
	if qos == "guaranteed" {
		return filepath.Join(n.kubepods, "pod"+string(pod.UID))
	}
	return filepath.Join(n.kubepods, qos, "pod"+string(pod.UID))
}

// containerCgroup names a new container's cgroup below the pod's, as
// containerd does for each driver.
func (k *kubelet) containerCgroup(podCg string) string {
	id := hex.EncodeToString(randBytes(32))
	if k.systemd {
		return filepath.Join(podCg, "cri-containerd-"+id+".scope")
	}
	return filepath.Join(podCg, id)
}

// run starts pod, which the API server has bound to one of the kubelet's
// nodes, and reports it Running with its addresses.
func (k *kubelet) run(pod *corev1.Pod) *kubePod {
	t := k.t
	t.Helper()
	n := k.nodes[pod.Spec.NodeName]
	if n == nil {
		t.Fatalf("pod %s/%s is bound to %q, not a node of this kubelet", pod.Namespace, pod.Name, pod.Spec.NodeName)
	}
	if pod.Status.QOSClass == "" {
		t.Fatalf("pod %s/%s: the API server set no status.qosClass", pod.Namespace, pod.Name)
	}
	podCg := k.podCgroup(n, pod)
	if err := os.MkdirAll(filepath.Dir(podCg), 0o755); err != nil {
		t.Fatal(err)
	}
	p := &kubePod{Pod: n.cn.AddPodAt(t, podCg)}
	pause, app := k.containerCgroup(podCg), k.containerCgroup(podCg)
	for _, cg := range []string{pause, app} {
		if err := os.Mkdir(cg, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	testenv.StartHelper(t, pause, p.Name, "pause")
	p.app = app

	now := metav1.Now()
	st := pod.DeepCopy()
	st.Status.Phase = corev1.PodRunning
	st.Status.HostIP = n.cn.Gateway4.String()
	st.Status.PodIP = p.Addr4.String()
	st.Status.PodIPs = []corev1.PodIP{{IP: p.Addr4.String()}, {IP: p.Addr6.String()}}
	st.Status.StartTime = &now
	st.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	obj, err := k.api.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, st, metav1.UpdateOptions{})
	if err != nil {
		t.Fatalf("writing the status of pod %s/%s: %v", pod.Namespace, pod.Name, err)
	}
	p.obj = obj
	return p
}

// podSpec is a pod of one container (the pause image: nothing pulls it)
// on node, of QoS class qos (Guaranteed or BestEffort).
func podSpec(namespace, name, node string, labels map[string]string, qos corev1.PodQOSClass) *corev1.Pod {
	c := corev1.Container{Name: "app", Image: "registry.k8s.io/pause:3.10"}
	if qos == corev1.PodQOSGuaranteed {
		r := corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("64Mi")}
		c.Resources = corev1.ResourceRequirements{Requests: r, Limits: r}
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, Labels: labels},
		Spec:       corev1.PodSpec{NodeName: node, Containers: []corev1.Container{c}},
	}
}

// create creates pod in the API server, as the admin, and runs it.
func (k *kubelet) create(pod *corev1.Pod) *kubePod {
	k.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	obj, err := k.api.CoreV1().Pods(pod.Namespace).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		k.t.Fatalf("creating pod %s/%s: %v", pod.Namespace, pod.Name, err)
	}
	return k.run(obj)
}

// delete deletes p as a user and the kubelet do together: the user's
// delete marks it terminating (a pod bound to a node is deleted
// gracefully), the kubelet kills its processes and removes its sandbox, and
// then removes the object for good.
func (k *kubelet) delete(p *kubePod) {
	t := k.t
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pods := k.api.CoreV1().Pods(p.obj.Namespace)
	if err := pods.Delete(ctx, p.obj.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatalf("deleting pod %s/%s: %v", p.obj.Namespace, p.obj.Name, err)
	}
	p.Delete(t)
	now := int64(0)
	err := pods.Delete(ctx, p.obj.Name, metav1.DeleteOptions{GracePeriodSeconds: &now,
		Preconditions: &metav1.Preconditions{UID: &p.obj.UID}})
	if err != nil {
		t.Fatalf("removing pod %s/%s for good: %v", p.obj.Namespace, p.obj.Name, err)
	}
}
