package e2e

import (
	"fmt"
	"strings"
	"testing"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// TestTwoProgramSetsAtOnce is an experiment of docs/restart.md (3.2, "never
// two program sets at once"): a second smeshd with maps and programs of its
// own, attached to the same enrolled cgroup beside the first one's (cgroup
// multi-attach; other ports), as a successor that does not adopt would be.
// Does a same-node connection still get its bytes? It reports what
// happens; it fails only if bytes are lost or corrupted silently (the
// client checks every byte).
func TestTwoProgramSetsAtOnce(t *testing.T) {
	n := newNode(t)
	addr := "127.0.0.1:9000"
	n.server(n.enrolled, addr)
	n.start("splice", "")
	first := n.smeshd

	// The second one: its own cgroup, its own ports.
	second := *n
	second.smeshCg = testenv.NewCgroup(t)
	second.start("splice", `
[outbound]
listen = "127.0.0.1:18100"
listen6 = "[::1]:18100"
[tunnel]
listen = "[::]:18101"
[admin]
listen = "127.0.0.1:15100"`)
	if n.smeshd != first {
		t.Fatal("the harness replaced the first smeshd")
	}
	results := map[string]string{}
	for _, sc := range []struct{ name, scenario, size string }{
		{"echo 1 MB", "echo", "1000000"},
		{"echo 100 B", "echo", "100"},
		{"concurrent", "concurrent", "100000"},
	} {
		args := []string{sc.scenario, addr}
		if sc.size != "" {
			args = append(args, sc.size)
		}
		h := testenv.StartHelper(t, n.enrolled, n.ns.Name, "client", args...)
		err := h.Wait()
		out := strings.TrimSpace(h.Stdout())
		results[sc.name] = fmt.Sprintf("err=%v out=%q stderr=%q", err, out, strings.TrimSpace(h.Stderr()))
		t.Logf("two program sets, %s: %s", sc.name, results[sc.name])
	}
	t.Logf("first smeshd's counters: %+v; second's: %+v", n.stats(), second.stats())
}
