package e2e

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// TestEnrolledCgroupRemovedAndMadeAgain: an enrolled cgroup that is removed
// while smeshd runs (as systemd removes a stopped slice's) is reported, by
// /readyz and /metrics, and one made again under the same path is a new
// cgroup that gets the capture attached: no restart needed.
func TestEnrolledCgroupRemovedAndMadeAgain(t *testing.T) {
	a, _, server := twoNodes(t, "splice", "")
	if !captured(a, a.enrolled, server) {
		t.Fatal("not captured before the cgroup went")
	}
	metricIs := func(name string, labels map[string]string, want float64) bool {
		_, text := a.admin("/metrics")
		return testenv.Metric(t, text, name, labels) == want
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("smeshd did not notice: %s\n%s", what, a.smeshd.Stderr())
			}
		}
	}

	// The clients of captured() have exited: the cgroup is empty.
	if err := os.Remove(a.enrolled); err != nil {
		t.Fatalf("removing the enrolled cgroup: %v", err)
	}
	waitFor("/readyz 503 naming the missing cgroup", func() bool {
		code, body := a.admin("/readyz")
		return code == 503 && strings.Contains(body, a.enrolled)
	})
	if !metricIs("smesh_enrolled_cgroups", map[string]string{"state": "missing"}, 1) ||
		!metricIs("smesh_enrolled_cgroup_events_total", map[string]string{"event": "removed"}, 1) {
		_, text := a.admin("/metrics")
		t.Errorf("metrics after the removal:\n%s", grepLines(text, "smesh_enrolled"))
	}

	if err := os.Mkdir(a.enrolled, 0o755); err != nil {
		t.Fatal(err)
	}
	waitFor("/readyz 200 again", func() bool { code, _ := a.admin("/readyz"); return code == 200 })
	if n := testenv.AttachedPrograms(t, a.enrolled, ebpf.AttachCGroupInet4Connect); n != 1 {
		t.Errorf("%d connect4 programs on the cgroup made again, want 1", n)
	}
	if !captured(a, a.enrolled, server) {
		t.Error("a connection from the cgroup made again was not captured")
	}
	a.client(a.enrolled, "echo", server, "1000000")
	if !metricIs("smesh_enrolled_cgroups", map[string]string{"state": "attached"}, 1) ||
		!metricIs("smesh_enrolled_cgroup_events_total", map[string]string{"event": "created"}, 1) {
		_, text := a.admin("/metrics")
		t.Errorf("metrics after the cgroup came back:\n%s", grepLines(text, "smesh_enrolled"))
	}
	for _, want := range []string{"enrolled cgroup removed", "enrolled cgroup appeared"} {
		if !strings.Contains(a.smeshd.Stderr(), want) {
			t.Errorf("smeshd did not log %q", want)
		}
	}
}

// grepLines returns the lines of text that contain s.
func grepLines(text, s string) string {
	var out []string
	for line := range strings.Lines(text) {
		if strings.Contains(line, s) {
			out = append(out, strings.TrimSpace(line))
		}
	}
	return strings.Join(out, "\n")
}
