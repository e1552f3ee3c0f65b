package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/bench"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// asSmeshd makes the test binary behave as smeshd when the bench re-executes
// it (as its daemon and agents).
const asSmeshd = "SMESH_TEST_RUN_AS_SMESHD"

func TestMain(m *testing.M) {
	// Helpers first: they inherit asSmeshd from the test that starts them.
	testenv.RunHelpers(map[string]testenv.HelperFunc{"echo-loop": echoLoop, "hold-echo": holdEcho, "wait": waitStdin})
	if os.Getenv(asSmeshd) == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestCheckNamesUnknownKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "bad.toml")
	os.WriteFile(path, []byte("[capture]\ncgroups = [\"x\"]\nexlude_ports = [22]\n"), 0o644)
	var out, errOut bytes.Buffer
	err := run(context.Background(), []string{"check", "-c", path}, &out, &errOut, nil)
	if err == nil || !strings.Contains(err.Error(), "capture.exlude_ports") || !strings.Contains(err.Error(), "line 3") {
		t.Fatalf("check of a config with an unknown key: %v", err)
	}
}

func TestUsageErrors(t *testing.T) {
	for _, args := range [][]string{{"frobnicate"}, {}, {"check"}, {"-c", "x.toml", "extra"}} {
		var out, errOut bytes.Buffer
		if err := run(context.Background(), args, &out, &errOut, nil); err == nil {
			t.Errorf("smeshd %v: no error", args)
		}
	}
}

// TestBenchShort runs a short bench of every mode through the real data
// paths and checks that each produced numbers and that its bytes matched.
func TestBenchShort(t *testing.T) {
	testenv.RequirePrivileged(t)
	t.Setenv(asSmeshd, "1")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	var table, progress bytes.Buffer
	rep, err := bench.Run(context.Background(), bench.Options{
		Duration: 200 * time.Millisecond,
		Rounds:   1,
		Modes:    []string{"direct", "copy", "splice", "veth", "tunnel"},
		Conns:    100,
		Exe:      exe,
		Progress: &progress,
	}, &table)
	if err != nil {
		t.Fatalf("bench: %v\n%s", err, table.String())
	}
	t.Log("\n" + table.String())
	// Not a terminal: a plain line per phase, no terminal control.
	wantProgress := "smeshd bench: setting up namespaces, cgroups and smeshd\n" +
		"smeshd bench: warm-up round (discarded)\n" +
		"smeshd bench: round 1/1\n" +
		"smeshd bench: holding 100 connections per mode\n"
	if progress.String() != wantProgress {
		t.Errorf("progress into a buffer:\n%q\nwant\n%q", progress.String(), wantProgress)
	}
	if !strings.Contains(table.String(), "; 1 round of 200ms per workload\n") {
		t.Errorf("the table does not say it is from 1 round of 200ms:\n%s", table.String())
	}
	if len(rep.Results) != 5 {
		t.Fatalf("got %d results, want 5", len(rep.Results))
	}
	for _, r := range rep.Results {
		if !r.DataVerified || r.ThroughputGbps <= 0 || r.RRP50us <= 0 || r.RRP99us < r.RRP50us || r.ConnPerSec <= 0 || r.CPUSeconds <= 0 {
			t.Errorf("mode %s: incomplete or unverified result %+v", r.Mode, r)
		}
		noMesh := r.Mode == "direct" || r.Mode == "veth"
		if noMesh != (r.SmeshdPeakRSSMiB == 0) {
			t.Errorf("mode %s: smeshd peak RSS %v", r.Mode, r.SmeshdPeakRSSMiB)
		}
	}
	if len(rep.Held) != 5 {
		t.Errorf("held connections reported for %d modes, want 5", len(rep.Held))
	}

	// The JSON has the shape of the contract in the design document.
	path := filepath.Join(t.TempDir(), "bench.json")
	if err := rep.WriteJSONFile(path); err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Machine map[string]any   `json:"machine"`
		Results []map[string]any `json:"results"`
	}
	data, _ := os.ReadFile(path)
	if err := json.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	// A missing key or one of another type must fail: the assertions
	// yield "" and 0 for both.
	if kernel, _ := doc.Machine["kernel"].(string); kernel == "" {
		t.Errorf("machine lacks a kernel release: %v", doc.Machine)
	}
	if cores, _ := doc.Machine["cores"].(float64); cores < 1 {
		t.Errorf("machine lacks a core count: %v", doc.Machine)
	}
	for _, r := range doc.Results {
		for _, k := range []string{"mode", "throughput_gbps", "rr_p50_us", "rr_p99_us", "conn_per_s", "cpu_seconds"} {
			if _, ok := r[k]; !ok {
				t.Errorf("result lacks %q: %v", k, r)
			}
		}
	}
	svg := filepath.Join(t.TempDir(), "bench.svg")
	if err := rep.WriteSVGFile(svg); err != nil {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile(svg); !bytes.Contains(data, []byte("<svg")) || !bytes.Contains(data, []byte("splice")) {
		t.Error("the chart is not an SVG naming the modes")
	}
	// Nothing of the bench is left.
	if ents, _ := os.ReadDir("/run/netns"); ents != nil {
		for _, e := range ents {
			// Only this process's: other benches may run on the machine.
			if strings.HasPrefix(e.Name(), fmt.Sprintf("smesh-bench-%d-", os.Getpid())) {
				t.Errorf("network namespace %s left behind", e.Name())
			}
		}
	}
}

// TestBenchServices runs the service modes shortly: a pod dials a ClusterIP
// in front of another pod, through kube-proxy's nftables DNAT on the node
// (bridge-svc) and translated by smesh in connect4 (pods-svc), whose bytes
// must then go spliced; then again with kube-proxy's rules on pods-svc's
// node too (--kube-proxy), whose conntrack then sees the meshed packets.
func TestBenchServices(t *testing.T) {
	testenv.RequirePrivileged(t)
	testenv.RequireCommand(t, "nft")
	t.Setenv(asSmeshd, "1")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, kubeProxy := range []bool{false, true} {
		t.Run(fmt.Sprintf("kube-proxy=%v", kubeProxy), func(t *testing.T) {
			benchServices(t, exe, kubeProxy)
		})
	}
}

func benchServices(t *testing.T, exe string, kubeProxy bool) {
	var table bytes.Buffer
	rep, err := bench.Run(context.Background(), bench.Options{
		Duration:  200 * time.Millisecond,
		Rounds:    1,
		Modes:     []string{"bridge-svc", "pods-svc"},
		Conns:     100,
		Exe:       exe,
		KubeProxy: kubeProxy,
	}, &table)
	if err != nil {
		t.Fatalf("bench: %v\n%s", err, table.String())
	}
	t.Log("\n" + table.String())
	if len(rep.Results) != 2 {
		t.Fatalf("got %d results, want 2", len(rep.Results))
	}
	for _, r := range rep.Results {
		if !r.DataVerified || r.ThroughputGbps <= 0 || r.RRP50us <= 0 || r.ConnPerSec <= 0 {
			t.Errorf("mode %s: incomplete or unverified result %+v", r.Mode, r)
		}
		meshed := r.Mode == "pods-svc"
		if meshed != (r.SmeshdPeakRSSMiB > 0) {
			t.Errorf("mode %s: smeshd peak RSS %v", r.Mode, r.SmeshdPeakRSSMiB)
		}
		// Some of the bulk stream went spliced (the rest by TCP once
		// demoted): the connection to the VIP reached the server pod's
		// socket in the kernel, not through a proxy.
		if meshed != (r.BulkSplicedShare > 0) {
			t.Errorf("mode %s: bulk spliced share %v", r.Mode, r.BulkSplicedShare)
		}
	}
	for line := range strings.Lines(table.String()) {
		if strings.HasPrefix(strings.TrimSpace(line), "pods-svc ") && strings.Contains(line, "verified") && !strings.Contains(line, "x)") {
			t.Errorf("pods-svc has no ratios to bridge-svc:\n%s", table.String())
		}
	}
	for _, h := range rep.Held {
		if h.Skipped != "" {
			t.Errorf("holding 100 connections in mode %s: %s", h.Mode, h.Skipped)
		}
	}
}
