package e2e

import (
	"bytes"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// TestSmeshdUnderIPNetnsExec starts smeshd as `ip netns exec NODE smeshd -c
// FILE`, as people start daemons in a network namespace. ip gives it a mount
// namespace of its own with a fresh /sys, without the cgroup v2 mount:
// smeshd mounts the hierarchy there, at the same path, and works, while the
// test's own mounts stay as they were.
func TestSmeshdUnderIPNetnsExec(t *testing.T) {
	n := newNode(t)
	ip := testenv.RequireCommand(t, "ip")
	mounts := func(pid string) string {
		t.Helper()
		data, err := os.ReadFile("/proc/" + pid + "/mounts")
		if err != nil {
			t.Fatal(err)
		}
		// Named network namespaces come and go with the tests that run
		// meanwhile (other packages of `go test ./...`, other users of
		// the machine); /run/netns propagates them into every mount
		// namespace.
		var kept []string
		for line := range strings.Lines(string(data)) {
			if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], "/run/netns/") {
				continue
			}
			kept = append(kept, line)
		}
		return strings.Join(kept, "")
	}
	before := mounts("self")
	mount, err := testenv.Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}

	n.server(n.enrolled, "127.0.0.1:9000")
	n.startVia([]string{ip, "netns", "exec", n.ns.Name}, "splice", "")

	// ip execs smeshd: the helper's PID is smeshd's.
	pid := strconv.Itoa(n.smeshd.PID())
	self, _ := os.Readlink("/proc/self/ns/mnt")
	theirs, err := os.Readlink("/proc/" + pid + "/ns/mnt")
	if err != nil || theirs == self {
		t.Fatalf("smeshd's mount namespace %q (%v) is not a new one (the test's: %q)", theirs, err, self)
	}
	var cgroup2 []string
	for line := range strings.Lines(mounts(pid)) {
		if f := strings.Fields(line); len(f) > 2 && f[2] == "cgroup2" {
			cgroup2 = append(cgroup2, f[1])
		}
	}
	if len(cgroup2) != 1 || cgroup2[0] != mount {
		t.Errorf("smeshd's mount namespace has cgroup2 on %v, want once on %s", cgroup2, mount)
	}

	// The capture is attached to the enrolled cgroup: a same-node
	// connection is spliced, every byte checked.
	before1 := n.stats()
	n.client(n.enrolled, "oneway", "127.0.0.1:9000", "1000000")
	if moved := n.stats().bytes - before1.bytes; moved < 1000000 {
		t.Errorf("spliced %d bytes, want at least 1000000", moved)
	}
	if code, body := n.admin("/readyz"); code != 200 {
		t.Errorf("/readyz: %d %q", code, body)
	}
	n.stop()

	if after := mounts("self"); after != before {
		t.Errorf("the test's mounts changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if !bytes.Contains([]byte(before), []byte(" "+mount+" cgroup2 ")) {
		t.Errorf("the test's own cgroup2 mount %s is not in its mount table", mount)
	}
}
