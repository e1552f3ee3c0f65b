package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// Identities of the policy test's workloads (Istio's form, so that
// namespaces match).
const (
	idFrontend = "spiffe://test.local/ns/web/sa/frontend"
	idOther    = "spiffe://test.local/ns/batch/sa/other"
	idPayments = "spiffe://test.local/ns/pay/sa/payments"
	idLocal    = "spiffe://test.local/ns/pay/sa/local"
	idLOther   = "spiffe://test.local/ns/batch/sa/lother"
)

// workloadsConf names each pod's cgroup with its identity.
func workloadsConf(t *testing.T, pods map[*testenv.Pod]string) string {
	var b strings.Builder
	for p, id := range pods {
		fmt.Fprintf(&b, "[[capture.workloads]]\ncgroup = %q\nidentity = %q\n", cgroupRel(t, p.Cgroup), id)
	}
	return b.String()
}

// tryPodClient runs a client scenario in pod p and reports whether it said
// ok (no test failure: for polling).
func tryPodClient(t *testing.T, p *testenv.Pod, args ...string) (bool, string) {
	t.Helper()
	h := testenv.StartHelper(t, p.Cgroup, p.Name, "client", args...)
	err := h.Wait()
	return err == nil && strings.Contains(h.Stdout(), "ok "+args[0]), h.Stdout() + h.Stderr()
}

// eventually runs the scenario until it says ok, for up to within.
func eventually(t *testing.T, within time.Duration, what string, p *testenv.Pod, args ...string) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		ok, out := tryPodClient(t, p, args...)
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: client %v did not say ok within %v: %s", what, args, within, out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestPolicy: authorization policy from smesh.toml enforced on both paths.
// Node a runs the clients frontend, other and rogue (which asserts the
// identity of node b's payments: a node asserting a workload not granted
// to it); node b runs payments (servers on 9000 and 9001) and the same-node
// clients local and lother. Cross-node connections are decided by b's
// tunnel server (a denied one is reset), same-node ones by connect4
// (ECONNREFUSED), in splice and copy mode. A reload changes the policies:
// new connections follow within a second, an open one keeps going.
func TestPolicy(t *testing.T) {
	for _, mode := range []string{"splice", "copy"} {
		t.Run(mode, func(t *testing.T) { testPolicy(t, mode) })
	}
}

func testPolicy(t *testing.T, mode string) {
	testenv.RequirePrivileged(t)
	c := testenv.NewCluster()
	cnA, cnB := c.AddNode(t), c.AddNode(t)
	testenv.JoinNodes(t, cnA, cnB)
	a := &podNode{node: nodeOn(t, cnA.Node), cn: cnA}
	b := &podNode{node: nodeOn(t, cnB.Node), cn: cnB}
	front, other, rogue := a.pod(), a.pod(), a.pod()
	pay, local, lother := b.pod(), b.pod(), b.pod()

	a.start(mode, workloadsConf(t, map[*testenv.Pod]string{front: idFrontend, other: idOther, rogue: idPayments}))
	var cidrs []string
	for _, p := range []*testenv.Pod{front, other, rogue} {
		cidrs = append(cidrs, fmt.Sprintf("%q", netip.PrefixFrom(p.Addr4, 32)))
	}
	bBase := workloadsConf(t, map[*testenv.Pod]string{pay: idPayments, local: idLocal, lother: idLOther}) +
		b.tlsConf("") + fmt.Sprintf(`
[[tunnel.tls.peers]]
cidrs = [%s]
identities = [%q]
workloads = ["spiffe://test.local/ns/web/", %q]
`, strings.Join(cidrs, ", "), a.id(), idOther)
	phase1 := `
[[policy]]
name = "pay-allow"
workloads = ["` + idPayments + `"]
rules = [{from = [{principals = ["test.local/ns/web/sa/frontend", "test.local/ns/pay/sa/local"]}], to = [{ports = [9000]}]}]
`
	b.start(mode, bBase+phase1)
	p9000 := netip.AddrPortFrom(pay.Addr4, 9000).String()
	p9001 := netip.AddrPortFrom(pay.Addr4, 9001).String()
	podServerAt(t, pay, p9000)
	podServerAt(t, pay, p9001)
	a.waitServed(front.Name, other.Name, rogue.Name)
	b.waitServed(pay.Name, local.Name, lother.Name)

	// The first compile follows the namespaces' addresses.
	eventually(t, 5*time.Second, "same-node policy in force", lother, "refused", p9000)

	// Phase 1: one ALLOW policy by principal and port.
	a.podClient(front, "oneway", p9000, fmt.Sprint(8<<20)) // allowed by principal
	a.podClient(front, "echo", p9000, fmt.Sprint(1<<20))
	a.podClient(other, "reset", p9000) // no ALLOW matches: default deny
	a.podClient(front, "reset", p9001) // the port is not allowed
	b.podClient(local, "oneway", p9000, fmt.Sprint(8<<20))
	b.podClient(local, "echo", p9000, fmt.Sprint(1<<20))
	b.podClient(lother, "refused", p9000) // connect() fails: ECONNREFUSED
	b.podClient(local, "refused", p9001)
	a.podClient(rogue, "reset", p9000) // node a may not speak for payments

	_, m := b.admin("/metrics")
	if v := testenv.Metric(t, m, "smesh_tunnel_errors_total", map[string]string{"reason": "identity_not_on_node"}); v < 1 {
		t.Errorf("smesh_tunnel_errors_total{reason=identity_not_on_node} = %v, want at least 1", v)
	}
	if v := testenv.Metric(t, m, "smesh_policy_denied_total", map[string]string{"path": "tunnel", "policy": "", "reason": "not_allowed"}); v < 2 {
		t.Errorf("tunnel not_allowed denials = %v, want at least 2", v)
	}
	if v := testenv.Metric(t, m, "smesh_policy_denied_total", map[string]string{"path": "same_node", "policy": "", "reason": "not_allowed"}); v < 2 {
		t.Errorf("same-node not_allowed denials = %v, want at least 2", v)
	}

	// An open connection, allowed now, denied after the reload: it keeps
	// going (Istio leaves open connections alone).
	open := testenv.StartHelper(t, front.Cgroup, front.Name, "client", "paced", p9000, "300")
	time.Sleep(500 * time.Millisecond)

	// Phase 2: ALLOW by namespace, a DENY overriding it for frontend on
	// 9000.
	phase2 := `
[[policy]]
name = "ns-allow"
workloads = ["` + idPayments + `"]
rules = [{from = [{namespaces = ["web", "batch"]}]}]

[[policy]]
name = "deny-front-9000"
action = "DENY"
workloads = ["` + idPayments + `"]
rules = [{from = [{principals = ["test.local/ns/web/sa/frontend"]}], to = [{ports = [9000]}]}]

[[policy]]
name = "deny-addrs-9001"
action = "DENY"
workloads = ["` + idPayments + `"]
rules = [{from = [{ip_blocks = ["` + other.Addr4.String() + `/32", "` + lother.Addr4.String() + `", "` + lother.Addr6.String() + `"]}], to = [{ports = [9001]}]}]
`
	confPath := b.confPath
	p := b.writeConfig(mode, bBase+phase2)
	conf, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b.confPath = confPath
	reloaded := time.Now()
	b.reload(string(conf))
	eventually(t, time.Second, "same-node after the reload", local, "refused", p9000) // pay is no allowed namespace now
	if d := time.Since(reloaded); d > 2*time.Second {
		t.Errorf("the new same-node policy took %v after the reload", d)
	}
	b.podClient(lother, "oneway", p9000, fmt.Sprint(4<<20)) // batch is
	a.podClient(other, "oneway", p9000, fmt.Sprint(4<<20))  // allowed by namespace now
	a.podClient(front, "reset", p9000)                      // DENY overrides the ALLOW
	a.podClient(front, "oneway", p9001, fmt.Sprint(4<<20))
	// ipBlocks: the address node a asserts for other (its pod's IPv4
	// address, of the destination's family), and lother's namespace
	// addresses on the same node (both: connect4's verdict is per
	// identity, so addresses that decide differently deny, reported in
	// /debug/policy).
	a.podClient(other, "reset", p9001)
	b.podClient(lother, "refused", p9001)

	if err := open.Wait(); err != nil || !strings.Contains(open.Stdout(), "ok paced") {
		t.Errorf("the connection open across the reload: %v %s %s", err, open.Stdout(), open.Stderr())
	}
	_, m = b.admin("/metrics")
	for _, l := range []map[string]string{
		{"path": "tunnel", "policy": "deny-front-9000", "reason": "denied_by_policy"},
		{"path": "tunnel", "policy": "deny-addrs-9001", "reason": "denied_by_policy"},
		{"path": "same_node", "policy": "deny-addrs-9001", "reason": "denied_by_policy"},
	} {
		if v := testenv.Metric(t, m, "smesh_policy_denied_total", l); v < 1 {
			t.Errorf("smesh_policy_denied_total%v = %v, want at least 1\n%s", l, v, grepLines(m, "smesh_policy"))
		}
	}

	_, body := b.admin("/debug/policy")
	var dbg struct {
		Workloads []struct {
			Identity string
			Policies []struct{ Policy string }
		}
		SameNode struct {
			Entries  int
			Problems []string
		}
	}
	if err := json.Unmarshal([]byte(body), &dbg); err != nil {
		t.Fatalf("/debug/policy: %v: %s", err, body)
	}
	found := false
	for _, w := range dbg.Workloads {
		if w.Identity == idPayments {
			found = true
			if len(w.Policies) != 3 {
				t.Errorf("/debug/policy lists %d policies for payments, want 3: %s", len(w.Policies), body)
			}
		}
	}
	if len(dbg.SameNode.Problems) > 0 {
		t.Errorf("/debug/policy reports same-node problems, want none (every address listed): %v", dbg.SameNode.Problems)
	}
	if !found || dbg.SameNode.Entries == 0 {
		t.Errorf("/debug/policy does not show payments or its compiled verdicts: %s", body)
	}
}

// Identities of TestPolicyHostPorts' units in node b's own namespace.
const (
	idHostPay   = "spiffe://test.local/node/b/unit/payments.service"
	idHostWeb   = "spiffe://test.local/node/b/unit/web.service"
	idHostBatch = "spiffe://test.local/node/b/unit/batch.service"
)

// unitCgroup makes a cgroup below enrolled (a systemd unit's, in the node's
// own namespace).
func unitCgroup(t *testing.T, enrolled, name string) string {
	t.Helper()
	cg := filepath.Join(enrolled, name)
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(cg) })
	return cg
}

// TestPolicyHostPorts: a server in a unit of node b's own namespace
// (payments.service, [[capture.workloads]] ports = [9100]) is a policy
// destination by its port although the node's addresses name no workload:
// from pods on node a through the tunnel (denied: reset), and on node b
// from units of the node's namespace (on the node's address and loopback)
// and from a pod (denied: ECONNREFUSED), allowed by principal with bytes
// checked, over IPv4 and IPv6. Another port of the node is no workload's: not decided.
func TestPolicyHostPorts(t *testing.T) {
	testenv.RequirePrivileged(t)
	c := testenv.NewCluster()
	cnA, cnB := c.AddNode(t), c.AddNode(t)
	_, endB := testenv.JoinNodes(t, cnA, cnB)
	a := &podNode{node: nodeOn(t, cnA.Node), cn: cnA}
	b := &podNode{node: nodeOn(t, cnB.Node), cn: cnB}
	front, other := a.pod(), a.pod()
	local := b.pod()
	payCg := unitCgroup(t, b.enrolled, "payments.service")
	webCg := unitCgroup(t, b.enrolled, "web.service")
	batchCg := unitCgroup(t, b.enrolled, "batch.service")

	a.start("splice", workloadsConf(t, map[*testenv.Pod]string{front: idFrontend, other: idOther}))
	var cidrs []string
	for _, p := range []*testenv.Pod{front, other} {
		cidrs = append(cidrs, fmt.Sprintf("%q", netip.PrefixFrom(p.Addr4, 32)), fmt.Sprintf("%q", netip.PrefixFrom(p.Addr6, 128)))
	}
	units := fmt.Sprintf(`
[[capture.workloads]]
cgroup = %q
identity = %q
ports = [9100]

[[capture.workloads]]
cgroup = %q
identity = %q

[[capture.workloads]]
cgroup = %q
identity = %q
`, cgroupRel(t, payCg), idHostPay, cgroupRel(t, webCg), idHostWeb, cgroupRel(t, batchCg), idHostBatch)
	b.start("splice", workloadsConf(t, map[*testenv.Pod]string{local: idLocal})+units+b.tlsConf("")+fmt.Sprintf(`
[[tunnel.tls.peers]]
cidrs = [%s]
identities = [%q]
workloads = [%q, %q]

[[policy]]
name = "pay-host"
workloads = [%q]
rules = [{from = [{principals = ["test.local/ns/web/sa/frontend", "test.local/ns/pay/sa/local", "test.local/node/b/unit/web.service"]}]}]
`, strings.Join(cidrs, ", "), a.id(), idFrontend, idOther, idHostPay))
	nodeAddr := netip.AddrPortFrom(endB.Addr4, 9100).String()
	freeAddr := netip.AddrPortFrom(endB.Addr4, 9101).String()
	loop := "127.0.0.1:9100"
	nodeAddr6 := netip.AddrPortFrom(endB.Addr6, 9100).String()
	b.server(payCg, "0.0.0.0:9100")
	b.server(payCg, "[::]:9100")
	b.server(batchCg, "0.0.0.0:9101") // a unit without ports: no destination
	a.waitServed(front.Name, other.Name)
	b.waitServed(local.Name)

	// The payments unit started after smeshd: its namespace's owners
	// follow.
	deadline := time.Now().Add(5 * time.Second)
	for {
		h := testenv.StartHelper(t, batchCg, b.ns.Name, "client", "refused", nodeAddr)
		if h.Wait() == nil && strings.Contains(h.Stdout(), "ok refused") {
			break
		}
		if time.Now().After(deadline) {
			_, ids := b.admin("/debug/identities")
			t.Fatalf("same-node policy by port not in force within 5s: %s\n%s", h.Stdout()+h.Stderr(), ids)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// Same node: units of the node's namespace and a pod.
	b.client(webCg, "oneway", nodeAddr, fmt.Sprint(4<<20))
	b.client(webCg, "echo", loop, fmt.Sprint(1<<20))
	b.client(batchCg, "refused", nodeAddr)
	b.client(batchCg, "refused", loop)
	b.client(batchCg, "oneway", netip.AddrPortFrom(endB.Addr4, 9101).String(), fmt.Sprint(1<<20)) // batch's own port: no policy
	b.podClient(local, "echo", nodeAddr, fmt.Sprint(1<<20))
	// IPv6: the node's address and loopback.
	b.client(webCg, "oneway", nodeAddr6, fmt.Sprint(1<<20))
	b.client(webCg, "echo", "[::1]:9100", fmt.Sprint(1<<20))
	b.client(batchCg, "refused", nodeAddr6)
	b.client(batchCg, "refused", "[::1]:9100")
	b.podClient(local, "echo", nodeAddr6, fmt.Sprint(1<<20))
	// Across nodes: b's tunnel server decides by address and port.
	a.podClient(front, "oneway", nodeAddr, fmt.Sprint(8<<20))
	a.podClient(front, "echo", nodeAddr, fmt.Sprint(1<<20))
	a.podClient(front, "echo", nodeAddr6, fmt.Sprint(1<<20))
	a.podClient(other, "reset", nodeAddr)
	a.podClient(other, "reset", nodeAddr6)
	a.podClient(other, "oneway", freeAddr, fmt.Sprint(1<<20)) // no workload's port

	_, m := b.admin("/metrics")
	if v := testenv.Metric(t, m, "smesh_policy_denied_total", map[string]string{"path": "tunnel", "policy": "", "reason": "not_allowed"}); v < 2 {
		t.Errorf("tunnel not_allowed denials = %v, want at least 2", v)
	}
	if v := testenv.Metric(t, m, "smesh_policy_denied_total", map[string]string{"path": "same_node", "policy": "", "reason": "not_allowed"}); v < 4 {
		t.Errorf("same-node not_allowed denials = %v, want at least 4", v)
	}
	_, body := b.admin("/debug/policy")
	var dbg struct {
		Workloads []struct {
			Identity  string
			Ports     []uint16
			PortAddrs []string `json:"portAddresses"`
		}
		SameNode struct{ Problems []string }
	}
	if err := json.Unmarshal([]byte(body), &dbg); err != nil {
		t.Fatalf("/debug/policy: %v: %s", err, body)
	}
	found := false
	for _, w := range dbg.Workloads {
		if w.Identity == idHostPay {
			found = len(w.Ports) == 1 && w.Ports[0] == 9100 && slices.Contains(w.PortAddrs, nodeAddr)
		}
	}
	if !found {
		t.Errorf("/debug/policy does not show payments' port 9100 on %s: %s", nodeAddr, body)
	}
	if len(dbg.SameNode.Problems) > 0 {
		t.Errorf("/debug/policy reports problems, want none: %q", dbg.SameNode.Problems)
	}
	_, ids := b.admin("/debug/identities")
	var idDbg struct {
		Identities []struct {
			Identity string
			Ports    []uint16
		}
		PortAddresses map[string]uint32 `json:"portAddresses"`
	}
	if err := json.Unmarshal([]byte(ids), &idDbg); err != nil {
		t.Fatalf("/debug/identities: %v: %s", err, ids)
	}
	found = false
	for _, e := range idDbg.Identities {
		if e.Identity == idHostPay {
			found = slices.Equal(e.Ports, []uint16{9100})
		}
	}
	if _, ok := idDbg.PortAddresses[nodeAddr]; !ok || !found {
		t.Errorf("/debug/identities does not show payments' port: %s", ids)
	}
}
