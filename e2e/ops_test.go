package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/admin"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// httpGet is the "http-get" helper: GET args[0], print the status code and
// the body.
func httpGet(args []string) int {
	resp, err := http.Get(args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Printf("%d\n%s", resp.StatusCode, body)
	return 0
}

// admin GETs path from the node's admin endpoint, from outside the mesh.
func (n *node) admin(path string) (int, string) {
	n.t.Helper()
	h := testenv.StartHelper(n.t, "", n.ns.Name, "http-get", "http://127.0.0.1:15000"+path)
	if err := h.Wait(); err != nil {
		n.t.Fatalf("GET %s: %v %s", path, err, h.Stderr())
	}
	code, body, _ := strings.Cut(h.Stdout(), "\n")
	var c int
	fmt.Sscan(code, &c)
	return c, body
}

// TestAdminAndMetrics: once smeshd says it is ready, /readyz says so too,
// and /metrics (Prometheus text) counts the traffic that went through.
func TestAdminAndMetrics(t *testing.T) {
	a, _, server := twoNodes(t, "splice", "")
	if code, body := a.admin("/readyz"); code != 200 {
		t.Fatalf("/readyz after ready: %d %q", code, body)
	}
	if code, _ := a.admin("/healthz"); code != 200 {
		t.Fatalf("/healthz: %d", code)
	}
	a.server(a.enrolled, "127.0.0.1:9000")
	a.client(a.enrolled, "oneway", server, "1000000")
	a.client(a.enrolled, "oneway", "127.0.0.1:9000", "2000000")

	_, text := a.admin("/metrics")
	if v := testenv.Metric(t, text, "smesh_connections_total", map[string]string{"path": "tunnel_out"}); v < 1 {
		t.Errorf("smesh_connections_total{path=tunnel_out} = %v, want >= 1", v)
	}
	if v := testenv.Metric(t, text, "smesh_bytes_total", map[string]string{"path": "tunnel_out", "direction": "tx"}); v < 1000000 {
		t.Errorf("smesh_bytes_total{path=tunnel_out,direction=tx} = %v, want >= 1000000", v)
	}
	// Spliced: the same-node transfer, and the app <-> smeshd hop of the
	// tunnelled one.
	if v := testenv.Metric(t, text, "smesh_bytes_total", map[string]string{"path": "splice", "direction": "tx"}); v < 3000000 {
		t.Errorf("smesh_bytes_total{path=splice,direction=tx} = %v, want >= 3000000", v)
	}
	if v := testenv.Metric(t, text, "smesh_tls_handshakes_total", map[string]string{"role": "client", "result": "ok"}); v < 1 {
		t.Errorf("smesh_tls_handshakes_total{role=client,result=ok} = %v, want >= 1", v)
	}
	if v := testenv.Metric(t, text, "smesh_certificate_expiry_seconds", nil); v < float64(time.Now().Unix()) {
		t.Errorf("smesh_certificate_expiry_seconds = %v, want a time in the future", v)
	}

	t.Run("/debug/connections", func(t *testing.T) {
		// An open captured connection, relayed to the tunnel.
		long := testenv.StartHelper(t, a.enrolled, a.ns.Name, "client", "paced", server, "300")
		if line, err := long.ReadLine(5 * time.Second); err != nil || line != "connected" {
			t.Fatalf("long-lived client: %q %v %s", line, err, long.Stderr())
		}
		line, err := long.ReadLine(5 * time.Second)
		local, ok := strings.CutPrefix(line, "local ")
		if err != nil || !ok {
			t.Fatalf("long-lived client: %q %v %s", line, err, long.Stderr())
		}
		doc, c := a.relayed(server)
		if c.Source != local || c.Path != "tunnel_out" || c.TxBytes < 1 {
			t.Errorf("/debug/connections shows %+v, want source %s (the client), path tunnel_out, bytes sent", c, local)
		}
		// Its app <-> smeshd hop is spliced.
		if doc.SplicedHops == nil || *doc.SplicedHops < 1 {
			t.Errorf("/debug/connections counts no spliced hop: %+v", doc)
		}
		if err := long.Wait(); err != nil {
			t.Errorf("long-lived client: %v\n%s", err, long.Stderr())
		}
	})
}

// relayed waits until /debug/connections lists a connection to dst that
// moved bytes from its client, and returns the document and that
// connection; it fails the test if none shows within 10 s.
func (n *node) relayed(dst string) (admin.Connections, admin.Conn) {
	n.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, body := n.admin("/debug/connections")
		var doc admin.Connections
		if err := json.Unmarshal([]byte(body), &doc); code != 200 || err != nil {
			n.t.Fatalf("/debug/connections: %d %v %q", code, err, body)
		}
		for _, c := range doc.Connections {
			if c.OriginalDst == dst && c.TxBytes > 0 {
				return doc, c
			}
		}
		if time.Now().After(deadline) {
			n.t.Fatalf("/debug/connections shows no connection to %s that moved bytes: %s", dst, body)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestReadyzDuringStartup: /readyz answers 503 while smeshd is starting,
// before its capture is attached, and 200 once it is. Start-up is held at
// a known point, not raced: the tunnel's CA file is a named pipe, so
// loading the certificates (after the admin endpoint is up, before the
// listeners and the data path) waits until the test writes the CA into it.
func TestReadyzDuringStartup(t *testing.T) {
	n := newNode(t)
	ca := filepath.Join(t.TempDir(), "ca.crt")
	if err := unix.Mkfifo(ca, 0o600); err != nil {
		t.Fatal(err)
	}
	// Should the test end before smeshd opened the pipe, a reader of our
	// own lets the writer below return.
	t.Cleanup(func() {
		if fd, err := unix.Open(ca, unix.O_RDONLY|unix.O_NONBLOCK, 0); err == nil {
			unix.Close(fd)
		}
	})
	n.launch(nil, n.writeConfig("splice", fmt.Sprintf("[tunnel.tls]\ncert = %q\nkey = %q\nca = %q\ntrust_domain = \"test.local\"\n",
		filepath.Join(n.pki, n.name+".crt"), filepath.Join(n.pki, n.name+".key"), ca)))

	code, body := n.adminOnceUp("/readyz")
	if code != http.StatusServiceUnavailable {
		t.Errorf("/readyz while starting: %d %q, want 503", code, body)
	}
	if code, _ := n.admin("/healthz"); code != http.StatusOK {
		t.Errorf("/healthz while starting: %d, want 200", code)
	}
	if progs := testenv.AttachedPrograms(t, n.enrolled, ebpf.AttachCGroupInet4Connect); progs != 0 {
		t.Errorf("while starting, %d connect4 programs are attached to the enrolled cgroup already", progs)
	}

	caPEM, err := os.ReadFile(filepath.Join(n.pki, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	wrote := make(chan error, 1)
	go func() { wrote <- os.WriteFile(ca, caPEM, 0) }()
	n.waitReady()
	if err := <-wrote; err != nil {
		t.Fatalf("writing the CA into smeshd's pipe: %v", err)
	}
	if progs := testenv.AttachedPrograms(t, n.enrolled, ebpf.AttachCGroupInet4Connect); progs == 0 {
		t.Error("ready, but no connect4 program is attached to the enrolled cgroup")
	}
	if code, body := n.admin("/readyz"); code != http.StatusOK {
		t.Errorf("/readyz once ready: %d %q, want 200", code, body)
	}
}

// adminOnceUp GETs path from the node's admin endpoint as soon as it
// answers: smeshd may not be listening yet.
func (n *node) adminOnceUp(path string) (int, string) {
	n.t.Helper()
	for range 300 {
		h := testenv.StartHelper(n.t, "", n.ns.Name, "http-get", "http://127.0.0.1:15000"+path)
		if err := h.Wait(); err == nil {
			code, body, _ := strings.Cut(h.Stdout(), "\n")
			var c int
			fmt.Sscan(code, &c)
			return c, body
		}
		select {
		case <-n.smeshd.Exited():
			n.t.Fatalf("smeshd exited: %s", n.smeshd.Stderr())
		case <-time.After(50 * time.Millisecond):
		}
	}
	n.t.Fatalf("the admin endpoint did not answer GET %s", path)
	return 0, ""
}

// TestReload: a bad configuration file is rejected and changes nothing; a
// good one changes the capture at once; a connection open across both
// loses no byte.
func TestReload(t *testing.T) {
	a, _, server := twoNodes(t, "splice", "")
	long := testenv.StartHelper(t, a.enrolled, a.ns.Name, "client", "paced", server, "300")
	if line, err := long.ReadLine(5 * time.Second); err != nil || line != "connected" {
		t.Fatalf("long-lived client: %q %v %s", line, err, long.Stderr())
	}
	good, err := os.ReadFile(a.confPath)
	if err != nil {
		t.Fatal(err)
	}

	a.reload(string(good) + "\n[bogus]\nkey = 1\n")
	if !captured(a, a.enrolled, server) {
		t.Error("after a rejected reload, capture changed")
	}
	_, text := a.admin("/metrics")
	if v := testenv.Metric(t, text, "smesh_config_reloads_total", map[string]string{"result": "error"}); v != 1 {
		t.Errorf("smesh_config_reloads_total{result=error} = %v, want 1", v)
	}

	// Exclude the server's port: new connections to it go direct.
	port := server[strings.LastIndex(server, ":")+1:]
	a.reload(strings.Replace(string(good), "[capture]\n", "[capture]\nexclude_ports = ["+port+"]\n", 1))
	if captured(a, a.enrolled, server) {
		t.Errorf("after excluding port %s, a new connection was still captured", port)
	}
	_, text = a.admin("/metrics")
	if v := testenv.Metric(t, text, "smesh_config_reloads_total", map[string]string{"result": "ok"}); v != 1 {
		t.Errorf("smesh_config_reloads_total{result=ok} = %v, want 1", v)
	}
	if err := long.Wait(); err != nil {
		t.Errorf("connection open across the reloads: %v\n%s", err, long.Stderr())
	}
}

// TestDrain: on SIGTERM smeshd stops capturing at once, lets the relayed
// connection finish, then exits.
func TestDrain(t *testing.T) {
	a, _, server := twoNodes(t, "splice", "")
	long := testenv.StartHelper(t, a.enrolled, a.ns.Name, "client", "paced", server, "200")
	if line, err := long.ReadLine(5 * time.Second); err != nil || line != "connected" {
		t.Fatalf("long-lived client: %q %v %s", line, err, long.Stderr())
	}
	if err := a.smeshd.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	select {
	case <-a.smeshd.Exited():
		t.Fatal("smeshd exited without draining its relayed connection")
	default:
	}
	if captured(a, a.enrolled, server) {
		t.Error("while draining, a new connection was captured")
	}
	if err := long.Wait(); err != nil {
		t.Errorf("relayed connection during the drain: %v\n%s", err, long.Stderr())
	}
	select {
	case <-a.smeshd.Exited():
	case <-time.After(10 * time.Second):
		t.Fatal("smeshd still running after its connections ended")
	}
	if err := a.smeshd.Wait(); err != nil {
		t.Errorf("smeshd exit: %v", err)
	}
}
