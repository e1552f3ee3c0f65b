package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/certs"
	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/daemon"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

func TestMain(m *testing.M) {
	testenv.RunHelpers(map[string]testenv.HelperFunc{
		"server":      serve,
		"conns":       conns,
		"pause":       pause,
		"client":      client,
		"smeshd":      runSmeshd,
		"sockopts":    sockoptProbe,
		"http-get":    httpGet,
		"ready-probe": readyProbe,
	})
	if s := dataScale(); s > 1 {
		fmt.Printf("e2e: data sizes and counts of exchanges divided by %d (%s)\n", s, scaleEnv)
	}
	os.Exit(m.Run())
}

// runSmeshd is the "smeshd" helper: the real daemon, configured by the file
// args[0]; "runtime=DIR" after it is its RUNTIME_DIRECTORY. It prints
// "ready" once everything is attached.
func runSmeshd(args []string) int {
	if len(args) > 1 {
		if dir, ok := strings.CutPrefix(args[1], "runtime="); ok {
			os.Setenv("RUNTIME_DIRECTORY", dir)
		}
	}
	// As cmd/smeshd: SIGHUP is caught first, a reload while starting waits.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	cfg, err := config.Load(args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	notify := func(state string) {
		if state == "READY=1" {
			fmt.Println("ready")
		}
	}
	err = daemon.Run(ctx, daemon.Options{Config: cfg, ConfigPath: args[0], Reload: hup, LogOut: os.Stderr, Notify: notify, Version: "e2e",
		Kubernetes: startKube})
	if err != nil {
		fmt.Fprintln(os.Stderr, "smeshd:", err)
		return 1
	}
	return 0
}

// node is one test "node": a network namespace with its own smeshd (once
// started) and cgroups for the processes that run on it.
type node struct {
	t      *testing.T
	ns     *testenv.Node
	smeshd *testenv.Helper
	// smeshCg is smeshd's own cgroup; enrolled is in the mesh.
	smeshCg, enrolled string
	// name is the node's name in its certificate (certs.Init), from the
	// test's shared CA in pki.
	name, pki string
	// capture overrides capture.cgroups when set (e.g. "[]" for a node
	// that only receives tunnel traffic).
	capture string
	// captureExtra goes into the [capture] table (e.g. on_failure).
	captureExtra string
	// confPath is smeshd's configuration file, set by start.
	confPath string
	// runtimeDir is smeshd's RUNTIME_DIRECTORY (its control and hand-over
	// sockets), as systemd's RuntimeDirectory= gives it; empty: none.
	runtimeDir string
}

func newNode(t *testing.T) *node {
	t.Helper()
	testenv.RequirePrivileged(t)
	return nodeOn(t, testenv.NewNode(t))
}

// nodeOn makes a test node of the namespace ns (a plain node or a cluster
// node's).
func nodeOn(t *testing.T, ns *testenv.Node) *node {
	t.Helper()
	n := &node{t: t, ns: ns, smeshCg: testenv.NewCgroup(t), enrolled: testenv.NewCgroup(t)}
	n.name = strings.TrimPrefix(n.ns.Name, "smesh-")
	n.pki = testPKI(t)
	if _, err := certs.Init(n.pki, []string{n.name}, "test.local"); err != nil {
		t.Fatal(err)
	}
	return n
}

// pkis holds each test's certificate directory: every node of a test has a
// certificate of the same CA.
var pkis sync.Map // *testing.T -> string

func testPKI(t *testing.T) string {
	dir, loaded := pkis.LoadOrStore(t, t.TempDir())
	if !loaded {
		t.Cleanup(func() { pkis.Delete(t) })
	}
	return dir.(string)
}

// id is the node's SPIFFE ID.
func (n *node) id() string { return "spiffe://test.local/node/" + n.name }

// tlsConf is the node's [tunnel.tls] section; extra lines go into it. The
// test CA's trust domain is test.local.
func (n *node) tlsConf(extra string) string {
	return fmt.Sprintf("[tunnel.tls]\ncert = %q\nkey = %q\nca = %q\ntrust_domain = \"test.local\"\n%s\n",
		filepath.Join(n.pki, n.name+".crt"), filepath.Join(n.pki, n.name+".key"), filepath.Join(n.pki, "ca.crt"), extra)
}

// start runs smeshd on the node in the given data path mode; extra is
// appended to its configuration (in the [datapath] table, unless it opens
// tables of its own). The node's certificate is configured in [tunnel.tls]
// unless extra has that table (see tlsConf).
func (n *node) start(mode string, extra string) {
	n.t.Helper()
	n.startVia(nil, mode, extra)
}

// startVia is start with smeshd started through the command wrapper (see
// testenv.StartHelperVia), or in the node's namespace directly when it is
// nil.
func (n *node) startVia(wrapper []string, mode string, extra string) {
	n.t.Helper()
	n.launch(wrapper, n.writeConfig(mode, extra))
	n.waitReady()
}

// cgroupRel is the cgroup at path relative to the cgroup v2 mount, as
// smesh.toml names cgroups.
func cgroupRel(t testing.TB, path string) string {
	t.Helper()
	mount, err := testenv.Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	rel, err := filepath.Rel(mount, path)
	if err != nil {
		t.Fatal(err)
	}
	return rel
}

// writeConfig writes smeshd's configuration file for start and returns its
// path.
func (n *node) writeConfig(mode string, extra string) string {
	t := n.t
	t.Helper()
	capture := fmt.Sprintf("[%q]", cgroupRel(t, n.enrolled))
	if n.capture != "" {
		capture = n.capture
	}
	conf := fmt.Sprintf(`
[capture]
cgroups = %s
%s
[datapath]
mode = %q
%s
[log]
level = "debug"
format = "json"
`, capture, n.captureExtra, mode, extra)
	if !strings.Contains(extra, "[tunnel.tls]") {
		conf += n.tlsConf("")
	}
	path := filepath.Join(t.TempDir(), "smesh.toml")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := config.Load(path); err != nil {
		t.Fatalf("test config: %v", err)
	}
	n.confPath = path
	return path
}

// launch starts smeshd with the configuration file path, through wrapper
// when it is not nil (see startVia).
func (n *node) launch(wrapper []string, path string) {
	n.t.Helper()
	args := []string{path}
	if n.runtimeDir != "" {
		args = append(args, "runtime="+n.runtimeDir)
	}
	if wrapper == nil {
		n.smeshd = testenv.StartHelper(n.t, n.smeshCg, n.ns.Name, "smeshd", args...)
	} else {
		n.smeshd = testenv.StartHelperVia(n.t, n.smeshCg, wrapper, "smeshd", args...)
	}
}

// waitReady waits for smeshd to say it is ready (systemd's READY=1).
func (n *node) waitReady() {
	n.t.Helper()
	if line, err := n.smeshd.ReadLine(15 * time.Second); err != nil || line != "ready" {
		n.t.Fatalf("smeshd did not get ready (%q, %v): %s", line, err, n.smeshd.Stderr())
	}
}

// stop ends smeshd with SIGTERM and expects a clean exit.
func (n *node) stop() {
	n.t.Helper()
	if err := n.smeshd.Signal(syscall.SIGTERM); err != nil {
		n.t.Fatal(err)
	}
	if err := n.smeshd.Wait(); err != nil {
		n.t.Fatalf("smeshd exited with %v: %s", err, n.smeshd.Stderr())
	}
}

// server starts a test server on addr in cgroup cg of this node, with the
// server helper's options (serve).
func (n *node) server(cg, addr string, opts ...string) *testenv.Helper {
	n.t.Helper()
	h := testenv.StartHelper(n.t, cg, n.ns.Name, "server", append([]string{addr}, opts...)...)
	line, err := h.ReadLine(5 * time.Second)
	if err != nil || !strings.HasPrefix(line, "ready ") {
		n.t.Fatalf("server did not start (%q, %v): %s", line, err, h.Stderr())
	}
	return h
}

// client runs one client scenario in cgroup cg and fails the test unless it
// reports that every byte matched. It returns the client's output.
func (n *node) client(cg string, args ...string) string {
	n.t.Helper()
	h := testenv.StartHelper(n.t, cg, n.ns.Name, "client", args...)
	if err := h.Wait(); err != nil {
		n.t.Fatalf("client %v: %v\n%s", args, err, h.Stderr())
	}
	out := h.Stdout()
	if !strings.Contains(out, "ok "+args[0]) {
		n.t.Fatalf("client %v did not report ok: %q", args, out)
	}
	return out
}

// stats reads smeshd's spliced-byte counters from its live BPF maps.
func (n *node) stats() spliceStats {
	n.t.Helper()
	s, err := readStats(n.smeshd.PID())
	if err != nil {
		n.t.Fatal(err)
	}
	return s
}

// waitSpliced waits until smeshd's counters show n more bytes spliced than
// before (a transfer still going, counted as it is sent) and returns them;
// it fails the test if they do not within 10 s.
func (n *node) waitSpliced(before spliceStats, bytes uint64) spliceStats {
	n.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		now := n.stats()
		if now.bytes-before.bytes >= bytes {
			return now
		}
		if time.Now().After(deadline) {
			n.t.Fatalf("spliced %d bytes (and demoted %d), want at least %d", now.bytes-before.bytes, now.demotedBytes-before.demotedBytes, bytes)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// captured reports whether a connection from cgroup cg to addr went
// through smeshd: the server then sees another connection than the one the
// client made. Either way the client must see addr as its peer (smesh's
// getpeername4 hides the capture).
func captured(n *node, cg, addr string) bool {
	n.t.Helper()
	saw, local, remote := peerOf(n, cg, addr)
	if remote.String() != addr {
		n.t.Errorf("client's peer is %s, want %s (the address it connected to)", remote, addr)
	}
	return saw != local
}

// peerOf runs the "peer" scenario and parses its report.
func peerOf(n *node, cg, addr string) (serverSaw, local, remote netip.AddrPort) {
	n.t.Helper()
	return parsePeer(n.t, n.client(cg, "peer", addr))
}

// parsePeer reads the "peer" scenario's report: how the server saw the
// connection, and the client's own and peer addresses.
func parsePeer(t *testing.T, out string) (serverSaw, local, remote netip.AddrPort) {
	t.Helper()
	fields := map[string]netip.AddrPort{}
	for _, f := range strings.Fields(out) {
		if k, v, ok := strings.Cut(f, "="); ok {
			if ap, err := netip.ParseAddrPort(v); err == nil {
				fields[k] = ap
			}
		}
	}
	for _, k := range []string{"server-saw", "local", "remote"} {
		if _, ok := fields[k]; !ok {
			t.Fatalf("no %s in the peer report %q", k, out)
		}
	}
	return fields["server-saw"], fields["local"], fields["remote"]
}
