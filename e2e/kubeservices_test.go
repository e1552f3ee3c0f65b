package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// debugService is one entry of smeshd's /debug/services, as the test reads
// it.
type debugService struct {
	Name        string     `json:"name"`
	VIP         netip.Addr `json:"vip"`
	Port        uint16     `json:"port"`
	LocalOnly   bool       `json:"local_only"`
	PreferLocal bool       `json:"prefer_local"`
	// AffinityTimeout is "" without session affinity.
	AffinityTimeout string `json:"session_affinity_timeout"`
	Backends        []struct {
		Addr   netip.AddrPort `json:"addr"`
		Local  bool           `json:"local"`
		Usable bool           `json:"usable"`
	} `json:"backends"`
}

// usable lists the backends connect4 may choose now.
func (s debugService) usable() []netip.AddrPort {
	var out []netip.AddrPort
	for _, b := range s.Backends {
		if b.Usable {
			out = append(out, b.Addr)
		}
	}
	return out
}

// debugServices reads node n's /debug/services, by VIP:port.
func debugServicesOf(n *node) map[netip.AddrPort]debugService {
	n.t.Helper()
	code, body := n.admin("/debug/services")
	var list []debugService
	if err := json.Unmarshal([]byte(body), &list); code != 200 || err != nil {
		n.t.Fatalf("/debug/services: %d %s (%v)", code, body, err)
	}
	out := map[netip.AddrPort]debugService{}
	for _, s := range list {
		out[netip.AddrPortFrom(s.VIP, s.Port)] = s
	}
	return out
}

// waitService waits until node n's data path holds vip with what ok
// accepts, and fails the test after 10 s.
func waitService(n *node, vip netip.AddrPort, what string, ok func(debugService, bool) bool) {
	n.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, held := debugServicesOf(n)[vip]
		if ok(s, held) {
			return
		}
		if time.Now().After(deadline) {
			n.t.Fatalf("%s: node's /debug/services after 10 s holds %s as %+v (held %v)\n%s", what, vip, s, held, n.smeshd.Stderr())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// backendSet is an EndpointSlice's endpoints as the endpointslice
// controller writes them: one per pod, its address of the slice's family,
// its node, its conditions.
type endpointState struct {
	pod                         *kubePod
	ready, serving, terminating bool
}

func endpointSlice(ns, service, name string, family discoveryv1.AddressType, port int32, eps []endpointState) *discoveryv1.EndpointSlice {
	sl := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: service}},
		AddressType: family,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(port), Protocol: ptr(corev1.ProtocolTCP)}},
		Endpoints:   []discoveryv1.Endpoint{},
	}
	for _, e := range eps {
		addr := e.pod.Addr4
		if family == discoveryv1.AddressTypeIPv6 {
			addr = e.pod.Addr6
		}
		sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{addr.String()},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr(e.ready), Serving: ptr(e.serving), Terminating: ptr(e.terminating)},
			NodeName:   ptr(e.pod.obj.Spec.NodeName),
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: e.pod.obj.Name, UID: e.pod.obj.UID},
		})
	}
	return sl
}

func ptr[T any](v T) *T { return &v }

// ready is an endpoint as a running pod's.
func ready(p *kubePod) endpointState { return endpointState{pod: p, ready: true, serving: true} }

// spreadFrom runs the "spread" client in pod p: n connections to addr, and
// the backends that served them, by the address each answered with.
func spreadFrom(t *testing.T, n *node, p *kubePod, addr string, count int) map[netip.AddrPort]int {
	t.Helper()
	out := (&podNode{node: n}).podClient(p.container(), "spread", addr, fmt.Sprint(count))
	line, _, _ := strings.Cut(out, "\n")
	var raw map[string]int
	if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "spread ")), &raw); err != nil {
		t.Fatalf("spread: %q: %v", out, err)
	}
	got := map[netip.AddrPort]int{}
	total := 0
	for a, c := range raw {
		ap := netip.MustParseAddrPort(a)
		got[netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())] += c
		total += c
	}
	if total != count {
		t.Fatalf("spread: %d connections answered, want %d", total, count)
	}
	return got
}

// TestKubernetesServices: Services of a real API server in the mesh. A
// dual-stack ClusterIP Service with a named targetPort and three backends,
// one on the client's node and two on the other, its EndpointSlices written
// as the endpointslice controller writes them (the test control plane has
// none). From a pod in the mesh, connections to the ClusterIP reach every
// backend (300 connections spread within bounds no fair choice misses),
// getpeername shows the ClusterIP, every byte comes back; the local backend
// is spliced and the remote ones tunnelled, counted exactly; the IPv6
// ClusterIP alike. trafficDistribution: PreferClose keeps the client on the
// local backend (spliced); sessionAffinity: ClientIP on one backend. A rolling replacement of a backend (the new pod
// ready, the old one terminating, killed, removed) under 200 connections a
// second fails none. Scale to zero refuses at once (ECONNREFUSED), as does
// internalTrafficPolicy: Local without a local backend. A headless Service
// is not translated and its pods are reached as before; a pod outside the
// mesh is left to kube-proxy (its DNAT rule, written with nft as kube-proxy's
// nftables mode does, takes it to a backend).
func TestKubernetesServices(t *testing.T) {
	testenv.RequirePrivileged(t)
	nft := testenv.RequireCommand(t, "nft") // kube-proxy's rule for a pod outside the mesh
	kc := startKubeCluster(t)
	c := testenv.NewCluster()
	cnA, cnB := c.AddNode(t), c.AddNode(t)
	testenv.JoinNodes(t, cnA, cnB)
	a, b := nodeOn(t, cnA.Node), nodeOn(t, cnB.Node)
	k := &kubelet{t: t, api: kc.admin, nodes: map[string]*kubeNode{}}
	ka, kb := k.addNode("node-a", cnA), k.addNode("node-b", cnB)
	const ns, plain = "shop", "outside"
	kc.namespace(t, ns, map[string]string{"smesh.dev/mesh": "enabled"})
	kc.namespace(t, plain, nil)
	app := map[string]string{"app": "web"}

	client := k.create(podSpec(ns, "client", "node-a", nil, corev1.PodQOSBestEffort))
	outsider := k.create(podSpec(plain, "outsider", "node-a", nil, corev1.PodQOSBestEffort))
	webA := k.create(podSpec(ns, "web-a", "node-a", app, corev1.PodQOSBestEffort))
	webB1 := k.create(podSpec(ns, "web-b1", "node-b", app, corev1.PodQOSBestEffort))
	webB2 := k.create(podSpec(ns, "web-b2", "node-b", app, corev1.PodQOSBestEffort))
	const target = 8080
	serve := func(p *kubePod) {
		podServerAt(t, p.container(), netip.AddrPortFrom(p.Addr4, target).String())
		podServerAt(t, p.container(), netip.AddrPortFrom(p.Addr6, target).String())
	}
	for _, p := range []*kubePod{webA, webB1, webB2} {
		serve(p)
	}
	at := func(p *kubePod) netip.AddrPort { return netip.AddrPortFrom(p.Addr4, target) }
	at6 := func(p *kubePod) netip.AddrPort { return netip.AddrPortFrom(p.Addr6, target) }

	ctx := context.Background()
	svc, err := kc.admin.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{
			Selector:       app,
			IPFamilyPolicy: ptr(corev1.IPFamilyPolicyRequireDualStack),
			IPFamilies:     []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol},
			Ports:          []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("web"), Protocol: corev1.ProtocolTCP}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(svc.Spec.ClusterIPs) != 2 {
		t.Fatalf("the API server gave Service web the ClusterIPs %v, want one of each family", svc.Spec.ClusterIPs)
	}
	vip := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIPs[0]), 80)
	vip6 := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIPs[1]), 80)
	slices := kc.admin.DiscoveryV1().EndpointSlices(ns)
	all := []endpointState{ready(webA), ready(webB1), ready(webB2)}
	v4, err := slices.Create(ctx, endpointSlice(ns, "web", "web-v4", discoveryv1.AddressTypeIPv4, target, all), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := slices.Create(ctx, endpointSlice(ns, "web", "web-v6", discoveryv1.AddressTypeIPv6, target, all), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	setV4 := func(eps []endpointState) {
		t.Helper()
		next := endpointSlice(ns, "web", "web-v4", discoveryv1.AddressTypeIPv4, target, eps)
		next.ResourceVersion = v4.ResourceVersion
		if v4, err = slices.Update(ctx, next, metav1.UpdateOptions{}); err != nil {
			t.Fatalf("updating EndpointSlice web-v4: %v", err)
		}
	}

	kc.startSmeshd(b, "node-b", kb)
	kc.startSmeshd(a, "node-a", ka)
	b.waitServed(webB1.Name, webB2.Name)
	a.waitServed(client.Name, webA.Name)
	waitService(a, vip, "Service web", func(s debugService, held bool) bool { return held && len(s.usable()) == 3 })
	if s := debugServicesOf(a)[vip]; s.Name != ns+"/web:http" || s.PreferLocal || s.LocalOnly {
		t.Errorf("node a's /debug/services: %+v, want %s/web:http, no local preference", s, ns)
	}

	// Spread, getpeername and bytes (the spread client checks each
	// connection's peer and echo), local spliced and remote tunnelled.
	count := func(result string) float64 { return serviceCount(t, a, result) }
	local0, tunnel0 := count("local_splice"), count("tunnel")
	got := spreadFrom(t, a, client, vip.String(), 300)
	t.Logf("300 connections to %s: %v", vip, got)
	for _, p := range []*kubePod{webA, webB1, webB2} {
		// Fair: 100 each, sd 8.2; [50, 150] is six of them.
		if n := got[at(p)]; n < 50 || n > 150 {
			t.Errorf("backend %s (%s) served %d of 300 connections, want 50 to 150", p.obj.Name, at(p), n)
		}
	}
	if len(got) != 3 {
		t.Errorf("connections were served by %v, want the three backends only", got)
	}
	if d := count("local_splice") - local0; d != float64(got[at(webA)]) {
		t.Errorf("local_splice counted %v, the local backend served %d", d, got[at(webA)])
	}
	if d := count("tunnel") - tunnel0; d != float64(got[at(webB1)]+got[at(webB2)]) {
		t.Errorf("tunnel counted %v, the backends of node b served %d", d, got[at(webB1)]+got[at(webB2)])
	}
	pa := &podNode{node: a}
	pa.podClient(client.container(), "echo", vip.String(), fmt.Sprint(4<<20))
	pa.podClient(client.container(), "oneway", vip.String(), fmt.Sprint(4<<20))

	got6 := spreadFrom(t, a, client, vip6.String(), 60)
	for a := range got6 {
		if a != at6(webA) && a != at6(webB1) && a != at6(webB2) {
			t.Errorf("IPv6 ClusterIP: a connection was served by %s, not a backend", a)
		}
	}
	if len(got6) < 2 {
		t.Errorf("60 connections to the IPv6 ClusterIP went to %v only", got6)
	}

	// PreferClose: the local backend whenever there is one, spliced.
	patch := func(name, p string) {
		t.Helper()
		if _, err := kc.admin.CoreV1().Services(ns).Patch(ctx, name, types.MergePatchType, []byte(p), metav1.PatchOptions{}); err != nil {
			t.Fatalf("patching Service %s with %s: %v", name, p, err)
		}
	}
	patch("web", `{"spec":{"trafficDistribution":"PreferClose"}}`)
	waitService(a, vip, "trafficDistribution PreferClose", func(s debugService, _ bool) bool { return s.PreferLocal })
	if got := spreadFrom(t, a, client, vip.String(), 50); got[at(webA)] != 50 {
		t.Errorf("PreferClose: 50 connections went to %v, want all to the local backend %s", got, at(webA))
	}
	before := a.stats()
	pa.podClient(client.container(), "oneway", vip.String(), fmt.Sprint(8<<20))
	checkSpliced(t, "sk_msg, client to its local backend through the ClusterIP", before, a.stats(), 8<<20, true)
	patch("web", `{"spec":{"trafficDistribution":null}}`)
	waitService(a, vip, "trafficDistribution removed", func(s debugService, _ bool) bool { return !s.PreferLocal })

	// sessionAffinity: ClientIP keeps the client (its pod) on one backend;
	// without it the choice spreads again.
	patch("web", `{"spec":{"sessionAffinity":"ClientIP","sessionAffinityConfig":{"clientIP":{"timeoutSeconds":600}}}}`)
	waitService(a, vip, "sessionAffinity ClientIP", func(s debugService, _ bool) bool { return s.AffinityTimeout == "10m0s" })
	if got := spreadFrom(t, a, client, vip.String(), 30); len(got) != 1 {
		t.Errorf("sessionAffinity ClientIP: 30 connections of one pod went to %v, want one backend", got)
	}
	patch("web", `{"spec":{"sessionAffinity":"None","sessionAffinityConfig":null}}`)
	waitService(a, vip, "sessionAffinity None", func(s debugService, _ bool) bool { return s.AffinityTimeout == "" })
	if got := spreadFrom(t, a, client, vip.String(), 30); len(got) < 2 {
		t.Errorf("sessionAffinity removed: 30 connections went to %v, want them spread", got)
	}

	// A rolling replacement of web-b1 by web-b3 under steady load.
	steady := testenv.StartHelper(t, client.app, client.Name, "client", "steady", vip.String(), "8")
	time.Sleep(time.Second)
	webB3 := k.create(podSpec(ns, "web-b3", "node-b", app, corev1.PodQOSBestEffort))
	serve(webB3)
	b.waitServed(webB3.Name)
	setV4([]endpointState{ready(webA), ready(webB1), ready(webB2), ready(webB3)})
	time.Sleep(time.Second)
	setV4([]endpointState{ready(webA), {pod: webB1, serving: true, terminating: true}, ready(webB2), ready(webB3)})
	// The pod's grace period: long enough for every node to see it
	// terminating (the watcher's p99 is milliseconds).
	time.Sleep(time.Second)
	k.delete(webB1)
	setV4([]endpointState{ready(webA), ready(webB2), ready(webB3)})
	if err := steady.Wait(); err != nil {
		t.Errorf("connections during the rolling update: %v\n%s%s", err, steady.Stdout(), steady.Stderr())
	}
	t.Logf("during the rolling update: %s", strings.TrimSpace(steady.Stdout()))
	if !strings.Contains(steady.Stdout(), at(webB3).String()) {
		t.Errorf("the new backend %s served none of the connections during the update: %s", at(webB3), steady.Stdout())
	}

	// A headless Service: nothing to translate; its pods are reached by
	// their own addresses (DNS gives those), captured as before.
	if _, err := kc.admin.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web-headless"},
		Spec: corev1.ServiceSpec{ClusterIP: corev1.ClusterIPNone, Selector: app,
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(target)}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := slices.Create(ctx, endpointSlice(ns, "web-headless", "web-headless-v4", discoveryv1.AddressTypeIPv4, target,
		[]endpointState{ready(webB2)}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if !kubeCaptured(a, client, at(webB2).String()) {
		t.Error("a connection to a pod of the headless Service's was not captured")
	}
	if got := spreadFrom(t, a, client, at(webB2).String(), 5); got[at(webB2)] != 5 {
		t.Errorf("5 connections to the pod %s itself were served by %v", at(webB2), got)
	}
	for _, s := range debugServicesOf(a) {
		if strings.HasPrefix(s.Name, ns+"/web-headless") {
			t.Errorf("the headless Service is in the data path: %+v", s)
		}
	}

	// A pod outside the mesh: smesh leaves its connection alone, and
	// kube-proxy's rule takes it to a backend.
	rules := fmt.Sprintf("table ip smesh_test_kube_proxy {\n chain out {\n  type nat hook output priority -100;\n"+
		"  ip daddr %s tcp dport 80 dnat to %s\n }\n}\n", vip.Addr(), at(webB2))
	cmd := exec.Command("ip", "netns", "exec", outsider.Name, nft, "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft in pod outsider: %v: %s", err, out)
	}
	out0 := count("local_splice") + count("tunnel") + count("direct")
	if got := spreadFrom(t, a, outsider, vip.String(), 5); got[at(webB2)] != 5 {
		t.Errorf("pod outside the mesh: 5 connections through kube-proxy's rule were served by %v, want %s", got, at(webB2))
	}
	if d := count("local_splice") + count("tunnel") + count("direct") - out0; d != 0 {
		t.Errorf("smesh translated %v connections of a pod outside the mesh", d)
	}

	// internalTrafficPolicy: Local, and node a has no backend.
	remote, err := kc.admin.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "remote"},
		Spec: corev1.ServiceSpec{InternalTrafficPolicy: ptr(corev1.ServiceInternalTrafficPolicyLocal),
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(target)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := slices.Create(ctx, endpointSlice(ns, "remote", "remote-v4", discoveryv1.AddressTypeIPv4, target,
		[]endpointState{ready(webB2)}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	rvip := netip.AddrPortFrom(netip.MustParseAddr(remote.Spec.ClusterIP), 80)
	waitService(a, rvip, "Service remote", func(s debugService, held bool) bool { return held && s.LocalOnly && len(s.Backends) == 1 })
	refused0 := count("no_backend")
	pa.podClient(client.container(), "refused", rvip.String())

	// Scale to zero: refused at once.
	setV4(nil)
	waitService(a, vip, "scaled to zero", func(s debugService, _ bool) bool { return len(s.usable()) == 0 })
	start := time.Now()
	pa.podClient(client.container(), "refused", vip.String())
	if d := count("no_backend") - refused0; d != 2 {
		t.Errorf("no_backend counted %v, want the 2 refused connections", d)
	}
	t.Logf("refused in %v (the client process included)", time.Since(start))
}
