package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/daemon"
	"github.com/smesh-dev/smesh/pkg/kube"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// startKube is cmd/smeshd's wiring of [kubernetes], for the smeshd helper.
func startKube(ctx context.Context, cfg config.Kubernetes, mount string, log zerolog.Logger) (daemon.PodSource, error) {
	return kube.Start(ctx, cfg, mount, log)
}

// fakeAPI answers the requests smeshd makes of the Kubernetes API server
// (lists and watches of pods and namespaces, watch-list included) from a
// state the test changes, over TLS with a service account token, inside a
// test node's network namespace.
type fakeAPI struct {
	t     *testing.T
	srv   *httptest.Server
	token string
	dir   string // token, ca.crt, namespace: what a pod finds in its service account mount

	mu       sync.Mutex
	rv       int
	pods     map[string]*corev1.Pod
	nss      map[string]*corev1.Namespace
	watchers map[string]map[chan []byte]bool // by resource
	nodes    []string                        // the field selectors' nodes, as asked
}

func startFakeAPI(t *testing.T, in *testenv.Node) *fakeAPI {
	t.Helper()
	api := &fakeAPI{t: t, token: "e2e-token-" + hex.EncodeToString(randBytes(8)), dir: t.TempDir(),
		pods: map[string]*corev1.Pod{}, nss: map[string]*corev1.Namespace{},
		watchers: map[string]map[chan []byte]bool{"pods": {}, "namespaces": {}}}
	var ln net.Listener
	if err := in.Do(func() (err error) {
		ln, err = net.Listen("tcp4", "127.0.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	api.srv = httptest.NewUnstartedServer(http.HandlerFunc(api.serve))
	api.srv.Listener.Close()
	api.srv.Listener = ln
	api.srv.StartTLS()
	t.Cleanup(func() {
		api.srv.CloseClientConnections()
		api.srv.Close()
	})
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: api.srv.Certificate().Raw})
	for name, data := range map[string][]byte{"token": []byte(api.token), "ca.crt": ca, "namespace": []byte("smesh-system")} {
		if err := os.WriteFile(filepath.Join(api.dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return api
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// wrapper starts smeshd as the DaemonSet does: in node's network
// namespace, with the service account's files where client-go's in-cluster
// configuration reads them (in a mount namespace of its own: a tmpfs on
// /run), and the environment the kubelet gives a pod.
func (api *fakeAPI) wrapper(node *testenv.Node, nodeName string) []string {
	nsenter := testenv.RequireCommand(api.t, "nsenter")
	unshare := testenv.RequireCommand(api.t, "unshare")
	port := strconv.Itoa(api.srv.Listener.Addr().(*net.TCPAddr).Port)
	sa := "/run/secrets/kubernetes.io/serviceaccount"
	script := fmt.Sprintf(`set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p %[1]s
cp %[2]s/token %[2]s/ca.crt %[2]s/namespace %[1]s/
exec env NODE_NAME=%[3]s KUBERNETES_SERVICE_HOST=127.0.0.1 KUBERNETES_SERVICE_PORT=%[4]s "$@"`, sa, api.dir, nodeName, port)
	return []string{nsenter, "--net=/run/netns/" + node.Name, unshare, "--mount", "--propagation", "private", "sh", "-c", script, "sh"}
}

func (api *fakeAPI) serve(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+api.token {
		http.Error(w, "unauthorized", http.StatusUnauthorized)
		return
	}
	resource, ok := strings.CutPrefix(r.URL.Path, "/api/v1/")
	if !ok || (resource != "pods" && resource != "namespaces") || r.Method != http.MethodGet {
		http.Error(w, "not served here", http.StatusNotFound)
		return
	}
	q := r.URL.Query()
	node := ""
	if resource == "pods" {
		n, ok := strings.CutPrefix(q.Get("fieldSelector"), "spec.nodeName=")
		if !ok {
			http.Error(w, "smeshd lists the pods of its node only", http.StatusBadRequest)
			return
		}
		node = n
		api.mu.Lock()
		api.nodes = append(api.nodes, n)
		api.mu.Unlock()
	}
	w.Header().Set("Content-Type", "application/json")
	if q.Get("watch") != "true" {
		api.mu.Lock()
		items, rv := api.items(resource, node)
		api.mu.Unlock()
		list := map[string]any{"apiVersion": "v1", "kind": listKind(resource), "metadata": map[string]any{"resourceVersion": rv}, "items": items}
		json.NewEncoder(w).Encode(list)
		return
	}
	ch := make(chan []byte, 64)
	api.mu.Lock()
	var initial [][]byte
	if q.Get("sendInitialEvents") == "true" {
		items, rv := api.items(resource, node)
		for _, it := range items {
			initial = append(initial, event("ADDED", it))
		}
		// The end of the initial events, as the API server marks it.
		initial = append(initial, event("BOOKMARK", map[string]any{"apiVersion": "v1", "kind": itemKind(resource),
			"metadata": map[string]any{"resourceVersion": rv, "annotations": map[string]string{"k8s.io/initial-events-end": "true"}}}))
	}
	api.watchers[resource][ch] = true
	api.mu.Unlock()
	defer func() {
		api.mu.Lock()
		delete(api.watchers[resource], ch)
		api.mu.Unlock()
	}()
	flush := func(b []byte) bool {
		if _, err := w.Write(b); err != nil {
			return false
		}
		w.(http.Flusher).Flush()
		return true
	}
	for _, b := range initial {
		flush(b)
	}
	w.(http.Flusher).Flush()
	for {
		select {
		case b := <-ch:
			if !flush(b) {
				return
			}
		case <-r.Context().Done():
			return
		}
	}
}

func listKind(resource string) string { return itemKind(resource) + "List" }

func itemKind(resource string) string {
	if resource == "pods" {
		return "Pod"
	}
	return "Namespace"
}

// items lists resource (pods on node only), under mu.
func (api *fakeAPI) items(resource, node string) ([]any, string) {
	var out []any
	if resource == "pods" {
		keys := make([]string, 0, len(api.pods))
		for k := range api.pods {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			if api.pods[k].Spec.NodeName == node {
				out = append(out, api.pods[k])
			}
		}
	} else {
		for _, ns := range api.nss {
			out = append(out, ns)
		}
	}
	return out, strconv.Itoa(api.rv)
}

func event(typ string, obj any) []byte {
	b, _ := json.Marshal(map[string]any{"type": typ, "object": obj})
	return append(b, '\n')
}

// publish sends a watch event to the watchers of resource, under mu.
func (api *fakeAPI) publish(resource string, b []byte) {
	for ch := range api.watchers[resource] {
		ch <- b
	}
}

// setNamespace creates or changes a namespace.
func (api *fakeAPI) setNamespace(name string, labels map[string]string) {
	api.mu.Lock()
	defer api.mu.Unlock()
	api.rv++
	typ := "MODIFIED"
	if api.nss[name] == nil {
		typ = "ADDED"
	}
	ns := &corev1.Namespace{TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Namespace"},
		ObjectMeta: metav1.ObjectMeta{Name: name, UID: types.UID("ns-" + name), Labels: labels, ResourceVersion: strconv.Itoa(api.rv)}}
	api.nss[name] = ns
	api.publish("namespaces", event(typ, ns))
}

// setPod creates or changes a pod (running, BestEffort).
func (api *fakeAPI) setPod(ns, name, uid, node string, labels map[string]string) {
	api.mu.Lock()
	defer api.mu.Unlock()
	api.rv++
	key := ns + "/" + name
	typ := "MODIFIED"
	if api.pods[key] == nil {
		typ = "ADDED"
	}
	p := &corev1.Pod{TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID(uid), Labels: labels, ResourceVersion: strconv.Itoa(api.rv)},
		Spec:       corev1.PodSpec{NodeName: node, HostNetwork: true},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, QOSClass: corev1.PodQOSBestEffort}}
	api.pods[key] = p
	api.publish("pods", event(typ, p))
}

func (api *fakeAPI) deletePod(ns, name string) {
	api.mu.Lock()
	defer api.mu.Unlock()
	key := ns + "/" + name
	p := api.pods[key]
	if p == nil {
		return
	}
	api.rv++
	delete(api.pods, key)
	p = p.DeepCopy()
	p.ResourceVersion = strconv.Itoa(api.rv)
	api.publish("pods", event("DELETED", p))
}

// TestKubernetesLabels runs smeshd the way the DaemonSet does: [kubernetes]
// on, no [capture] cgroups, the service account's token and CA, NODE_NAME,
// and the kubelet's cgroups (cgroupfs driver: kubepods/besteffort/pod<UID>,
// the pod's container below). A pod of its node whose label says so is in
// the mesh from smeshd's start; it leaves when the label says otherwise,
// comes back through its namespace's label, and leaves when deleted; a
// connection it opened while in the mesh keeps flowing throughout. (The pod
// is on the host network: pods in namespaces of their own are served by the
// same machinery as [capture] cgroups, which the pod tests cover.)
func TestKubernetesLabels(t *testing.T) {
	a, b := newNode(t), newNode(t)
	b.capture = "[]"
	_, addrB := testenv.Link(t, a.ns, b.ns)
	server := netip.AddrPortFrom(addrB, 9000).String()
	b.server("", server)
	b.start("splice", "")

	// The kubelet's cgroups on node a.
	uid := "e2e" + hex.EncodeToString(randBytes(2)) + "-0000-4000-8000-" + hex.EncodeToString(randBytes(6))
	podCg := filepath.Join(testenv.NewCgroup(t), "kubepods", "besteffort", "pod"+uid)
	app := filepath.Join(podCg, "app")
	if err := os.MkdirAll(app, 0o755); err != nil {
		t.Fatal(err)
	}
	api := startFakeAPI(t, a.ns)
	const nodeName = "node-a"
	api.setNamespace("demo", nil)
	api.setNamespace("other", map[string]string{"smesh.dev/mesh": "enabled"})
	api.setPod("demo", "web", uid, nodeName, map[string]string{"smesh.dev/mesh": "enabled"})
	// A pod of another node in a meshed namespace, with a cgroup on this
	// one: never enrolled.
	elsewhere := "e2e" + hex.EncodeToString(randBytes(2)) + "-0000-4000-8000-" + hex.EncodeToString(randBytes(6))
	elsewhereCg := filepath.Join(filepath.Dir(podCg), "pod"+elsewhere)
	if err := os.MkdirAll(elsewhereCg, 0o755); err != nil {
		t.Fatal(err)
	}
	api.setPod("other", "db", elsewhere, "node-b", nil)

	a.capture = "[]"
	path := a.writeConfig("splice", "[kubernetes]\nenabled = true\n")
	a.smeshd = testenv.StartHelperVia(t, a.smeshCg, api.wrapper(a.ns, nodeName), "smeshd", path)
	a.waitReady()

	if !captured(a, app, server) {
		t.Fatal("a labelled pod's connection was not captured")
	}
	if captured(a, elsewhereCg, server) {
		t.Error("a pod of another node was captured")
	}
	code, body := a.admin("/debug/pods")
	var pods []kube.Pod
	if err := json.Unmarshal([]byte(body), &pods); code != 200 || err != nil || len(pods) != 1 ||
		pods[0].UID != uid || !pods[0].Enrolled || pods[0].Cgroup != podCg {
		t.Errorf("/debug/pods: %d %s (%v), want pod web enrolled in %s only", code, body, err, podCg)
	}
	long := testenv.StartHelper(t, app, a.ns.Name, "client", "paced", server, "1500")
	if line, err := long.ReadLine(5 * time.Second); err != nil || line != "connected" {
		t.Fatalf("long-lived client: %q %v %s", line, err, long.Stderr())
	}

	eventually := func(what string, want bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for captured(a, app, server) != want {
			if time.Now().After(deadline) {
				t.Fatalf("%s: captured = %v after 10s, want %v\n%s", what, !want, want, a.smeshd.Stderr())
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	api.setPod("demo", "web", uid, nodeName, map[string]string{"smesh.dev/mesh": "disabled"})
	eventually("pod label set to disabled", false)
	api.setNamespace("demo", map[string]string{"smesh.dev/mesh": "enabled"})
	time.Sleep(500 * time.Millisecond)
	eventually("namespace labelled, the pod's own label still disabled", false)
	api.setPod("demo", "web", uid, nodeName, nil)
	eventually("pod label removed in a labelled namespace", true)
	api.deletePod("demo", "web")
	eventually("pod deleted", false)

	if err := long.Wait(); err != nil {
		t.Errorf("connection opened in the mesh, across the label changes: %v\n%s", err, long.Stderr())
	}
	api.mu.Lock()
	for _, n := range api.nodes {
		if n != nodeName {
			t.Errorf("smeshd asked for the pods of node %q", n)
		}
	}
	api.mu.Unlock()
}
