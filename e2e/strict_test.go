package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/smesh-dev/smesh/pkg/cgroups"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// strictWorkload makes a workload cgroup below node n's enrolled cgroup
// (as a systemd unit below an enrolled slice), removed at cleanup.
func strictWorkload(t *testing.T, n *node) string {
	t.Helper()
	cg := filepath.Join(n.enrolled, "smesh-test-strict")
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(cg) })
	return cg
}

// strictConf is the [[capture.workloads]] table of a strict workload.
func strictConf(t *testing.T, cg string, strict bool, exempt ...int) string {
	ports := make([]string, len(exempt))
	for i, p := range exempt {
		ports[i] = fmt.Sprint(p)
	}
	conf := fmt.Sprintf("[[capture.workloads]]\ncgroup = %q\nstrict = %v\n", cgroupRel(t, cg), strict)
	if strict {
		conf += fmt.Sprintf("strict_exempt_ports = [%s]\n", strings.Join(ports, ", "))
	}
	return conf
}

// strictDropped is node n's smesh_strict_dropped_total.
func (n *node) strictDropped() float64 {
	n.t.Helper()
	_, m := n.admin("/metrics")
	return testenv.Metric(n.t, m, "smesh_strict_dropped_total", nil)
}

// strictPassed is node n's smesh_strict_passed_total{reason}.
func (n *node) strictPassed(reason string) float64 {
	n.t.Helper()
	_, m := n.admin("/metrics")
	return testenv.Metric(n.t, m, "smesh_strict_passed_total", map[string]string{"reason": reason})
}

// TestStrictInbound: node b runs servers in a strict workload (a cgroup
// below its enrolled one). A plaintext connection from a process of node a
// outside the mesh goes unanswered (the SYN dropped, counted in b's
// /metrics), node a's enrolled client reaches it through the tunnel; on
// node b a process outside the mesh is dropped and an enrolled one passes;
// the exempt port takes plaintext. Strict survives an upgrade (the
// successor adopts it), and a reload without strict opens the workload
// again.
func TestStrictInbound(t *testing.T) {
	for _, mode := range []string{"splice", "copy"} {
		t.Run(mode, func(t *testing.T) {
			a, b := newNode(t), newNode(t)
			_, addrB := testenv.Link(t, a.ns, b.ns)
			wl := strictWorkload(t, b)
			b.runtimeDir = t.TempDir()
			strictOn := strictConf(t, wl, true, 9001)
			b.start(mode, strictOn)
			a.start(mode, "")
			server := netip.AddrPortFrom(addrB, 9000).String()
			exempt := netip.AddrPortFrom(addrB, 9001).String()
			b.server(wl, server)
			b.server(wl, exempt)
			outsideA, outsideB := testenv.NewCgroup(t), testenv.NewCgroup(t)

			if b.debugStrict().strictID(wl) == 0 {
				t.Fatalf("/debug/strict: %+v, want %s listed", b.debugStrict(), wl)
			}
			check := func(stage string) {
				t.Helper()
				before := b.strictDropped()
				// (a) plaintext from node a, outside the mesh: dropped.
				a.client(outsideA, "dropped", server)
				if after := b.strictDropped(); after <= before {
					t.Errorf("%s: smesh_strict_dropped_total %v -> %v after a dropped connection", stage, before, after)
				}
				// (b) node a's enrolled client, through the tunnel.
				mesh, exempted := b.strictPassed("mesh"), b.strictPassed("exempt")
				a.client(a.enrolled, "echo", server, scaledArg(4<<20))
				// (c) on node b: outside the mesh dropped, enrolled passes.
				b.client(outsideB, "dropped", server)
				b.client(b.enrolled, "echo", server, scaledArg(4<<20))
				// (d) the exempt port takes plaintext.
				a.client(outsideA, "echo", exempt, "100000")
				b.client(outsideB, "echo", exempt, "100000")
				if m, e := b.strictPassed("mesh"), b.strictPassed("exempt"); m < mesh+2 || e < exempted+2 {
					t.Errorf("%s: smesh_strict_passed_total mesh %v -> %v, exempt %v -> %v, want 2 more each", stage, mesh, m, exempted, e)
				}
			}
			check("start")

			// (f) an upgrade: the successor adopts strict inbound.
			old := b.upgrade(false)
			waitExited(t, []*testenv.Helper{old}, 30*time.Second)
			check("after upgrade")

			// (e) a reload without strict: plaintext passes again.
			conf, err := os.ReadFile(b.confPath)
			if err != nil {
				t.Fatal(err)
			}
			b.reload(strings.Replace(string(conf), strictOn, strictConf(t, wl, false), 1))
			a.client(outsideA, "echo", server, "100000")
			b.client(outsideB, "echo", server, "100000")
			if d := b.debugStrict(); len(d.Strict) != 0 {
				t.Errorf("/debug/strict after the reload: %+v, want no strict workload", d)
			}
			// And back on.
			b.reload(string(conf))
			a.client(outsideA, "dropped", server)
			a.client(a.enrolled, "echo", server, "100000")
		})
	}
}

// debugStrict is node n's /debug/strict.
type debugStrict struct {
	Strict []struct {
		Cgroup   string `json:"cgroup"`
		CgroupID uint64 `json:"cgroupID"`
	} `json:"strict"`
	Missing []string `json:"missing"`
}

func (n *node) debugStrict() debugStrict {
	n.t.Helper()
	code, body := n.admin("/debug/strict")
	var d debugStrict
	if err := json.Unmarshal([]byte(body), &d); code != 200 || err != nil {
		n.t.Fatalf("/debug/strict: %d %v %s", code, err, body)
	}
	return d
}

// strictID is cg's id in /debug/strict, 0 if it is not strict.
func (d debugStrict) strictID(cg string) uint64 {
	for _, s := range d.Strict {
		if s.Cgroup == cg {
			return s.CgroupID
		}
	}
	return 0
}

// waitStrict waits until node n's /debug/strict lists cg as strict (or,
// with want false, not), within 15 s (the cgroup check runs every 5 s),
// and returns its id there.
func (n *node) waitStrict(cg string, want bool) uint64 {
	n.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		d := n.debugStrict()
		if id := d.strictID(cg); (id != 0) == want {
			return id
		}
		if time.Now().After(deadline) {
			n.t.Fatalf("/debug/strict: %+v, want %s strict: %v", d, cg, want)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestStrictWorkloadAppears: a strict workload whose cgroup does not exist
// when smeshd starts becomes strict once it is made, and again when it is
// removed and made anew (a new cgroup id), as a systemd unit restarting.
func TestStrictWorkloadAppears(t *testing.T) {
	a, b := newNode(t), newNode(t)
	_, addrB := testenv.Link(t, a.ns, b.ns)
	wl := filepath.Join(b.enrolled, "smesh-test-strict")
	t.Cleanup(func() { os.Remove(wl) })
	b.start("splice", strictConf(t, wl, true, 9001))
	a.start("splice", "")
	if d := b.debugStrict(); len(d.Missing) != 1 || d.Missing[0] != wl {
		t.Errorf("/debug/strict before the cgroup exists: %+v, want it missing", d)
	}
	server := netip.AddrPortFrom(addrB, 9000).String()
	outside := testenv.NewCgroup(t)
	for round := range 2 {
		if err := os.Mkdir(wl, 0o755); err != nil {
			t.Fatal(err)
		}
		id := b.waitStrict(wl, true)
		if real, err := cgroups.ID(wl); err != nil || real != id {
			t.Errorf("round %d: /debug/strict has id %d, the cgroup is %d (%v)", round, id, real, err)
		}
		h := b.server(wl, server)
		a.client(outside, "dropped", server)
		a.client(a.enrolled, "echo", server, "100000")
		h.Stop()
		for try := 0; ; try++ {
			err := os.Remove(wl)
			if err == nil {
				break
			}
			if try == 50 {
				t.Fatalf("round %d: removing the workload cgroup: %v", round, err)
			}
			time.Sleep(50 * time.Millisecond) // the killed server leaving it
		}
		b.waitStrict(wl, false)
	}
}

// TestKubernetesStrict: against a real API server with the test kubelet, a
// pod in the mesh labelled smesh.dev/inbound=strict on node b accepts a
// mesh pod of node a (through the tunnel) and of its own node, and drops a
// pod outside the mesh of either node, but on its readiness probe's port (named in its container), which the
// kubelet probes in plaintext; labelled open again, it takes plaintext.
func TestKubernetesStrict(t *testing.T) {
	testenv.RequirePrivileged(t)
	kc := startKubeCluster(t)
	c := testenv.NewCluster()
	cnA, cnB := c.AddNode(t), c.AddNode(t)
	testenv.JoinNodes(t, cnA, cnB)
	a, b := nodeOn(t, cnA.Node), nodeOn(t, cnB.Node)
	k := &kubelet{t: t, api: kc.admin, nodes: map[string]*kubeNode{}}
	ka, kb := k.addNode("node-a", cnA), k.addNode("node-b", cnB)
	kc.namespace(t, "meshed", map[string]string{"smesh.dev/mesh": "enabled"})
	kc.namespace(t, "plain", nil)

	spec := podSpec("meshed", "srv", "node-b", map[string]string{"smesh.dev/inbound": "strict"}, corev1.PodQOSBestEffort)
	spec.Spec.Containers[0].Ports = []corev1.ContainerPort{{Name: "health", ContainerPort: 9001}}
	spec.Spec.Containers[0].ReadinessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{
		TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromString("health")}}}
	srv := k.create(spec)
	addr, probe := srv.addr(t, 9000), srv.addr(t, 9001)
	podServerAt(t, srv.container(), addr)
	podServerAt(t, srv.container(), probe)
	web := k.create(podSpec("meshed", "web", "node-a", nil, corev1.PodQOSBestEffort))
	plain := k.create(podSpec("plain", "outside", "node-a", nil, corev1.PodQOSBestEffort))
	plainB := k.create(podSpec("plain", "outside-b", "node-b", nil, corev1.PodQOSBestEffort))
	meshB := k.create(podSpec("meshed", "client-b", "node-b", nil, corev1.PodQOSBestEffort))

	kc.startSmeshd(b, "node-b", kb)
	kc.startSmeshd(a, "node-a", ka)
	b.waitServed(srv.Name)
	a.waitServed(web.Name)
	if p := debugPods(b)["meshed/srv"]; !p.Strict || !slices.Equal(p.ExemptPorts, []uint16{9001}) {
		t.Fatalf("node b's /debug/pods srv: %+v, want strict with port 9001 exempt", p)
	}
	if _, body := b.admin("/debug/identities"); !strings.Contains(body, `"strict": true`) {
		t.Errorf("/debug/identities of node b: %s, want srv strict", body)
	}
	if b.debugStrict().strictID(srv.Cgroup) == 0 {
		t.Fatalf("/debug/strict of node b: %+v, want srv's cgroup %s", b.debugStrict(), srv.Cgroup)
	}
	pa := &podNode{node: a}
	before := b.strictDropped()
	pa.podClient(plain.container(), "dropped", addr)
	if after := b.strictDropped(); after <= before {
		t.Errorf("smesh_strict_dropped_total %v -> %v after a dropped connection", before, after)
	}
	pa.podClient(web.container(), "echo", addr, "1000000")
	pa.podClient(plain.container(), "echo", probe, "100000")
	// On node b: a pod outside the mesh is dropped, a mesh pod passes.
	b.waitServed(meshB.Name)
	pb := &podNode{node: b}
	pb.podClient(plainB.container(), "dropped", addr)
	pb.podClient(meshB.container(), "echo", addr, "1000000")

	// Labelled open: plaintext passes again.
	patch := []byte(`{"metadata":{"labels":{"smesh.dev/inbound":"open"}}}`)
	if _, err := kc.admin.CoreV1().Pods("meshed").Patch(context.Background(), "srv", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	b.waitStrict(srv.Cgroup, false)
	pa.podClient(plain.container(), "echo", addr, "100000")
}

// TestStrictClosedKilled: with on_failure = "closed" a strict workload stays
// strict while its node's smeshd is down (kill -9: the pinned programs
// stay), and the restarted smeshd adopts it: plaintext still dropped, the
// mesh passes again.
func TestStrictClosedKilled(t *testing.T) {
	testenv.RequirePrivileged(t)
	a, b := newNode(t), newNode(t)
	_, addrB := testenv.Link(t, a.ns, b.ns)
	wl := strictWorkload(t, b)
	b.captureExtra = fmt.Sprintf("on_failure = \"closed\"\npin_dir = %q", testPinDir(t))
	b.start("splice", strictConf(t, wl, true))
	a.start("splice", "")
	server := netip.AddrPortFrom(addrB, 9000).String()
	b.server(wl, server)
	outside := testenv.NewCgroup(t)
	a.client(outside, "dropped", server)
	a.client(a.enrolled, "echo", server, "100000")

	b.smeshd.Stop() // SIGKILL
	a.client(outside, "dropped", server)

	b.launch(nil, b.confPath)
	b.waitReady()
	if b.debugStrict().strictID(wl) == 0 {
		t.Errorf("/debug/strict after the restart: %+v, want %s", b.debugStrict(), wl)
	}
	a.client(outside, "dropped", server)
	a.client(a.enrolled, "echo", server, "100000")
	b.stop()
}
