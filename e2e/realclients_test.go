package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/sandbox"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// TestCurlNginx: curl downloads a random file from nginx, both enrolled on
// one node, and gets exactly the file's bytes, spliced or copied.
func TestCurlNginx(t *testing.T) {
	for _, mode := range []string{"splice", "copy"} {
		t.Run(mode, func(t *testing.T) {
			testenv.RequirePrivileged(t)
			nginx := testenv.RequireCommand(t, "nginx")
			n := newNode(t)
			dir := t.TempDir()
			blob := make([]byte, 32<<20)
			rand.Read(blob)
			if err := os.WriteFile(filepath.Join(dir, "blob"), blob, 0o644); err != nil {
				t.Fatal(err)
			}
			conf, err := sandbox.WriteNginxConfig(dir, "127.0.0.1:8080")
			if err != nil {
				t.Fatal(err)
			}
			testenv.StartProcess(t, n.enrolled, n.ns.Name, nginx, "-p", dir, "-c", conf)
			n.start(mode, "")
			before := n.stats()
			curlFile(t, n, n.enrolled, "http://127.0.0.1:8080/blob", blob)
			moved := n.stats().carried() - before.carried()
			if floor := uint64(len(blob)); mode == "splice" && moved < floor {
				t.Errorf("spliced %d bytes, want at least %d", moved, floor)
			}
			if mode == "copy" && moved != 0 {
				t.Errorf("copy mode spliced %d bytes", moved)
			}
			// Relayed by smeshd's copy in copy mode only.
			_, text := n.admin("/metrics")
			copied := testenv.Metric(t, text, "smesh_connections_total", map[string]string{"path": "copy"})
			if (mode == "copy") != (copied >= 1) {
				t.Errorf("smesh_connections_total{path=copy} = %v in %s mode", copied, mode)
			}
		})
	}
}

// TestIperf3Spliced: iperf3 runs between two enrolled processes and its
// stream goes through the splice.
func TestIperf3Spliced(t *testing.T) {
	testenv.RequirePrivileged(t)
	iperf3 := testenv.RequireCommand(t, "iperf3")
	n := newNode(t)
	testenv.StartProcess(t, n.enrolled, n.ns.Name, iperf3, "-s", "-1", "-B", "127.0.0.1", "-p", "5201")
	n.start("splice", "")
	before := n.stats()
	var h *testenv.Helper
	for range 50 { // the server may still be starting
		h = testenv.StartProcess(t, n.enrolled, n.ns.Name, iperf3, "-c", "127.0.0.1", "-p", "5201", "-n", "256M", "-J")
		if h.Wait() == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := h.Wait(); err != nil {
		t.Fatalf("iperf3: %v %s %s", err, h.Stdout(), h.Stderr())
	}
	// iperf3 counts what its client wrote, and its server ends the
	// stream once told the test is over: what still waited in the
	// client's send buffer then never arrives (iperf3's "sender" and
	// "receiver" lines differ). Every byte the server received went
	// through the hop, counted; besides the stream only the control
	// connection's few KiB.
	var report struct {
		End struct {
			Sent     struct{ Bytes uint64 } `json:"sum_sent"`
			Received struct{ Bytes uint64 } `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal([]byte(h.Stdout()), &report); err != nil {
		t.Fatalf("iperf3 -J: %v\n%s", err, h.Stdout())
	}
	sent, received := report.End.Sent.Bytes, report.End.Received.Bytes
	if received < 256<<20*9/10 {
		t.Fatalf("iperf3's server received %d bytes of the %d its client sent", received, sent)
	}
	// The client may exit before its last bytes arrive (close(2) leaves
	// them to the kernel), and what a demoted socket sends is counted as
	// it is acknowledged: give those a moment.
	moved := n.stats().carried() - before.carried()
	for deadline := time.Now().Add(10 * time.Second); moved < received && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
		moved = n.stats().carried() - before.carried()
	}
	t.Logf("iperf3's client sent %d bytes, its server received %d; counted through the hop: %d", sent, received, moved)
	if moved < received || moved > sent+64<<10 {
		t.Errorf("counted %d bytes through the hop; iperf3's server received %d, its client sent %d", moved, received, sent)
	}
}

// curlFile downloads url with curl in cgroup cg of node n, retrying while
// the server starts, and fails the test unless it gets exactly want.
func curlFile(t *testing.T, n *node, cg, url string, want []byte) {
	t.Helper()
	curl := testenv.RequireCommand(t, "curl")
	out := filepath.Join(t.TempDir(), "got")
	var h *testenv.Helper
	for range 50 { // the server may still be starting
		h = testenv.StartProcess(t, cg, n.ns.Name, curl, "-sS", "--fail", "-o", out, url)
		if h.Wait() == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := h.Wait(); err != nil {
		t.Fatalf("curl %s: %v %s", url, err, h.Stderr())
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("curl got %d bytes that differ from the server's %d-byte file", len(got), len(want))
	}
}
