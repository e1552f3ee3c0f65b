package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/smesh-dev/smesh/pkg/daemon"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// readyProbe is the "ready-probe" helper: `smeshd ready` (daemon.Probe)
// against args[0], from the cgroup it was started in; prints "ready" or the
// reason it is not.
func readyProbe(args []string) int {
	if err := daemon.Probe(context.Background(), netip.MustParseAddrPort(args[0]), 5*time.Second); err != nil {
		fmt.Println(err)
		return 0
	}
	fmt.Println("ready")
	return 0
}

// probe is the Kubernetes readiness probe of a smeshd container whose
// cgroup is cg: `smeshd ready`, run in that cgroup on node n.
func (n *node) probe(cg string) string {
	n.t.Helper()
	h := testenv.StartHelper(n.t, cg, n.ns.Name, "ready-probe", "127.0.0.1:15000")
	if err := h.Wait(); err != nil {
		n.t.Fatalf("ready-probe: %v %s", err, h.Stderr())
	}
	return strings.TrimSpace(h.Stdout())
}

// podSmeshd is a released smeshd of a rollout: its process and its pod's
// cgroup.
type podSmeshd struct {
	h  *testenv.Helper
	cg string
}

// rollout replaces node n's smeshd as a DaemonSet rollout with maxSurge 1
// does (docs/restart.md 3.5): the new pod's smeshd starts beside the old one,
// in a cgroup of its own, with the same runtime directory (the host's
// /run/smesh), and takes everything over; the old one, configured as in a
// pod (daemon.after_release = "wait"), drains and then stays, idle, instead
// of exiting (the kubelet would restart it into a take-back). The
// readiness probe (`smeshd ready`) of each pod says whose smeshd serves.
func (n *node) rollout() podSmeshd {
	n.t.Helper()
	return n.rolloutVia(nil)
}

// rolloutVia is rollout with smeshd started through wrapper (see
// testenv.StartHelperVia), nil for none.
func (n *node) rolloutVia(wrapper []string) podSmeshd {
	n.t.Helper()
	old := podSmeshd{n.smeshd, n.smeshCg}
	if got := n.probe(old.cg); got != "ready" {
		n.t.Errorf("the old pod's readiness before the rollout: %q", got)
	}
	n.smeshCg = testenv.NewCgroup(n.t)
	// The new pod before its smeshd took over: the old smeshd answers on
	// the shared admin listener, which is not the new pod's readiness.
	if got := n.probe(n.smeshCg); got == "ready" || !strings.Contains(got, "not this container's") {
		n.t.Errorf("the new pod's readiness before its smeshd runs: %q, want not ready (the old smeshd answers)", got)
	}
	// A readiness probe (the same executable) running in the new pod's
	// cgroup as its smeshd starts: smeshd stays in the container's cgroup
	// (ownCgroup), where the probe looks for it.
	inFlight := testenv.StartHelper(n.t, n.smeshCg, n.ns.Name, "pause")
	n.launch(wrapper, n.confPath)
	n.waitReady()
	inFlight.Stop()
	if got := n.probe(n.smeshCg); got != "ready" {
		n.t.Errorf("the new pod's readiness after the take-over: %q", got)
	}
	// After the drain (drain_timeout), idle: not exited.
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(old.h.Stderr(), "idle until SIGTERM") {
		select {
		case <-old.h.Exited():
			n.t.Fatalf("the released smeshd exited (%v) instead of staying idle: %s", old.h.Wait(), tail(old.h.Stderr()))
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			n.t.Fatalf("the released smeshd did not go idle after its drain: %s", tail(old.h.Stderr()))
		}
	}
	if got := n.probe(old.cg); got == "ready" || !strings.Contains(got, "not this container's") {
		n.t.Errorf("the old pod's readiness after the hand-over: %q, want not ready (another smeshd answers)", got)
	}
	return old
}

func tail(s string) string {
	if len(s) > 3000 {
		return "..." + s[len(s)-3000:]
	}
	return s
}

// TestRolloutInPods: a DaemonSet rollout with maxSurge 1, played with real
// smeshd processes: two nodes, 200 connections a second (divided by
// SMESH_TEST_SCALE) from node a to a server on node b (tunnel) and to one on
// a (spliced), each checked byte for byte, while a's smeshd is rolled once
// and b's twice (the second while the first released one still idles: the
// new one takes over from the serving one, not the idle one). Not one
// connection fails; the released smeshd stay idle after their drain
// (after_release = "wait"), never take anything back, the readiness probe
// of each pod is its own smeshd's (the new pod ready only once it took
// over, the old one not ready after), and SIGTERM ends them with status 0
// while the new ones serve on.
func TestRolloutInPods(t *testing.T) {
	for _, onFailure := range []string{"open", "closed"} {
		t.Run(onFailure, func(t *testing.T) {
			a, b := newNode(t), newNode(t)
			_, addrB := testenv.Link(t, a.ns, b.ns)
			for _, n := range []*node{a, b} {
				n.runtimeDir = t.TempDir()
				if onFailure == "closed" {
					n.captureExtra = fmt.Sprintf("on_failure = \"closed\"\npin_dir = %q", testPinDir(t))
				}
				n.start("splice", "[daemon]\ndrain_timeout = \"3s\"\nafter_release = \"wait\"")
			}
			remote := netip.AddrPortFrom(addrB, 9000).String()
			b.server(b.enrolled, remote)
			local := "127.0.0.1:9001"
			a.server(a.enrolled, local)

			seconds, interval := "30", fmt.Sprint(5*dataScale())
			began := time.Now()
			steadyRemote := testenv.StartHelper(t, a.enrolled, a.ns.Name, "client", "steady", remote, seconds, interval)
			steadyLocal := testenv.StartHelper(t, a.enrolled, a.ns.Name, "client", "steady", local, seconds, interval)
			time.Sleep(time.Second)

			var released []podSmeshd
			released = append(released, a.rollout())
			released = append(released, b.rollout())
			// The next rollout of b while its first released smeshd idles.
			released = append(released, b.rollout())
			time.Sleep(time.Second)

			// The released ones idle: alive, took nothing back.
			for i, r := range released {
				select {
				case <-r.h.Exited():
					t.Fatalf("released smeshd %d exited (%v) while idle: %s", i, r.h.Wait(), tail(r.h.Stderr()))
				default:
				}
				if _, after, _ := strings.Cut(r.h.Stderr(), "idle until SIGTERM"); strings.Contains(after, "took over") || strings.Contains(after, "smeshd ready") {
					t.Errorf("released smeshd %d took over again while idle: %s", i, tail(after))
				}
			}
			// Pods deleted: SIGTERM ends each at once, status 0; the new
			// smeshd serve on.
			for i, r := range released {
				if err := r.h.Signal(syscall.SIGTERM); err != nil {
					t.Fatal(err)
				}
				select {
				case <-r.h.Exited():
				case <-time.After(10 * time.Second):
					t.Fatalf("released smeshd %d did not exit on SIGTERM: %s", i, tail(r.h.Stderr()))
				}
				if err := r.h.Wait(); err != nil {
					t.Errorf("released smeshd %d exited with %v: %s", i, err, tail(r.h.Stderr()))
				}
			}
			time.Sleep(time.Second)
			for _, n := range []*node{a, b} {
				if got := n.probe(n.smeshCg); got != "ready" {
					t.Errorf("node %s's smeshd after the old pods went: %q", n.name, got)
				}
			}
			// The load ends by itself, every connection checked; it
			// has to have outlasted the rollouts.
			select {
			case <-steadyRemote.Exited():
				t.Errorf("the load ended before the rollouts did (%s): lengthen it", time.Since(began).Round(time.Second))
			default:
			}
			errRemote, errLocal := steadyRemote.Wait(), steadyLocal.Wait()
			t.Logf("steady to b: %s; steady on a: %s", strings.TrimSpace(steadyRemote.Stdout()), strings.TrimSpace(steadyLocal.Stdout()))
			if errRemote != nil {
				t.Errorf("connections to node b failed during the rollouts: %v: %s", errRemote, steadyRemote.Stderr())
			}
			if errLocal != nil {
				t.Errorf("connections on node a failed during the rollouts: %v: %s", errLocal, steadyLocal.Stderr())
			}
		})
	}
}

// TestRolloutInPodsKubernetes: the rollout of TestRolloutInPods with
// smeshd as the DaemonSet runs it ([kubernetes] on, against a real API
// server, pods run by the test kubelet): a pod on node a connects to a pod
// on node b (tunnelled) 200 times a second, each checked byte for byte,
// while b's smeshd and then a's are rolled. None fails; the new smeshd
// enrol the pods (the old one stopped following the API at its release);
// the released ones idle until SIGTERM and exit 0.
func TestRolloutInPodsKubernetes(t *testing.T) {
	testenv.RequirePrivileged(t)
	kc := startKubeCluster(t)
	c := testenv.NewCluster()
	cnA, cnB := c.AddNode(t), c.AddNode(t)
	testenv.JoinNodes(t, cnA, cnB)
	a, b := nodeOn(t, cnA.Node), nodeOn(t, cnB.Node)
	k := &kubelet{t: t, api: kc.admin, nodes: map[string]*kubeNode{}}
	ka, kb := k.addNode("node-a", cnA), k.addNode("node-b", cnB)
	kc.namespace(t, "demo", map[string]string{"smesh.dev/mesh": "enabled"})
	web := k.create(podSpec("demo", "web", "node-a", nil, corev1.PodQOSBestEffort))
	srv := k.create(podSpec("demo", "srv", "node-b", nil, corev1.PodQOSBestEffort))
	addr := srv.addr(t, 9000)
	podServerAt(t, srv.container(), addr)

	wrappers := map[*node][]string{}
	for _, x := range []struct {
		n    *node
		name string
		kn   *kubeNode
	}{{a, "node-a", ka}, {b, "node-b", kb}} {
		x.n.runtimeDir = t.TempDir()
		wrappers[x.n] = kc.podWrapper(x.n, x.name)
		x.n.startVia(wrappers[x.n], "splice", kc.kubeConf(x.n, x.kn)+"[daemon]\ndrain_timeout = \"3s\"\nafter_release = \"wait\"\n")
	}
	b.waitServed(srv.Name)
	a.waitServed(web.Name)
	if !kubeCaptured(a, web, addr) {
		t.Fatal("the pod's connection is not captured before the rollout")
	}

	app := web.container()
	steady := testenv.StartHelper(t, app.Cgroup, app.Name, "client", "steady", addr, "20", fmt.Sprint(5*dataScale()))
	began := time.Now()
	time.Sleep(time.Second)
	released := []podSmeshd{b.rolloutVia(wrappers[b]), a.rolloutVia(wrappers[a])}
	time.Sleep(time.Second)
	for _, n := range []*node{a, b} {
		pods := debugPods(n)
		if len(pods) != 1 {
			t.Errorf("node %s's new smeshd enrols %+v, want its one pod", n.name, pods)
		}
		for name, p := range pods {
			if !p.Enrolled {
				t.Errorf("node %s's new smeshd: pod %s not enrolled: %+v", n.name, name, p)
			}
		}
	}
	if !kubeCaptured(a, web, addr) {
		t.Error("the pod's connection is not captured after the rollout")
	}
	for i, r := range released {
		if _, after, _ := strings.Cut(r.h.Stderr(), "idle until SIGTERM"); strings.Contains(after, "took over") {
			t.Errorf("released smeshd %d took over again while idle: %s", i, tail(after))
		}
		if err := r.h.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		select {
		case <-r.h.Exited():
		case <-time.After(10 * time.Second):
			t.Fatalf("released smeshd %d did not exit on SIGTERM: %s", i, tail(r.h.Stderr()))
		}
		if err := r.h.Wait(); err != nil {
			t.Errorf("released smeshd %d exited with %v: %s", i, err, tail(r.h.Stderr()))
		}
	}
	select {
	case <-steady.Exited():
		t.Errorf("the load ended before the rollouts did (%s): lengthen it", time.Since(began).Round(time.Second))
	default:
	}
	err := steady.Wait()
	t.Logf("steady pod to pod: %s", strings.TrimSpace(steady.Stdout()))
	if err != nil {
		t.Errorf("connections from pod to pod failed during the rollouts: %v: %s", err, steady.Stderr())
	}
}
