package e2e

import (
	"bytes"
	"crypto/rand"
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
		h = testenv.StartProcess(t, n.enrolled, n.ns.Name, iperf3, "-c", "127.0.0.1", "-p", "5201", "-n", "256M")
		if h.Wait() == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := h.Wait(); err != nil {
		t.Fatalf("iperf3: %v %s %s", err, h.Stdout(), h.Stderr())
	}
	if moved, floor := n.stats().carried()-before.carried(), uint64(256<<20); moved < floor {
		t.Errorf("spliced %d bytes, want at least %d", moved, floor)
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
