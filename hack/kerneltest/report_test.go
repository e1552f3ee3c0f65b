package main

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/smesh-dev/smesh/hack/internal/gotest"
)

// guestStream is what a guest writes to its results port: marker lines
// around a -test.v=test2json stream (^V before each framing line).
const guestStream = `@@kerneltest boot 3.50
@@kerneltest kernel 6.1.0-56-amd64
@@kerneltest begin check
kernel: ok       BTF (/sys/kernel/btf/vmlinux)
kernel: MISSING  bounded splice (program smesh_skmsg) (needed for bounded splice)
datapath mode: copy

@@kerneltest end check 0 9.8
@@kerneltest begin e2e
e2e: data sizes and counts of exchanges divided by 16 (SMESH_TEST_SCALE)
^V=== RUN   TestPass
^V--- PASS: TestPass (1.50s)
^V=== RUN   TestNginx
    realclients_test.go:21: test needs the command nginx: exec: "nginx": executable file not found in $PATH
^V--- SKIP: TestNginx (0.00s)
^V=== RUN   TestBounded
    bounded_test.go:38: this kernel cannot bound spliced queues (Linux 6.1.0-56-amd64): bounded splice: kfunc "bpf_cast_to_kern_ctx": not supported
^V--- SKIP: TestBounded (2.26s)
^V=== RUN   TestOddSkip
    x_test.go:5: kernel test needs root (running as euid 1000)
^V--- SKIP: TestOddSkip (0.00s)
^V=== RUN   TestFails
^V=== RUN   TestFails/sub
    x_test.go:9: bytes differ
        {"level":"debug","message":"noise"}
^V--- FAIL: TestFails/sub (0.10s)
^V--- FAIL: TestFails (0.20s)
^VFAIL

@@kerneltest end e2e 1 50.0
@@kerneltest begin datapath
^V=== RUN   TestHalf
`

func collect(t *testing.T, stream string) *guestRun {
	t.Helper()
	var progress []string
	c := &collector{progress: func(f string, a ...any) { progress = append(progress, f) }}
	for l := range strings.Lines(strings.ReplaceAll(stream, "^V", "\x16")) {
		c.line(strings.TrimRight(l, "\n"))
	}
	if err := c.run.parseTests(context.Background(), goCommand(t)); err != nil {
		t.Fatal(err)
	}
	return &c.run
}

func TestJudge(t *testing.T) {
	r := collect(t, guestStream)
	if r.kernel != "6.1.0-56-amd64" || r.boot != 3.5 || r.done != 0 {
		t.Errorf("kernel %q, boot %v, done %v", r.kernel, r.boot, r.done)
	}
	left := map[string]map[string]string{"e2e": {"TestSlow": "userspace"}}
	got := map[string]verdict{}
	var order []string
	for _, v := range r.judge(true, left, false) {
		got[v.step+"."+v.test] = v
		order = append(order, v.step+"."+v.test)
	}
	want := map[string]string{
		"e2e.TestPass":      "PASS",
		"e2e.TestNginx":     "NOT RUN",
		"e2e.TestBounded":   "N/A",
		"e2e.TestOddSkip":   "FAIL",
		"e2e.TestFails":     "FAIL",
		"e2e.TestSlow":      "NOT SEL",
		"datapath.TestHalf": "FAIL",
		"datapath.(binary)": "FAIL",
	}
	for name, status := range want {
		if got[name].status != status {
			t.Errorf("%s: %q, want %q (%v)", name, got[name].status, status, got[name].detail)
		}
	}
	if len(got) != len(want) {
		t.Errorf("verdicts for %v, want %d", order, len(want))
	}
	if g := got["e2e.TestPass"].elapsed; g != 1.5 {
		t.Errorf("TestPass took %v, want 1.5", g)
	}
	fails := strings.Join(got["e2e.TestFails"].detail, "\n")
	if !strings.Contains(fails, "bytes differ") || strings.Contains(fails, "noise") {
		t.Errorf("TestFails detail: %s", fails)
	}
	if d := got["e2e.TestNginx"].detail; !slices.Contains(d, "TestNginx: the guest has no nginx:") {
		t.Errorf("TestNginx detail: %q", d)
	}

	// Where smeshd check found bounded splice, a test that says the
	// kernel lacks it is wrong.
	for _, v := range r.judge(false, nil, false) {
		if v.test == "TestBounded" && v.status != "FAIL" {
			t.Errorf("TestBounded skipped on a kernel with bounded splice: %s", v.status)
		}
	}
}

func TestConsoleTrouble(t *testing.T) {
	console := `[    3.1] Run /init as init process
[   52.2] hrtimer: interrupt took 19200180 ns
[   60.0] WARNING: CPU: 1 PID: 300 at net/core/skmsg.c:700 sk_psock_drop+0x1/0x2
[   60.1] Call Trace:
`
	got := consoleTrouble([]byte(console))
	if len(got) != 2 || !strings.Contains(got[0], "skmsg.c") {
		t.Errorf("trouble: %q", got)
	}
}

func goCommand(t *testing.T) string {
	g, err := gotest.Command()
	if err != nil {
		t.Fatal(err)
	}
	return g
}
