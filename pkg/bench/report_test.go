package bench

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The table and the chart say how many rounds the numbers come from, in
// English: "1 round", "3 rounds".
func TestReportRounds(t *testing.T) {
	for _, c := range []struct {
		rounds           int
		inTable, inChart string
	}{
		{1, "; 1 round of 1s per workload\n", "; 1 round</text>"},
		{3, "; 3 rounds of 1s per workload, medians\n", "; medians of 3 rounds</text>"},
	} {
		r := &Report{
			Machine:  Machine{Kernel: "6.18", CPU: "AMD EPYC", Cores: 2},
			Duration: "1s",
			Rounds:   c.rounds,
			Results: []Result{
				{Mode: "direct", ThroughputGbps: 10, RRP50us: 20, RRP99us: 40, ConnPerSec: 5000, DataVerified: true},
				{Mode: "splice", ThroughputGbps: 20, RRP50us: 18, RRP99us: 30, ConnPerSec: 4000, DataVerified: true},
			},
		}
		var table bytes.Buffer
		r.WriteTable(&table)
		svgPath := filepath.Join(t.TempDir(), "bench.svg")
		if err := r.WriteSVGFile(svgPath); err != nil {
			t.Fatal(err)
		}
		svg, err := os.ReadFile(svgPath)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(table.String(), c.inTable) {
			t.Errorf("%d rounds: the table's first line does not say %q:\n%s", c.rounds, c.inTable, table.String())
		}
		if !bytes.Contains(svg, []byte(c.inChart)) {
			t.Errorf("%d rounds: the chart does not say %q", c.rounds, c.inChart)
		}
		for _, out := range []string{table.String(), string(svg)} {
			if strings.Contains(out, " 1 rounds") {
				t.Errorf("%d rounds: says \"1 rounds\"", c.rounds)
			}
		}
	}
}

// Each mode's ratios are to the baseline of its world, measured in the same
// run: the service modes to kube-proxy's DNAT, not to the bare bridge.
func TestBaselines(t *testing.T) {
	for mode, want := range map[string]string{
		"direct": "direct", "copy": "direct", "splice": "direct",
		"veth": "veth", "tunnel": "veth",
		"bridge": "bridge", "pods": "bridge",
		"bridge-svc": "bridge-svc", "pods-svc": "bridge-svc",
	} {
		if got := baseline(mode); got != want {
			t.Errorf("baseline(%q) = %q, want %q", mode, got, want)
		}
	}
	for _, m := range allModes {
		if baseline(m) == "" {
			t.Errorf("mode %s has no baseline", m)
		}
	}
}

// Holding connections across nodes reports both nodes' smeshd, each with
// its memory per connection above its idle size.
func TestReportHeldBothNodes(t *testing.T) {
	r := &Report{
		Machine: Machine{Kernel: "6.18", CPU: "AMD EPYC", Cores: 2}, Duration: "1s", Rounds: 1,
		Held: []Held{
			{Mode: "veth", Conns: 2000, KernelBytesPerConn: 9000},
			{Mode: "tunnel", Conns: 2000, KernelBytesPerConn: 20000, Smeshds: []HeldSmeshd{
				{Node: "sending", IdleRSSMiB: 30, RSSMiB: 90, KiBPerConn: 30.7},
				{Node: "receiving", IdleRSSMiB: 28, RSSMiB: 68, KiBPerConn: 20.5},
			}},
		},
	}
	var table bytes.Buffer
	r.WriteTable(&table)
	for _, want := range []string{"sending", "receiving", "30.7", "20.5", "KiB/conn"} {
		if !strings.Contains(table.String(), want) {
			t.Errorf("the held table lacks %q:\n%s", want, table.String())
		}
	}
}

// The policy section compares each policy mode with its base from the same
// run, and adds lines without changing the table above it.
func TestReportPolicy(t *testing.T) {
	r := &Report{
		Machine: Machine{Kernel: "6.18", CPU: "AMD EPYC", Cores: 2}, Duration: "1s", Rounds: 3,
		Results: []Result{
			{Mode: "tunnel-pods", ThroughputGbps: 4, RRP50us: 100, RRP99us: 200, ConnPerSec: 2000, DataVerified: true},
			{Mode: "tunnel-pods-policy", ThroughputGbps: 3, RRP50us: 110, RRP99us: 200, ConnPerSec: 1000, DataVerified: true},
			{Mode: "pods", ThroughputGbps: 20, RRP50us: 10, RRP99us: 20, ConnPerSec: 5000, DataVerified: true},
		},
	}
	var before bytes.Buffer
	r.WriteTable(&before)
	r.Policy = &PolicyReport{Rules: 100, DecideP50ns: 1200, DecideNoneP50ns: 30, Pairs: []PolicyPair{
		{Mode: "tunnel-pods-policy", Base: "tunnel-pods", IntruderProbe: "refused: EOF", BaseIntruderProbe: "allowed", ClientProbe: "allowed"},
		{Mode: "pods-policy", Base: "pods", IntruderProbe: "refused: connection refused", ClientProbe: "allowed"},
	}}
	r.policyRatios()
	p := r.Policy.Pairs[0]
	if p.ThroughputRatio != 0.75 || p.RRP50Ratio != 1.1 || p.RRP99Ratio != 1 || p.ConnRatio != 0.5 || p.ConnAddedUs != 500 {
		t.Errorf("tunnel-pods-policy against tunnel-pods: %+v", p)
	}
	if q := r.Policy.Pairs[1]; q.ThroughputRatio != 0 || q.ConnAddedUs != 0 {
		t.Errorf("pods-policy without a result has ratios: %+v", q)
	}
	var after bytes.Buffer
	r.WriteTable(&after)
	if !strings.HasPrefix(after.String(), before.String()) {
		t.Errorf("the policy section changed the table:\n%s\nwas\n%s", after.String(), before.String())
	}
	for _, want := range []string{
		"policy: 100 [[policy]] rules in force",
		"refused/allowed",
		"Set.Decide p50 (in the bench process): 100 rules 1200 ns, none 30 ns",
	} {
		if !strings.Contains(after.String(), want) {
			t.Errorf("no %q in:\n%s", want, after.String())
		}
	}
	_, section, _ := strings.Cut(after.String(), "policy: 100")
	want := "tunnel-pods-policy tunnel-pods 0.750x 1.100x 1.000x 0.500x +500.0 refused/allowed"
	found := false
	for line := range strings.Lines(section) {
		found = found || strings.Join(strings.Fields(line), " ") == want
	}
	if !found {
		t.Errorf("no line %q in the policy section:\n%s", want, section)
	}
}
