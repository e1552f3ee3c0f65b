package kube

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/smesh-dev/smesh/pkg/services"
)

func ptr[T any](v T) *T { return &v }

// svcPort is a Service port: "name/port/proto" reads better in tables.
func svcPort(name string, port int32, proto corev1.Protocol) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Port: port, Protocol: proto}
}

func clusterIPService(ns, name string, ips []string, ports ...corev1.ServicePort) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeClusterIP, ClusterIP: ips[0], ClusterIPs: ips, Ports: ports,
			SessionAffinity: corev1.ServiceAffinityNone,
		},
	}
}

// ep is an endpoint: address, node, and conditions as "r", "s", "t"
// letters (ready, serving, terminating; absent: false), or "" for none
// given (nil conditions).
func ep(addr, node, conds string) discoveryv1.Endpoint {
	e := discoveryv1.Endpoint{Addresses: []string{addr}}
	if node != "" {
		e.NodeName = ptr(node)
	}
	if conds != "" {
		e.Conditions = discoveryv1.EndpointConditions{
			Ready:       ptr(strings.Contains(conds, "r")),
			Serving:     ptr(strings.Contains(conds, "s")),
			Terminating: ptr(strings.Contains(conds, "t")),
		}
	}
	return e
}

func slicePort(name string, port int32) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: ptr(name), Port: ptr(port), Protocol: ptr(corev1.ProtocolTCP)}
}

func endpointSlice(ns, name, svc string, family discoveryv1.AddressType, ports []discoveryv1.EndpointPort, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: family,
		Ports:       ports,
		Endpoints:   eps,
	}
}

func backend(addr, node string, local, ready, serving, terminating bool) services.Backend {
	return services.Backend{Addr: netip.MustParseAddrPort(addr), Node: node, Local: local,
		Ready: ready, Serving: serving, Terminating: terminating}
}

// describeSet is a Service set in comparable text, one line per key.
func describeSet(set []services.Service) string {
	var lines []string
	for _, s := range set {
		var bs []string
		for _, b := range s.Backends {
			f := ""
			for _, c := range []struct {
				on bool
				l  string
			}{{b.Local, "L"}, {b.Ready, "r"}, {b.Serving, "s"}, {b.Terminating, "t"}} {
				if c.on {
					f += c.l
				}
			}
			bs = append(bs, b.Addr.String()+"@"+b.Node+"/"+f)
		}
		lines = append(lines, fmt.Sprintf("%s %s affinity=%s localOnly=%t preferLocal=%t [%s]",
			s.Key, s.Name, s.AffinityTimeout, s.LocalOnly, s.PreferLocal, strings.Join(bs, " ")))
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

func TestServiceSet(t *testing.T) {
	web := clusterIPService("ns", "web", []string{"198.19.255.10", "fd00:5e:ffff::10"},
		svcPort("http", 80, corev1.ProtocolTCP), svcPort("dns", 53, corev1.ProtocolUDP), svcPort("metrics", 9000, corev1.ProtocolTCP))
	ports := []discoveryv1.EndpointPort{slicePort("http", 8080), slicePort("metrics", 9090)}
	v4 := endpointSlice("ns", "web-a", "web", discoveryv1.AddressTypeIPv4, ports,
		ep("198.18.1.1", node, ""),       // no conditions: ready
		ep("198.18.2.1", "node-2", "rs"), // ready on another node
		ep("198.18.2.2", "node-2", "st"), // draining
		ep("198.18.2.3", "node-2", "t"),  // terminating, not serving
		ep("198.18.2.4", "", "rs"))       // no node
	v6 := endpointSlice("ns", "web-b", "web", discoveryv1.AddressTypeIPv6, ports, ep("fd00:5e:1::1", node, "rs"))
	// The same endpoint in a second slice, as the controller moves it:
	// taken once, ready.
	moved := endpointSlice("ns", "web-c", "web", discoveryv1.AddressTypeIPv4, ports, ep("198.18.2.1", "node-2", "st"))
	// A slice without the port's name gives it no backends.
	other := endpointSlice("ns", "web-d", "web", discoveryv1.AddressTypeIPv4, []discoveryv1.EndpointPort{slicePort("admin", 7000)},
		ep("198.18.3.1", node, "rs"))
	got := describeSet(compute(web, []*discoveryv1.EndpointSlice{v4, v6, moved, other}, node, PreferClose))
	b4 := "%s@node-1/Lrs %s@node-2/rs %s@node-2/st %s@node-2/t %s@/rs"
	want := strings.Join([]string{
		"198.19.255.10:80 ns/web:http affinity=0s localOnly=false preferLocal=false [" +
			fmt.Sprintf(b4, "198.18.1.1:8080", "198.18.2.1:8080", "198.18.2.2:8080", "198.18.2.3:8080", "198.18.2.4:8080") + "]",
		"198.19.255.10:9000 ns/web:metrics affinity=0s localOnly=false preferLocal=false [" +
			fmt.Sprintf(b4, "198.18.1.1:9090", "198.18.2.1:9090", "198.18.2.2:9090", "198.18.2.3:9090", "198.18.2.4:9090") + "]",
		"[fd00:5e:ffff::10]:80 ns/web:http affinity=0s localOnly=false preferLocal=false [[fd00:5e:1::1]:8080@node-1/Lrs]",
		"[fd00:5e:ffff::10]:9000 ns/web:metrics affinity=0s localOnly=false preferLocal=false [[fd00:5e:1::1]:9090@node-1/Lrs]",
	}, "\n")
	if got != want {
		t.Errorf("dual-stack web:\n got %s\nwant %s", got, want)
	}

	// Usable, the data path's rule, on what serviceSet gives: the draining
	// backend only when nothing is ready.
	set := compute(web, []*discoveryv1.EndpointSlice{v4}, node, PreferClose)
	if u := set[0].Usable(); len(u) != 3 || !u[0].Local {
		t.Errorf("usable with ready backends: %v", u)
	}
	draining := endpointSlice("ns", "web-a", "web", discoveryv1.AddressTypeIPv4, ports, ep("198.18.2.2", "node-2", "st"), ep("198.18.2.3", "node-2", "t"))
	if u := compute(web, []*discoveryv1.EndpointSlice{draining}, node, PreferClose)[0].Usable(); len(u) != 1 || u[0].Addr.Addr() != netip.MustParseAddr("198.18.2.2") {
		t.Errorf("usable with none ready: %v, want the serving terminating one", u)
	}

	for _, tc := range []struct {
		name string
		svc  func(*corev1.Service)
		want string // of the first key
	}{
		{"headless", func(s *corev1.Service) { s.Spec.ClusterIP, s.Spec.ClusterIPs = "None", []string{"None"} }, ""},
		{"external name", func(s *corev1.Service) {
			s.Spec.Type, s.Spec.ClusterIP, s.Spec.ClusterIPs, s.Spec.ExternalName = corev1.ServiceTypeExternalName, "", nil, "example.com"
		}, ""},
		{"affinity default", func(s *corev1.Service) { s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP },
			"affinity=3h0m0s localOnly=false preferLocal=false"},
		{"affinity 60s", func(s *corev1.Service) {
			s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
			s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr(int32(60))}}
		}, "affinity=1m0s localOnly=false preferLocal=false"},
		{"local only", func(s *corev1.Service) { s.Spec.InternalTrafficPolicy = ptr(corev1.ServiceInternalTrafficPolicyLocal) },
			"affinity=0s localOnly=true preferLocal=false"},
		{"cluster", func(s *corev1.Service) {
			s.Spec.InternalTrafficPolicy = ptr(corev1.ServiceInternalTrafficPolicyCluster)
		},
			"affinity=0s localOnly=false preferLocal=false"},
	} {
		s := clusterIPService("ns", "s", []string{"198.19.255.11"}, svcPort("", 80, corev1.ProtocolTCP))
		tc.svc(s)
		set := compute(s, nil, node, PreferClose)
		got := ""
		if len(set) > 0 {
			got = describeSet(set[:1])
			got = strings.TrimSuffix(strings.TrimPrefix(got, "198.19.255.11:80 ns/s:80 "), " []")
		}
		if got != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}

	// PreferLocal by each prefer_local_backends value.
	hinted := endpointSlice("ns", "s-a", "s", discoveryv1.AddressTypeIPv4, []discoveryv1.EndpointPort{slicePort("", 80)}, ep("198.18.1.1", node, "rs"))
	hinted.Endpoints[0].Hints = &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: "z"}}}
	plain := endpointSlice("ns", "s-a", "s", discoveryv1.AddressTypeIPv4, []discoveryv1.EndpointPort{slicePort("", 80)}, ep("198.18.1.1", node, "rs"))
	for _, tc := range []struct {
		name                 string
		svc                  func(*corev1.Service)
		slice                *discoveryv1.EndpointSlice
		close, always, never bool
	}{
		{"nothing asked", func(*corev1.Service) {}, plain, false, true, false},
		{"PreferClose", func(s *corev1.Service) {
			s.Spec.TrafficDistribution = ptr(corev1.ServiceTrafficDistributionPreferClose)
		}, plain, true, true, false},
		{"PreferSameZone", func(s *corev1.Service) {
			s.Spec.TrafficDistribution = ptr(corev1.ServiceTrafficDistributionPreferSameZone)
		}, plain, true, true, false},
		{"PreferSameNode", func(s *corev1.Service) {
			s.Spec.TrafficDistribution = ptr(corev1.ServiceTrafficDistributionPreferSameNode)
		}, plain, true, true, false},
		{"other distribution", func(s *corev1.Service) { s.Spec.TrafficDistribution = ptr("Elsewhere") }, plain, false, true, false},
		{"topology-mode Auto", func(s *corev1.Service) { s.Annotations = map[string]string{topologyModeAnnotation: "Auto"} }, plain, true, true, false},
		{"topology-mode Disabled", func(s *corev1.Service) { s.Annotations = map[string]string{topologyModeAnnotation: "Disabled"} }, plain, false, true, false},
		{"hints", func(*corev1.Service) {}, hinted, true, true, false},
	} {
		for _, p := range []struct {
			prefer string
			want   bool
		}{{PreferClose, tc.close}, {PreferAlways, tc.always}, {PreferNever, tc.never}} {
			s := clusterIPService("ns", "s", []string{"198.19.255.11"}, svcPort("", 80, corev1.ProtocolTCP))
			tc.svc(s)
			set := compute(s, []*discoveryv1.EndpointSlice{tc.slice}, node, p.prefer)
			if len(set) != 1 || set[0].PreferLocal != p.want {
				t.Errorf("%s, prefer_local_backends = %s: %s, want PreferLocal %t", tc.name, p.prefer, describeSet(set), p.want)
			}
		}
	}
}

// compute is serviceSet on API objects, through the informers' transforms.
func compute(svc *corev1.Service, eps []*discoveryv1.EndpointSlice, node, prefer string) []services.Service {
	var ks []*kubeSlice
	for _, e := range eps {
		ks = append(ks, stored(e).(*kubeSlice))
	}
	return serviceSet(stored(svc).(*kubeService), ks, node, prefer)
}

// stored is what an informer's store holds of obj.
func stored(obj any) any {
	var out any
	switch obj.(type) {
	case *corev1.Service:
		out, _ = toService(obj)
	case *discoveryv1.EndpointSlice:
		out, _ = toSlice(obj)
	}
	return out
}

// The transforms are idempotent, as client-go requires, and keep nothing
// of an object but what serviceSet reads.
func TestServiceTransforms(t *testing.T) {
	s := clusterIPService("ns", "web", []string{"198.19.255.10"}, svcPort("http", 80, corev1.ProtocolTCP))
	s.Labels = map[string]string{"app": "web"}
	s.Annotations = map[string]string{"big": strings.Repeat("x", 1000)}
	s.ResourceVersion = "7"
	sl := endpointSlice("ns", "web-a", "web", discoveryv1.AddressTypeIPv4, []discoveryv1.EndpointPort{slicePort("http", 8080)},
		ep("198.18.1.1", node, "rs"))
	sl.Endpoints[0].TargetRef = &corev1.ObjectReference{Kind: "Pod", Name: "web-1"}
	// Each transform passes on what it already made, of either kind.
	for _, once := range []any{stored(s), stored(sl)} {
		for _, transform := range []func(any) (any, error){toService, toSlice} {
			if again, _ := transform(once); again != once {
				t.Errorf("a transform changed an object it made (%T)", once)
			}
		}
	}
	ks := stored(s).(*kubeService)
	if ks.Labels != nil || ks.Annotations != nil || ks.Namespace != "ns" || ks.Name != "web" || ks.ResourceVersion != "7" {
		t.Errorf("stored Service meta %+v", ks.ObjectMeta)
	}
	if kl := stored(sl).(*kubeSlice); kl.service != "ns/web" || len(kl.endpoints) != 1 || kl.Labels != nil {
		t.Errorf("stored slice %+v", kl)
	}
}

// recordingSink is a Sink that records every call, and fails those its
// fail function says should.
type recordingSink struct {
	mu    sync.Mutex
	calls []string
	held  map[services.Key]services.Service
	fail  func(op string, k services.Key) bool
	// notify, when not nil, receives after each call.
	notify chan struct{}
	// ns, when set, limits what is recorded to the Services of that
	// namespace (the API server makes default/kubernetes).
	ns string
}

func newRecordingSink() *recordingSink {
	return &recordingSink{held: make(map[services.Key]services.Service)}
}

func (r *recordingSink) Update(s services.Service) error {
	if err := s.Validate(); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ns != "" && !strings.HasPrefix(s.Name, r.ns+"/") {
		return nil
	}
	if r.fail != nil && r.fail("update", s.Key) {
		r.calls = append(r.calls, "update "+s.Key.String()+" failed")
		return errors.New("map full")
	}
	r.calls = append(r.calls, "update "+s.Key.String())
	r.held[s.Key] = s
	r.poke()
	return nil
}

func (r *recordingSink) Delete(k services.Key) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.held[k]; !ok && r.ns != "" {
		return nil
	}
	if r.fail != nil && r.fail("delete", k) {
		r.calls = append(r.calls, "delete "+k.String()+" failed")
		return errors.New("busy")
	}
	r.calls = append(r.calls, "delete "+k.String())
	delete(r.held, k)
	r.poke()
	return nil
}

func (r *recordingSink) poke() {
	if r.notify != nil {
		select {
		case r.notify <- struct{}{}:
		default:
		}
	}
}

// take returns the calls since the last take.
func (r *recordingSink) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := r.calls
	r.calls = nil
	return c
}

func (r *recordingSink) set() []services.Service {
	r.mu.Lock()
	defer r.mu.Unlock()
	var all []services.Service
	for _, s := range r.held {
		all = append(all, s)
	}
	return all
}

// TestServiceWatcherDiff drives applyOne over stores the test fills: the
// Sink is given only what changed, what it refused stays to be retried,
// and a ClusterIP passed from one Service to another is not deleted by the
// first one's deletion.
func TestServiceWatcherDiff(t *testing.T) {
	sink := newRecordingSink()
	var logs bytes.Buffer
	w := NewServiceWatcher(ServiceOptions{NodeName: node, PreferLocal: PreferClose, Sink: sink,
		Logger: zerolog.New(io.MultiWriter(&logs, zerolog.NewTestWriter(t)))})
	svcs, eps := w.svcs.GetIndexer(), w.slices.GetIndexer()
	expect := func(why string, want ...string) {
		t.Helper()
		if got := sink.take(); !slices.Equal(sorted(got), sorted(want)) {
			t.Errorf("%s: sink calls %q, want %q", why, got, want)
		}
	}
	ports := []discoveryv1.EndpointPort{slicePort("http", 8080)}
	web := clusterIPService("ns", "web", []string{"198.19.255.10"}, svcPort("http", 80, corev1.ProtocolTCP), svcPort("grpc", 81, corev1.ProtocolTCP))
	svcs.Add(stored(web))
	eps.Add(stored(endpointSlice("ns", "web-a", "web", discoveryv1.AddressTypeIPv4, ports, ep("198.18.1.1", node, "rs"))))
	w.applyOne("ns/web")
	expect("first", "update 198.19.255.10:80", "update 198.19.255.10:81")
	w.applyOne("ns/web")
	expect("nothing changed")

	eps.Update(stored(endpointSlice("ns", "web-a", "web", discoveryv1.AddressTypeIPv4, ports, ep("198.18.1.1", node, "rs"), ep("198.18.1.2", node, "rs"))))
	w.applyOne("ns/web")
	expect("a backend added: only the port it serves", "update 198.19.255.10:80")

	// The Sink refuses: what it holds stays as it was, and is retried.
	sink.fail = func(string, services.Key) bool { return true }
	eps.Update(stored(endpointSlice("ns", "web-a", "web", discoveryv1.AddressTypeIPv4, ports)))
	w.applyOne("ns/web")
	expect("refused", "update 198.19.255.10:80 failed")
	if _, ok := w.failed["ns/web"]; !ok {
		t.Error("a refused update is not marked for a retry")
	}
	if got := w.Services(); len(got[1].Backends) != 2 {
		t.Errorf("after a refused update the view has %v, want what the sink holds", got[1].Backends)
	}
	// Refused again on the retry: logged once at error level, not on
	// every retry (a full map would fill the journal every second).
	w.applyOne("ns/web")
	expect("refused again", "update 198.19.255.10:80 failed")
	if n := strings.Count(logs.String(), `"level":"error"`); n != 1 {
		t.Errorf("%d error lines for one Service refused twice, want 1:\n%s", n, logs.String())
	}
	sink.fail = nil
	w.applyOne("ns/web")
	expect("retried", "update 198.19.255.10:80")
	if !strings.Contains(logs.String(), "the data path took the service after errors") {
		t.Errorf("the recovery is not logged:\n%s", logs.String())
	}
	if got := sink.set(); len(got) != 2 || describeSet(got) != describeSet(w.Services()) {
		t.Errorf("sink holds\n%s\nview says\n%s", describeSet(got), describeSet(w.Services()))
	}

	// The grpc port goes; then the Service.
	svcs.Update(stored(clusterIPService("ns", "web", []string{"198.19.255.10"}, svcPort("http", 80, corev1.ProtocolTCP))))
	w.applyOne("ns/web")
	expect("a port removed", "delete 198.19.255.10:81")
	// Deleted, and its ClusterIP and port taken by another Service whose
	// update is applied first.
	svcs.Delete(stored(web))
	svcs.Add(stored(clusterIPService("ns", "new", []string{"198.19.255.10"}, svcPort("http", 80, corev1.ProtocolTCP))))
	w.applyOne("ns/new")
	w.applyOne("ns/web")
	expect("a ClusterIP passed on", "update 198.19.255.10:80")
	if got := w.Services(); len(got) != 1 || got[0].Name != "ns/new:http" {
		t.Errorf("view %s", describeSet(got))
	}
	svcs.Delete(&kubeService{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "new"}})
	w.applyOne("ns/new")
	expect("deleted", "delete 198.19.255.10:80")
	if got := w.Services(); len(got) != 0 {
		t.Errorf("view after the deletes: %s", describeSet(got))
	}
}
