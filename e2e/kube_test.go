package e2e

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/smesh-dev/smesh/pkg/certs"
	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/daemon"
	"github.com/smesh-dev/smesh/pkg/kube"
	"github.com/smesh-dev/smesh/pkg/services"
	"github.com/smesh-dev/smesh/pkg/testenv"
	"github.com/smesh-dev/smesh/pkg/testenv/kubecp"
)

// startKube is cmd/smeshd's wiring of [kubernetes], for the smeshd helper.
func startKube(ctx context.Context, cfg config.Kubernetes, td spiffeid.TrustDomain, mount string, sink services.Sink, log zerolog.Logger) (daemon.PodSource, error) {
	return kube.Start(ctx, cfg, td, mount, sink, log)
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// kubeCluster is a real Kubernetes control plane (kubecp) with smesh's
// namespace and RBAC objects applied as shipped, and smeshd's ServiceAccount
// token.
type kubeCluster struct {
	t     *testing.T
	cp    *kubecp.ControlPlane
	admin kubernetes.Interface
	// sa holds token, ca.crt and namespace: what the kubelet mounts into
	// smeshd's pod for its ServiceAccount.
	sa string
}

func startKubeCluster(t *testing.T) *kubeCluster {
	t.Helper()
	cp := kubecp.Start(t)
	// namespace.yaml and rbac.yaml as shipped, and smeshd's token.
	sa := cp.Smeshd(t)
	admin, err := kubernetes.NewForConfig(cp.Admin)
	if err != nil {
		t.Fatal(err)
	}
	kc := &kubeCluster{t: t, cp: cp, admin: admin, sa: t.TempDir()}
	if err := kubecp.WriteServiceAccount(kc.sa, "smesh-system", sa.BearerToken, cp.CA()); err != nil {
		t.Fatal(err)
	}
	return kc
}

// namespace creates a namespace with its default ServiceAccount, which a
// controller-manager would make and pods need.
func (kc *kubeCluster) namespace(t *testing.T, name string, labels map[string]string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := kc.admin.CoreV1().Namespaces().Create(ctx,
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := kc.admin.CoreV1().ServiceAccounts(name).Create(ctx,
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// label sets (or, with value "", removes) the mesh label of a namespace
// (pod == "") or of a pod, as a user would, with a merge patch.
func (kc *kubeCluster) label(t *testing.T, namespace, pod, value string) {
	t.Helper()
	v := "null"
	if value != "" {
		v = fmt.Sprintf("%q", value)
	}
	patch := []byte(`{"metadata":{"labels":{"smesh.dev/mesh":` + v + `}}}`)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var err error
	if pod == "" {
		_, err = kc.admin.CoreV1().Namespaces().Patch(ctx, namespace, types.MergePatchType, patch, metav1.PatchOptions{})
	} else {
		_, err = kc.admin.CoreV1().Pods(namespace).Patch(ctx, pod, types.MergePatchType, patch, metav1.PatchOptions{})
	}
	if err != nil {
		t.Fatalf("labelling %s/%s: %v", namespace, pod, err)
	}
}

// reachFrom makes the API server, which listens on the test's loopback,
// reachable on the loopback of node's network namespace too, and returns
// the port: a relay in the test process, byte for byte, so that smeshd
// there talks TLS to the API server itself (whose certificate names
// 127.0.0.1). Cleanup closes it and its connections.
func (kc *kubeCluster) reachFrom(t *testing.T, node *testenv.Node) int {
	t.Helper()
	var ln net.Listener
	if err := node.Do(func() (err error) {
		ln, err = net.Listen("tcp4", "127.0.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	target := strings.TrimPrefix(kc.cp.Admin.Host, "https://")
	var (
		mu     sync.Mutex
		conns  = map[net.Conn]bool{}
		closed bool
		wg     sync.WaitGroup
	)
	track := func(c net.Conn) bool {
		mu.Lock()
		defer mu.Unlock()
		if closed {
			c.Close()
			return false
		}
		conns[c] = true
		return true
	}
	relay := func(c net.Conn) {
		defer wg.Done()
		if !track(c) {
			return
		}
		up, err := net.DialTimeout("tcp", target, 5*time.Second)
		if err != nil || !track(up) {
			c.Close()
			return
		}
		go func() {
			io.Copy(up, c)
			up.(*net.TCPConn).CloseWrite()
		}()
		io.Copy(c, up)
		c.Close()
		up.Close()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go relay(c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		closed = true
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().(*net.TCPAddr).Port
}

// startSmeshd starts smeshd on n as the DaemonSet runs it: [kubernetes] on,
// no [capture] cgroups, NODE_NAME set, the ServiceAccount's token and the
// API server's CA where client-go's in-cluster configuration reads them (in
// a mount namespace of its own: a tmpfs on /run), and the API server's
// address in the environment the kubelet gives a pod. Its node's kubepods
// cgroup is named by [kubernetes] kubepods_cgroup, as on a node with more
// than one: the machine's tree holds every test node's.
func (kc *kubeCluster) startSmeshd(n *node, nodeName string, kn *kubeNode) {
	n.t.Helper()
	n.startVia(kc.podWrapper(n, nodeName), "splice", kc.kubeConf(n, kn))
}

// podWrapper runs smeshd on n as in its pod (see startSmeshd).
func (kc *kubeCluster) podWrapper(n *node, nodeName string) []string {
	t := n.t
	t.Helper()
	// The node's certificate names it as the cluster does: a receiving
	// smeshd checks with the cluster's pods that the sending node runs
	// the workload it asserts (kube.PodIdentities).
	if n.name != nodeName {
		n.name = nodeName
		if _, err := certs.Init(n.pki, []string{nodeName}, "test.local"); err != nil {
			t.Fatal(err)
		}
	}
	port := kc.reachFrom(t, n.ns)
	nsenter := testenv.RequireCommand(t, "nsenter")
	unshare := testenv.RequireCommand(t, "unshare")
	return append([]string{nsenter, "--net=/run/netns/" + n.ns.Name},
		kubecp.InPod(unshare, kc.sa, nodeName, "127.0.0.1", port)...)
}

// kubeConf is the configuration's [kubernetes] for smeshd on n (no
// [capture] cgroups).
func (kc *kubeCluster) kubeConf(n *node, kn *kubeNode) string {
	n.capture = "[]"
	return fmt.Sprintf("[kubernetes]\nenabled = true\nkubepods_cgroup = %q\n", cgroupRel(n.t, kn.kubepods))
}

// debugPods reads smeshd's /debug/pods.
func debugPods(n *node) map[string]kube.Pod {
	n.t.Helper()
	code, body := n.admin("/debug/pods")
	var pods []kube.Pod
	if err := json.Unmarshal([]byte(body), &pods); code != 200 || err != nil {
		n.t.Fatalf("/debug/pods: %d %s (%v)", code, body, err)
	}
	out := map[string]kube.Pod{}
	for _, p := range pods {
		out[p.Namespace+"/"+p.Name] = p
	}
	return out
}

// kubeCaptured reports whether a connection from pod p's application
// container to addr went through smeshd (see captured).
func kubeCaptured(n *node, p *kubePod, addr string) bool {
	n.t.Helper()
	saw, local := (&podNode{node: n}).podPeer(p.container(), addr)
	return saw != local
}

// TestKubernetesLabels runs the Kubernetes mode against a real API server
// (kubecp, RBAC on, smesh's namespace.yaml and rbac.yaml applied as
// shipped), with a test kubelet that runs the pods it schedules to two
// nodes of a test cluster, once for each kubelet cgroup driver. smeshd runs
// on each node as the DaemonSet runs it, with smeshd's ServiceAccount token.
// A pod of its node whose label says so is in the mesh from smeshd's start,
// a pod is in the mesh through its namespace's label, and a pod created
// later joins; their connections to a pod of the other node are tunnelled,
// and between the two pods of one node spliced, every byte checked. A pod
// leaves the mesh when its label says otherwise, comes back through its
// namespace's label, and leaves when deleted; a connection it opened while in
// the mesh keeps flowing throughout. No smeshd lists another node's pods:
// one with a cgroup on the wrong node is never enrolled there.
func TestKubernetesLabels(t *testing.T) {
	testenv.RequirePrivileged(t)
	kc := startKubeCluster(t)
	for _, driver := range []string{"cgroupfs", "systemd"} {
		t.Run(driver, func(t *testing.T) { testKubernetesLabels(t, kc, driver) })
	}
}

func testKubernetesLabels(t *testing.T, kc *kubeCluster, driver string) {
	c := testenv.NewCluster()
	cnA, cnB := c.AddNode(t), c.AddNode(t)
	testenv.JoinNodes(t, cnA, cnB)
	a, b := nodeOn(t, cnA.Node), nodeOn(t, cnB.Node)
	k := &kubelet{t: t, api: kc.admin, systemd: driver == "systemd", nodes: map[string]*kubeNode{}}
	nameA, nameB := "node-a-"+driver, "node-b-"+driver
	ka, kb := k.addNode(nameA, cnA), k.addNode(nameB, cnB)
	demo, other := "demo-"+driver, "other-"+driver
	kc.namespace(t, demo, nil)
	kc.namespace(t, other, map[string]string{"smesh.dev/mesh": "enabled"})
	enabled := map[string]string{"smesh.dev/mesh": "enabled"}

	// Before smeshd starts: a labelled pod on node a, and on node b a pod
	// in a labelled namespace that serves.
	web := k.create(podSpec(demo, "web", nameA, enabled, corev1.PodQOSBestEffort))
	srv := k.create(podSpec(other, "srv", nameB, nil, corev1.PodQOSGuaranteed))
	addr := srv.addr(t, 9000)
	podServerAt(t, srv.container(), addr)
	// srv's cgroup as if on node a too: smeshd there never lists srv, so
	// never enrols it.
	elsewhere := k.podCgroup(ka, srv.obj)
	if err := os.MkdirAll(elsewhere, 0o755); err != nil {
		t.Fatal(err)
	}

	kc.startSmeshd(b, nameB, kb)
	kc.startSmeshd(a, nameA, ka)
	b.waitServed(srv.Name)
	a.waitServed(web.Name)

	if !kubeCaptured(a, web, addr) {
		t.Fatal("a labelled pod's connection was not captured")
	}
	if captured(a, elsewhere, addr) {
		t.Error("a pod of another node was captured")
	}
	if pods := debugPods(a); len(pods) != 1 || !pods[demo+"/web"].Enrolled || pods[demo+"/web"].Cgroup != web.Cgroup {
		t.Errorf("node a's /debug/pods: %+v, want pod web enrolled in %s only", pods, web.Cgroup)
	}
	if pods := debugPods(b); len(pods) != 1 || !pods[other+"/srv"].Enrolled || pods[other+"/srv"].Why != "namespace label" {
		t.Errorf("node b's /debug/pods: %+v, want pod srv enrolled by its namespace's label only", pods)
	}

	// A pod created while smeshd runs joins; to the pod of the other node
	// its connections are tunnelled, to the pod next to it spliced.
	late := k.create(podSpec(demo, "late", nameA, enabled, corev1.PodQOSGuaranteed))
	a.waitServed(late.Name)
	if !kubeCaptured(a, late, addr) {
		t.Error("the connection of a pod created after smeshd's start was not captured")
	}
	pa := &podNode{node: a}
	_, m := a.admin("/metrics")
	tunnelled := testenv.Metric(t, m, "smesh_connections_total", map[string]string{"path": "tunnel_out"})
	pa.podClient(web.container(), "oneway", addr, fmt.Sprint(8<<20))
	pa.podClient(late.container(), "echo", addr, fmt.Sprint(2<<20))
	_, m = a.admin("/metrics")
	if v := testenv.Metric(t, m, "smesh_connections_total", map[string]string{"path": "tunnel_out"}); v < tunnelled+2 {
		t.Errorf("node a counted %v outgoing tunnel connections, want at least %v", v, tunnelled+2)
	}
	local := late.addr(t, 9001)
	podServerAt(t, late.container(), local)
	before := a.stats()
	pa.podClient(web.container(), "oneway", local, fmt.Sprint(8<<20))
	checkSpliced(t, "sk_msg between the pods of node a", before, a.stats(), 8<<20, true)

	long := testenv.StartHelper(t, web.app, web.Name, "client", "paced", addr, "1500")
	if line, err := long.ReadLine(5 * time.Second); err != nil || line != "connected" {
		t.Fatalf("long-lived client: %q %v %s", line, err, long.Stderr())
	}
	eventually := func(what string, want bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for kubeCaptured(a, web, addr) != want {
			if time.Now().After(deadline) {
				t.Fatalf("%s: captured = %v after 10s, want %v\n%s", what, !want, want, a.smeshd.Stderr())
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	kc.label(t, demo, "web", "disabled")
	eventually("pod label set to disabled", false)
	// An unlabelled canary pod in the same namespace joins once smeshd has
	// seen the namespace's label: only then does "web is still out" say
	// anything (/debug/pods is one decision over all pods, and the canary
	// captured means the set with that decision reached the data path).
	canary := k.create(podSpec(demo, "canary", nameA, nil, corev1.PodQOSBestEffort))
	deadline := time.Now().Add(10 * time.Second)
	for p, ok := debugPods(a)[demo+"/canary"]; !ok || p.Enrolled || p.Why != "no label"; p, ok = debugPods(a)[demo+"/canary"] {
		if time.Now().After(deadline) {
			t.Fatalf("node a's /debug/pods 10s after pod canary was created: %+v, want canary listed and out (no label)", debugPods(a))
		}
		time.Sleep(200 * time.Millisecond)
	}
	kc.label(t, demo, "", "enabled")
	deadline = time.Now().Add(10 * time.Second)
	for !debugPods(a)[demo+"/canary"].Enrolled {
		if time.Now().After(deadline) {
			t.Fatalf("node a's /debug/pods 10s after namespace %s was labelled: %+v, want canary enrolled by the namespace label\n%s",
				demo, debugPods(a), a.smeshd.Stderr())
		}
		time.Sleep(200 * time.Millisecond)
	}
	a.waitServed(canary.Name)
	deadline = time.Now().Add(10 * time.Second)
	for !kubeCaptured(a, canary, addr) {
		if time.Now().After(deadline) {
			t.Fatalf("the canary pod enrolled by its namespace's label was not captured after 10s\n%s", a.smeshd.Stderr())
		}
		time.Sleep(200 * time.Millisecond)
	}
	if p := debugPods(a)[demo+"/web"]; p.Enrolled || p.Why != "pod label smesh.dev/mesh=disabled" {
		t.Errorf("node a's pod web once its namespace is labelled: %+v, want out by its own label", p)
	}
	if kubeCaptured(a, web, addr) {
		t.Error("namespace labelled, the pod's own label still disabled: the pod's connection was captured")
	}
	kc.label(t, demo, "web", "")
	eventually("pod label removed in a labelled namespace", true)
	if err := long.Wait(); err != nil {
		t.Errorf("connection opened in the mesh, across the label changes: %v\n%s", err, long.Stderr())
	}

	k.delete(web)
	deadline = time.Now().Add(10 * time.Second)
	for {
		pods := debugPods(a)
		if _, ok := pods[demo+"/web"]; !ok && pods[demo+"/late"].Enrolled {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node a's /debug/pods 10s after pod web was deleted: %+v, want web gone and late enrolled", pods)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !kubeCaptured(a, late, addr) {
		t.Error("pod late's connection was not captured after pod web was deleted")
	}
}
