// Package testenv is the harness for smesh's kernel tests (tier 3 in
// docs/testing.md): real cgroups, real network namespaces linked by veth
// pairs, and real processes placed into them, all removed again in
// t.Cleanup, also when the test fails.
//
// Everything it creates follows the shared-machine rules: cgroups are new
// directories named smesh-test-* directly below the cgroup v2 mount,
// network namespaces are named smesh-test-* (so `ip netns exec` works and
// `make clean-test-env` finds leftovers), addresses come from 198.18.0.0/15,
// and the only processes it ever signals are the ones it started, by PID.
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
package testenv
