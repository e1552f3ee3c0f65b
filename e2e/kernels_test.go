package e2e

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// scaleEnv divides the data sizes of the tests that move the most bytes,
// and their counts of exchanges and connections. `make kernel-test` sets
// it: it runs these tests on other kernels in an emulated machine, where
// everything runs 15 to 30 times slower than here, and says so in its
// report. Unset, every size is as written.
const scaleEnv = "SMESH_TEST_SCALE"

// dataScale is SMESH_TEST_SCALE, or 1.
func dataScale() int64 {
	v := os.Getenv(scaleEnv)
	if v == "" {
		return 1
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < 1 {
		panic(fmt.Sprintf("%s=%q: want a whole number, 1 or more", scaleEnv, v))
	}
	return n
}

// scaled is n (bytes, exchanges, connections) divided by
// SMESH_TEST_SCALE, at least 1.
func scaled(n int64) int64 { return max(n/dataScale(), 1) }

// scaledArg is scaled(n) as a client argument.
func scaledArg(n int64) string { return strconv.FormatInt(scaled(n), 10) }

// concurrentConns is how many connections the "concurrent" scenario
// opens at once: 200, divided by SMESH_TEST_SCALE down to 20 at least
// (under emulation, 200 TLS handshakes at once outlast the tunnel's
// handshake timeout).
func concurrentConns() int { return int(max(scaled(200), 20)) }

// concurrentArgs are the "concurrent" scenario's arguments for
// concurrentConns connections to addr of up to maxSize bytes, and the bytes
// they move in all (even connections send theirs one way, odd ones echo
// them back), the command bytes and the server's answers left out.
func concurrentArgs(addr string, maxSize int64) (args []string, moved uint64) {
	conns := concurrentConns()
	for i := range conns {
		moved += uint64(concurrentSize(i, maxSize) * int64(1+i%2))
	}
	return []string{"concurrent", addr, fmt.Sprint(maxSize), fmt.Sprint(conns)}, moved
}

// requireBoundedSplice skips a test of the bound on spliced queues on a
// kernel that cannot bound them (smeshd splices there only when told to,
// without the bound: TestModeFollowsKernel checks that), or fails it when
// SMESH_REQUIRE_PRIVILEGED=1: CI's own kernel must bound them.
func requireBoundedSplice(t *testing.T) {
	t.Helper()
	err := datapath.Missing(datapath.ProbeModes(), "bounded splice")
	if err == nil {
		return
	}
	testenv.SkipOrFail(t, "this kernel cannot bound spliced queues (Linux %s): %v", datapath.KernelRelease(), err)
}

// TestModeFollowsKernel: smeshd picks its data path by what this kernel
// can do, says so, and the path it picked carries the bytes. Where the
// kernel can bound a spliced hop's queue, "auto" splices; where it cannot
// (before Linux 6.2), "auto" copies and the log names what is missing, and
// an explicit "splice" splices without the bound, with a warning. "copy"
// works everywhere.
func TestModeFollowsKernel(t *testing.T) {
	bounded := datapath.Missing(datapath.ProbeModes(), "bounded splice") == nil
	t.Logf("Linux %s, bounded splice: %v", datapath.KernelRelease(), bounded)
	for _, c := range []struct {
		mode     string
		want     string // the mode smeshd runs
		logs     string // a line its log must have, "" for none
		spliced  bool
		captured bool // same-node connections relayed by smeshd
	}{
		{"auto", pick(bounded, "splice", "copy"), pick(bounded, "", "cannot splice with a bound"), bounded, !bounded},
		{"splice", "splice", pick(bounded, "", "SPLICING WITHOUT A BOUND"), true, false},
		{"copy", "copy", "", false, true},
	} {
		t.Run(c.mode, func(t *testing.T) {
			n, addr := sameNode(t, c.mode)
			ready := readyLine(t, n)
			stderr := n.smeshd.Stderr()
			if want := fmt.Sprintf(`"mode":%q`, c.want); !strings.Contains(ready, want) {
				t.Errorf("smeshd ready with %s, want %s:\n%s", ready, want, stderr)
			}
			if c.logs != "" && !strings.Contains(stderr, c.logs) {
				t.Errorf("smeshd's log lacks %q:\n%s", c.logs, stderr)
			}
			if strings.Contains(stderr, "WITHOUT A BOUND") && bounded {
				t.Errorf("smeshd warns of splicing without a bound on a kernel that has it:\n%s", stderr)
			}
			size := scaled(64 << 20)
			before := n.stats()
			n.client(n.enrolled, "echo", addr, fmt.Sprint(size))
			moved := n.stats().carried() - before.carried()
			if floor := 2 * uint64(size); c.spliced && moved < floor {
				t.Errorf("spliced %d bytes, want at least %d", moved, floor)
			}
			if !c.spliced && moved != 0 {
				t.Errorf("spliced %d bytes in %s mode", moved, c.want)
			}
			if got := captured(n, n.enrolled, addr); got != c.captured {
				t.Errorf("same-node connection captured = %v, want %v", got, c.captured)
			}
		})
	}
}

func pick[T any](cond bool, yes, no T) T {
	if cond {
		return yes
	}
	return no
}

// readyLine is smeshd's "smeshd ready" log line, which it writes just
// after it tells that it is ready.
func readyLine(t *testing.T, n *node) string {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		for line := range strings.Lines(n.smeshd.Stderr()) {
			if strings.Contains(line, `"message":"smeshd ready"`) {
				return strings.TrimSpace(line)
			}
		}
	}
	return "(no ready line in 10s)"
}
