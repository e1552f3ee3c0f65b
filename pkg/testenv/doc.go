// Package testenv is the harness for smesh's kernel tests (tier 3 in
// docs/testing.md): real cgroups, real network namespaces linked by veth
// pairs, and real processes placed into them, all removed again in
// t.Cleanup, also when the test fails.
//
// Everything it creates follows the shared-machine rules: cgroups are new
// directories named smesh-test-*, directly below the cgroup v2 mount or, for
// a pod, below a cgroup the test made; network namespaces are named
// smesh-test-* (so `ip netns exec` works and `make clean-test-env` finds
// leftovers), addresses come from 198.18.0.0/15 and fd00:5e::/32, and the
// only processes it ever signals are the ones it started, by PID (or, when a
// pod is deleted, the processes in the pod's cgroup).
//
// The mechanics (namespaces, veth pairs, processes born into a cgroup,
// tearing cgroups down) live in pkg/sandbox and pkg/cgroups, which
// `smeshd bench` uses too; this package adds what tests need on top: names,
// the address plan, t.Cleanup, skip-or-fail rules and captured output.
//
// A test package that starts helper processes re-executes its own test
// binary; its TestMain must hand control to [RunHelpers] before m.Run:
//
//	func TestMain(m *testing.M) {
//		testenv.RunHelpers(map[string]testenv.HelperFunc{
//			"echo": echoHelper,
//		})
//		os.Exit(m.Run())
//	}
//
// A typical test:
//
//	testenv.RequirePrivileged(t)
//	cg := testenv.NewCgroup(t)
//	a, b := testenv.NewNode(t), testenv.NewNode(t)
//	addrA, addrB := testenv.Link(t, a, b)
//	srv := testenv.StartHelper(t, cg, b.Name, "echo", addrB.String())
//	ready, err := srv.ReadLine(5 * time.Second)
//
// A test world that looks like a Kubernetes cluster: nodes with a bridge
// each, pods on them in cgroups below an enrolled one, and a wire between
// the nodes that routes pod to pod, IPv4 and IPv6:
//
//	enrolled := testenv.NewCgroup(t)
//	c := testenv.NewCluster()
//	a, b := c.AddNode(t), c.AddNode(t)
//	testenv.JoinNodes(t, a, b)
//	client, server := a.AddPod(t, enrolled), b.AddPod(t, enrolled)
//	srv := testenv.StartHelper(t, server.Cgroup, server.Name, "echo", server.Addr6.String())
package testenv
