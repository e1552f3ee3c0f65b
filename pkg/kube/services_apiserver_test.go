package kube

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/smesh-dev/smesh/pkg/services"
	"github.com/smesh-dev/smesh/pkg/testenv/kubecp"
)

// These tests run ServiceWatchers in the test process against a real
// kube-apiserver (dual-stack Service ranges, kubecp.ServiceCIDRs), with
// smeshd's own ServiceAccount token bound by the shipped rbac.yaml. There
// is no controller-manager: the test writes the EndpointSlices as the
// EndpointSlice controller would (the kubernetes.io/service-name label,
// one slice per address family, the resolved target ports by port name).
// What they check is exactly what a Sink receives.

type svcWorld struct {
	t     *testing.T
	cp    *kubecp.ControlPlane
	admin *kubernetes.Clientset
	sa    *rest.Config // smeshd's ServiceAccount
	api   *countingAPI // of the last watcher started
}

func newSvcWorld(t *testing.T) *svcWorld {
	t.Helper()
	cp := kubecp.Start(t)
	admin, err := kubernetes.NewForConfig(cp.Admin)
	if err != nil {
		t.Fatal(err)
	}
	wd := &svcWorld{t: t, cp: cp, admin: admin, sa: cp.Smeshd(t)}
	wd.sa.UserAgent = "smeshd"
	if _, err := admin.CoreV1().Namespaces().Create(wd.ctx(), namespace("svc", nil), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return wd
}

func (wd *svcWorld) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), settle)
	wd.t.Cleanup(cancel)
	return ctx
}

// watch runs a ServiceWatcher for realNode with smeshd's token into sink,
// through StartServices as the daemon calls it, and waits for its sync.
func (wd *svcWorld) watch(prefer string, sink services.Sink, retry time.Duration) *ServiceWatcher {
	t := wd.t
	rest, err := NewAPI(wd.sa)
	if err != nil {
		t.Fatal(err)
	}
	api := &countingAPI{API: slowSlicesAPI{rest}}
	wd.api = api
	ctx, cancel := context.WithCancel(context.Background())
	w := NewServiceWatcher(ServiceOptions{API: api, NodeName: realNode, PreferLocal: prefer, Sink: sink, Retry: retry,
		Logger: zerolog.New(zerolog.NewTestWriter(t)).With().Str("prefer", prefer).Logger()})
	go w.Run(ctx)
	t.Cleanup(func() {
		cancel()
		select {
		case <-w.done:
		case <-time.After(settle):
			t.Error("the service watcher did not stop")
		}
	})
	sctx, scancel := context.WithTimeout(ctx, settle)
	defer scancel()
	if err := w.WaitSynced(sctx); err != nil {
		t.Fatal(err)
	}
	return w
}

func (wd *svcWorld) service(s *corev1.Service) *corev1.Service {
	wd.t.Helper()
	s.Namespace = "svc"
	got, err := wd.admin.CoreV1().Services("svc").Create(wd.ctx(), s, metav1.CreateOptions{})
	if err != nil {
		wd.t.Fatalf("creating service %s: %v", s.Name, err)
	}
	return got
}

func (wd *svcWorld) slice(s *discoveryv1.EndpointSlice) {
	wd.t.Helper()
	s.Namespace = "svc"
	c := wd.admin.DiscoveryV1().EndpointSlices("svc")
	cur, err := c.Get(wd.ctx(), s.Name, metav1.GetOptions{})
	if err == nil {
		s.ResourceVersion = cur.ResourceVersion
		_, err = c.Update(wd.ctx(), s, metav1.UpdateOptions{})
	} else {
		_, err = c.Create(wd.ctx(), s, metav1.CreateOptions{})
	}
	if err != nil {
		wd.t.Fatalf("writing endpointslice %s: %v", s.Name, err)
	}
}

func (wd *svcWorld) deleteSlice(name string) {
	wd.t.Helper()
	if err := wd.admin.DiscoveryV1().EndpointSlices("svc").Delete(wd.ctx(), name, metav1.DeleteOptions{}); err != nil {
		wd.t.Fatal(err)
	}
}

func (wd *svcWorld) deleteService(name string) {
	wd.t.Helper()
	if err := wd.admin.CoreV1().Services("svc").Delete(wd.ctx(), name, metav1.DeleteOptions{}); err != nil {
		wd.t.Fatal(err)
	}
}

// expect waits, at most settle, until sink holds want (describeSet lines).
func expectSink(t *testing.T, sink *recordingSink, why string, want ...string) time.Duration {
	t.Helper()
	w := strings.Join(sorted(want), "\n")
	start := time.Now()
	for {
		got := describeSet(sink.set())
		if got == w {
			return time.Since(start)
		}
		if time.Since(start) > settle {
			t.Fatalf("%s: after %s the sink holds\n%s\nwant\n%s", why, settle, got, w)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// ips are a Service's ClusterIPs, IPv4 first.
func ips(s *corev1.Service) (v4, v6 string) {
	for _, ip := range s.Spec.ClusterIPs {
		if netip.MustParseAddr(ip).Is4() {
			v4 = ip
		} else {
			v6 = "[" + ip + "]"
		}
	}
	return v4, v6
}

// TestServicesOnAPIServer: Services of every kind and their EndpointSlices
// as the controller writes them, through a life cycle (readiness, a second
// slice, scale to zero, slice and Service deleted, an API server restart),
// each step checked against exactly what the Sink holds and was called
// with.
func TestServicesOnAPIServer(t *testing.T) {
	wd := newSvcWorld(t)
	dual := corev1.IPFamilyPolicyRequireDualStack
	web := wd.service(&corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{
			IPFamilyPolicy: &dual,
			Selector:       map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{
				// A named targetPort: each pod says which port it is.
				{Name: "http", Port: 80, TargetPort: intstr.FromString("http"), Protocol: corev1.ProtocolTCP},
				{Name: "grpc", Port: 81, TargetPort: intstr.FromInt32(9090), Protocol: corev1.ProtocolTCP},
				{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP},
			},
		},
	})
	if len(web.Spec.ClusterIPs) != 2 {
		t.Fatalf("web has ClusterIPs %v: the API server is not dual-stack (kubecp.ServiceCIDRs)", web.Spec.ClusterIPs)
	}
	wd.service(&corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "headless"},
		Spec: corev1.ServiceSpec{ClusterIP: "None", Selector: map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80}}},
	})
	wd.service(&corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "external"},
		Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "example.com"},
	})
	timeout := int32(60)
	local := wd.service(&corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "local"},
		Spec: corev1.ServiceSpec{
			Selector:              map[string]string{"app": "local"},
			Ports:                 []corev1.ServicePort{{Port: 7000, TargetPort: intstr.FromInt32(7001)}},
			InternalTrafficPolicy: ptr(corev1.ServiceInternalTrafficPolicyLocal),
			SessionAffinity:       corev1.ServiceAffinityClientIP,
			SessionAffinityConfig: &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: &timeout}},
		},
	})
	webPorts := []discoveryv1.EndpointPort{slicePort("http", 8080), slicePort("grpc", 9090),
		{Name: ptr("dns"), Port: ptr(int32(53)), Protocol: ptr(corev1.ProtocolUDP)}}
	wd.slice(endpointSlice("svc", "web-v4", "web", discoveryv1.AddressTypeIPv4, webPorts,
		ep("198.18.1.10", realNode, "rs"), ep("198.18.2.10", otherNode, "rs"), ep("198.18.2.11", otherNode, "st")))
	wd.slice(endpointSlice("svc", "web-v6", "web", discoveryv1.AddressTypeIPv6, webPorts, ep("fd00:5e:2::10", otherNode, "")))
	wd.slice(endpointSlice("svc", "headless-v4", "headless", discoveryv1.AddressTypeIPv4,
		[]discoveryv1.EndpointPort{slicePort("http", 8080)}, ep("198.18.1.10", realNode, "rs")))
	wd.slice(endpointSlice("svc", "local-v4", "local", discoveryv1.AddressTypeIPv4,
		[]discoveryv1.EndpointPort{slicePort("", 7001)}, ep("198.18.1.20", realNode, "rs"), ep("198.18.2.20", otherNode, "rs")))

	sink := newSvcSink()
	wd.watch(PreferClose, sink, 0)
	w4, w6 := ips(web)
	l4, _ := ips(local)
	webLine := func(vip string, port int, name, backends string) string {
		return fmt.Sprintf("%s:%d svc/web:%s affinity=0s localOnly=false preferLocal=false [%s]", vip, port, name, backends)
	}
	webV4 := func(p int) string {
		return fmt.Sprintf("198.18.1.10:%d@node-a/Lrs 198.18.2.10:%d@node-b/rs 198.18.2.11:%d@node-b/st", p, p, p)
	}
	localLine := l4 + ":7000 svc/local:7000 affinity=1m0s localOnly=true preferLocal=false [198.18.1.20:7001@node-a/Lrs 198.18.2.20:7001@node-b/rs]"
	all := []string{
		webLine(w4, 80, "http", webV4(8080)),
		webLine(w4, 81, "grpc", webV4(9090)),
		webLine(w6, 80, "http", "[fd00:5e:2::10]:8080@node-b/rs"),
		webLine(w6, 81, "grpc", "[fd00:5e:2::10]:9090@node-b/rs"),
		localLine,
	}
	// Synced means given: no wait.
	if got, want := describeSet(sink.set()), strings.Join(sorted(all), "\n"); got != want {
		t.Fatalf("at WaitSynced the sink holds\n%s\nwant\n%s", got, want)
	}
	if calls := sink.take(); len(calls) != len(all) {
		t.Errorf("sync: %d sink calls %q, want one update per key", len(calls), calls)
	}

	// Nothing ready: the draining backend is what Usable keeps.
	wd.slice(endpointSlice("svc", "web-v4", "web", discoveryv1.AddressTypeIPv4, webPorts,
		ep("198.18.1.10", realNode, "s"), ep("198.18.2.10", otherNode, ""), ep("198.18.2.11", otherNode, "st")))
	// "" conditions from the test's helper are nil: ready.
	notReady := func(p int) string {
		return fmt.Sprintf("198.18.1.10:%d@node-a/Ls 198.18.2.10:%d@node-b/rs 198.18.2.11:%d@node-b/st", p, p, p)
	}
	all[0], all[1] = webLine(w4, 80, "http", notReady(8080)), webLine(w4, 81, "grpc", notReady(9090))
	expectSink(t, sink, "conditions changed", all...)
	wd.slice(endpointSlice("svc", "web-v4", "web", discoveryv1.AddressTypeIPv4, webPorts,
		ep("198.18.1.10", realNode, "s"), ep("198.18.2.10", otherNode, "t"), ep("198.18.2.11", otherNode, "st")))
	drain := func(p int) string {
		return fmt.Sprintf("198.18.1.10:%d@node-a/Ls 198.18.2.10:%d@node-b/t 198.18.2.11:%d@node-b/st", p, p, p)
	}
	all[0], all[1] = webLine(w4, 80, "http", drain(8080)), webLine(w4, 81, "grpc", drain(9090))
	expectSink(t, sink, "nothing ready", all...)
	for _, s := range sink.set() {
		if s.Name == "svc/web:http" && s.VIP.Is4() {
			if u := s.Usable(); len(u) != 1 || u[0].Addr != netip.MustParseAddrPort("198.18.2.11:8080") {
				t.Errorf("usable with nothing ready: %v, want the serving terminating backend", u)
			}
		}
	}
	twice := []string{"update " + w4 + ":80", "update " + w4 + ":81", "update " + w4 + ":80", "update " + w4 + ":81"}
	if calls := sink.take(); !slices.Equal(sorted(calls), sorted(twice)) {
		t.Errorf("two slice updates: sink calls %q, want the IPv4 keys updated twice, nothing else", calls)
	}

	// A second slice of web (the controller splits past 100 endpoints).
	wd.slice(endpointSlice("svc", "web-v4-2", "web", discoveryv1.AddressTypeIPv4, webPorts, ep("198.18.1.11", realNode, "rs")))
	all[0] = webLine(w4, 80, "http", "198.18.1.10:8080@node-a/Ls 198.18.1.11:8080@node-a/Lrs 198.18.2.10:8080@node-b/t 198.18.2.11:8080@node-b/st")
	all[1] = webLine(w4, 81, "grpc", "198.18.1.10:9090@node-a/Ls 198.18.1.11:9090@node-a/Lrs 198.18.2.10:9090@node-b/t 198.18.2.11:9090@node-b/st")
	expectSink(t, sink, "a second slice", all...)

	// Scale to zero: the controller leaves an empty slice.
	wd.slice(endpointSlice("svc", "web-v4", "web", discoveryv1.AddressTypeIPv4, webPorts))
	wd.deleteSlice("web-v4-2")
	all[0], all[1] = webLine(w4, 80, "http", ""), webLine(w4, 81, "grpc", "")
	expectSink(t, sink, "scaled to zero", all...)
	// The IPv6 slice deleted: its keys stay, with no backends.
	wd.deleteSlice("web-v6")
	all[2], all[3] = webLine(w6, 80, "http", ""), webLine(w6, 81, "grpc", "")
	expectSink(t, sink, "slice deleted", all...)
	sink.take()

	// The API server restarts: the relist changes nothing, so the Sink
	// hears nothing, no delete above all; then a change still arrives.
	listsBefore, _, _ := wd.api.snapshot()
	wd.cp.RestartAPIServer(t, nil)
	// The watches end with the old server; the restarted one's watch
	// cache starts at etcd's current revision, past the Services'
	// resourceVersion (the last writes were slices): "410 Gone", and the
	// Services are listed again (the slices' watch may resume), before the
	// change below is written.
	for deadline := time.Now().Add(settle); ; time.Sleep(5 * time.Millisecond) {
		lists, _, _ := wd.api.snapshot()
		if lists["services"] > listsBefore["services"] {
			t.Logf("lists before the restart %v, after %v; errors the watcher got: %q", listsBefore, lists, wd.api.errors())
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no relist after the API server's restart: lists %v before, %v after; errors %q", listsBefore, lists, wd.api.errors())
		}
	}
	wd.slice(endpointSlice("svc", "local-v4", "local", discoveryv1.AddressTypeIPv4,
		[]discoveryv1.EndpointPort{slicePort("", 7001)}, ep("198.18.1.20", realNode, "rs")))
	all[4] = l4 + ":7000 svc/local:7000 affinity=1m0s localOnly=true preferLocal=false [198.18.1.20:7001@node-a/Lrs]"
	took := expectSink(t, sink, "after an API server restart", all...)
	t.Logf("a change after the API server's restart reached the sink %s after the write returned", took.Round(time.Millisecond))
	if calls := sink.take(); !slices.Equal(calls, []string{"update " + l4 + ":7000"}) {
		t.Errorf("across the API server restart: sink calls %q, want the one update", calls)
	}

	// web deleted: its four keys go.
	wd.deleteService("web")
	expectSink(t, sink, "service deleted", all[4])
	want := []string{"delete " + w4 + ":80", "delete " + w4 + ":81", "delete " + w6 + ":80", "delete " + w6 + ":81"}
	if calls := sink.take(); !slices.Equal(sorted(calls), sorted(want)) {
		t.Errorf("service deleted: sink calls %q, want %q", calls, want)
	}
}

// slowSlicesAPI delays the first answer of every EndpointSlice list or
// watch: the Services are then listed well before their slices, and a
// watcher that gave the Sink a Service before its slices were listed would
// be seen at WaitSynced with backends missing.
type slowSlicesAPI struct{ API }

const slowSlices = 300 * time.Millisecond

func (s slowSlicesAPI) List(ctx context.Context, resource string, opts metav1.ListOptions) (runtime.Object, error) {
	if resource == "endpointslices" {
		time.Sleep(slowSlices)
	}
	return s.API.List(ctx, resource, opts)
}

func (s slowSlicesAPI) Watch(ctx context.Context, resource string, opts metav1.ListOptions) (watch.Interface, error) {
	if resource == "endpointslices" {
		time.Sleep(slowSlices)
	}
	return s.API.Watch(ctx, resource, opts)
}

// newSvcSink records the test's namespace only.
func newSvcSink() *recordingSink {
	s := newRecordingSink()
	s.ns = "svc"
	return s
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

// TestServicesPreferLocal: which Services get PreferLocal, for each value
// of prefer_local_backends, three watchers side by side.
func TestServicesPreferLocal(t *testing.T) {
	wd := newSvcWorld(t)
	mk := func(name string, f func(*corev1.Service)) string {
		s := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}}}
		f(s)
		return wd.service(s).Spec.ClusterIP
	}
	vips := map[string]string{
		"plain": mk("plain", func(*corev1.Service) {}),
		"close": mk("close", func(s *corev1.Service) {
			s.Spec.TrafficDistribution = ptr(corev1.ServiceTrafficDistributionPreferClose)
		}),
		"same-node": mk("same-node", func(s *corev1.Service) {
			s.Spec.TrafficDistribution = ptr(corev1.ServiceTrafficDistributionPreferSameNode)
		}),
		"topology": mk("topology", func(s *corev1.Service) { s.Annotations = map[string]string{topologyModeAnnotation: "Auto"} }),
		"hints":    mk("hints", func(*corev1.Service) {}),
	}
	hinted := endpointSlice("svc", "hints-a", "hints", discoveryv1.AddressTypeIPv4, []discoveryv1.EndpointPort{slicePort("", 80)}, ep("198.18.1.1", realNode, "rs"))
	hinted.Endpoints[0].Zone = ptr("z1")
	hinted.Endpoints[0].Hints = &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: "z1"}}}
	wd.slice(hinted)
	asks := map[string]bool{"close": true, "same-node": true, "topology": true, "hints": true}
	for _, prefer := range []string{PreferClose, PreferAlways, PreferNever} {
		sink := newSvcSink()
		wd.watch(prefer, sink, 0)
		got := map[string]bool{}
		for _, s := range sink.set() {
			got[strings.TrimSuffix(strings.TrimPrefix(s.Name, "svc/"), ":80")] = s.PreferLocal
		}
		for name := range vips {
			want := prefer == PreferAlways || (prefer == PreferClose && asks[name])
			if v, ok := got[name]; !ok || v != want {
				t.Errorf("prefer_local_backends = %q: %s has PreferLocal %t (given: %t), want %t", prefer, name, v, ok, want)
			}
		}
	}
}

// TestServicesSinkRetry: a Sink that refuses one Service is asked again
// until it takes it, and the other Services are served meanwhile.
func TestServicesSinkRetry(t *testing.T) {
	wd := newSvcWorld(t)
	a := wd.service(&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "a"}, Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}}})
	b := wd.service(&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "b"}, Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}}})
	bad := netip.MustParseAddr(a.Spec.ClusterIP)
	refusing := make(chan bool, 1)
	refusing <- true
	sink := newSvcSink()
	sink.fail = func(_ string, k services.Key) bool {
		r := <-refusing
		refusing <- r
		return r && k.VIP == bad
	}
	wd.watch(PreferClose, sink, 50*time.Millisecond)
	line := func(s *corev1.Service) string {
		return fmt.Sprintf("%s:80 svc/%s:80 affinity=0s localOnly=false preferLocal=false []", s.Spec.ClusterIP, s.Name)
	}
	expectSink(t, sink, "b served while a is refused", line(b))
	time.Sleep(200 * time.Millisecond)
	failures := 0
	for _, c := range sink.take() {
		if strings.HasSuffix(c, "failed") {
			failures++
		}
	}
	if failures < 2 {
		t.Errorf("a refused update was tried %d times in 200ms, want retries every 50ms", failures)
	}
	<-refusing
	refusing <- false
	expectSink(t, sink, "a taken once the sink accepts", line(a), line(b))
}
