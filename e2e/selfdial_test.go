package e2e

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// openFiles counts the open file descriptors of process pid, leaving out
// connections to its admin endpoint (port 15000): those are the test's own
// requests, and the server closes them on its own schedule after the
// client has gone, so counting them would make two snapshots differ by
// one at random.
func openFiles(t *testing.T, pid int) int {
	t.Helper()
	admin := adminSockets(t, pid)
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err == nil && admin[target] {
			continue
		}
		n++
	}
	return n
}

// adminSockets returns, as their /proc/PID/fd link targets
// ("socket:[INODE]"), the TCP sockets of pid's network namespace that are
// connections on local port 15000 (not the listener).
func adminSockets(t *testing.T, pid int) map[string]bool {
	t.Helper()
	socks := make(map[string]bool)
	for _, table := range []string{"tcp", "tcp6"} {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, table))
		if err != nil {
			continue // no IPv6 in this kernel
		}
		for i, line := range strings.Split(string(data), "\n") {
			f := strings.Fields(line)
			if i == 0 || len(f) < 10 {
				continue
			}
			// f[1] local ADDR:PORT in hex, f[3] state (0A: listening), f[9] inode.
			const listening = "0A"
			if strings.HasSuffix(f[1], ":3A98") && f[3] != listening {
				socks["socket:["+f[9]+"]"] = true
			}
		}
	}
	return socks
}

// residentKiB is the resident set size of process pid.
func residentKiB(t *testing.T, pid int) int {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kib, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			if err != nil {
				t.Fatal(err)
			}
			return kib
		}
	}
	t.Fatalf("no VmRSS in /proc/%d/status", pid)
	return 0
}

// nft loads a ruleset into the node's network namespace (it goes away
// with the namespace).
func (n *node) nft(ruleset string) {
	n.t.Helper()
	nft := testenv.RequireCommand(n.t, "nft")
	path := filepath.Join(n.t.TempDir(), "ruleset.nft")
	if err := os.WriteFile(path, []byte(ruleset), 0o644); err != nil {
		n.t.Fatal(err)
	}
	h := testenv.StartProcess(n.t, "", n.ns.Name, nft, "-f", path)
	if err := h.Wait(); err != nil {
		n.t.Fatalf("nft -f: %v\n%s", err, h.Stderr())
	}
}

// sockoptLine returns the line of the "sockopts" helper's output about
// call, run in cgroup cg against addr.
func (n *node) sockoptLine(cg, addr, call string) string {
	n.t.Helper()
	h := testenv.StartHelper(n.t, cg, n.ns.Name, "sockopts", addr)
	if err := h.Wait(); err != nil {
		n.t.Fatalf("sockopts: %v %s", err, h.Stderr())
	}
	for line := range strings.SplitSeq(h.Stdout(), "\n") {
		if strings.HasPrefix(line, call+": ") {
			return line
		}
	}
	n.t.Fatalf("sockopts printed no %q line:\n%s", call, h.Stdout())
	return ""
}

// TestSelfDialConntrack is issue 10's self-dial loop: on a node where
// conntrack tracks connections (here an nftables rule with ct state, as
// kube-proxy or any stateful firewall has), a process that connects straight
// to smeshd's outbound port, inside the mesh or not, once made smeshd dial
// itself about 10,000 times: conntrack answered SO_ORIGINAL_DST with that
// very port. Now each such connection is reset once, smeshd dials nothing,
// its open files and memory stay flat, and captured traffic keeps flowing.
// Apps that ask SO_ORIGINAL_DST for their own reasons still get the
// kernel's answer; only smeshd's own cgroup gets smesh's alone.
func TestSelfDialConntrack(t *testing.T) {
	a, _, server := twoNodes(t, "splice", "")
	a.nft("table ip smesh-test-ct {\n\tchain o {\n\t\ttype filter hook output priority 0;\n\t\tct state new counter\n\t}\n}\n")

	// Conntrack answers SO_ORIGINAL_DST here: to a process outside the
	// mesh and to an enrolled one (the kernel's answer: 127.0.0.1:9000),
	// not to smeshd's cgroup.
	a.server("", "127.0.0.1:9000")
	outside := testenv.NewCgroup(t)
	const kernelAnswer = "SO_ORIGINAL_DST uncaptured: len=16 err=<nil> value=020023287f000001"
	for name, cg := range map[string]string{"outside the mesh": outside, "enrolled": a.enrolled} {
		if line := a.sockoptLine(cg, "127.0.0.1:9000", "SO_ORIGINAL_DST uncaptured"); line != kernelAnswer {
			t.Errorf("%s, with conntrack: %q, want the kernel's answer %q", name, line, kernelAnswer)
		}
	}
	if line := a.sockoptLine(a.smeshCg, "127.0.0.1:9000", "SO_ORIGINAL_DST uncaptured"); strings.Contains(line, "err=<nil>") {
		t.Errorf("in smeshd's cgroup, with conntrack: %q, want an error (smesh has no entry)", line)
	}

	metrics := func() (refused, copied float64) {
		_, text := a.admin("/metrics")
		if strings.Contains(text, "smesh_refused_connections_total{") { // none before the first
			refused = testenv.Metric(t, text, "smesh_refused_connections_total", map[string]string{"reason": "no_original_destination"})
		}
		return max(refused, 0), testenv.Metric(t, text, "smesh_connections_total", map[string]string{"path": "copy"})
	}
	refusedBefore, _ := metrics()
	pid := a.smeshd.PID()
	files, rss := openFiles(t, pid), residentKiB(t, pid)

	const direct = 20
	for i := range direct {
		cg := outside
		if i%2 == 1 {
			cg = a.enrolled
		}
		a.client(cg, "direct", "127.0.0.1:18000")
	}
	refused, copied := metrics()
	if refused-refusedBefore != direct {
		t.Errorf("smeshd refused %v connections for want of an original destination, want exactly the %d made straight to it", refused-refusedBefore, direct)
	}
	if copied > 0 {
		t.Errorf("smeshd relayed %v connections on this node, want none (it dialled itself)", copied)
	}
	if n := openFiles(t, pid); n > files+8 {
		t.Errorf("smeshd has %d open files, %d before", n, files)
	}
	if kib := residentKiB(t, pid); kib > rss+32<<10 {
		t.Errorf("smeshd's resident memory grew from %d KiB to %d KiB", rss, kib)
	}
	if strings.Contains(a.smeshd.Stderr(), `"reason":"own_listener"`) {
		t.Error("an original destination was smeshd's own listener: the answer came from conntrack, not smesh")
	}

	// Captured traffic, with conntrack tracking it too.
	if !captured(a, a.enrolled, server) {
		t.Error("with conntrack active, a connection to the other node is not captured")
	}
	a.client(a.enrolled, "oneway", server, "10000000")
	a.client(a.enrolled, "echo", server, "10000000")
}
