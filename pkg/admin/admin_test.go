package admin

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/smesh-dev/smesh/pkg/metrics"
)

var loopback0 = netip.MustParseAddrPort("127.0.0.1:0")

// start runs a server on a free loopback port and stops it when the test ends.
func start(t *testing.T, m *metrics.Metrics, conns func() []Conn) (*Server, string) {
	t.Helper()
	s, err := New(loopback0, m, conns, zerolog.New(zerolog.NewTestWriter(t)))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve() }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return s, "http://" + s.Addr().String()
}

func do(t *testing.T, method, url string) (int, http.Header, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header, string(body)
}

func expectBody(t *testing.T, method, url string, code int, body string) {
	t.Helper()
	gotCode, _, gotBody := do(t, method, url)
	if gotCode != code || gotBody != body {
		t.Errorf("%s %s: %d %q, want %d %q", method, url, gotCode, gotBody, code, body)
	}
}

func TestHealthAndReadiness(t *testing.T) {
	s, base := start(t, metrics.New("dev"), nil)

	expectBody(t, "GET", base+"/healthz", 200, "ok\n")
	expectBody(t, "GET", base+"/readyz", 503, "not ready: starting\n")

	s.SetReady(true)
	expectBody(t, "GET", base+"/readyz", 200, "ready\n")
	expectBody(t, "HEAD", base+"/readyz", 200, "")
	s.SetProblem("enrolled cgroup /sys/fs/cgroup/smesh.slice is missing")
	expectBody(t, "GET", base+"/readyz", 503, "not ready: enrolled cgroup /sys/fs/cgroup/smesh.slice is missing\n")
	s.SetProblem("")
	expectBody(t, "GET", base+"/readyz", 200, "ready\n")
	s.SetReady(false)
	expectBody(t, "GET", base+"/readyz", 503, "not ready: starting\n")
	s.SetReady(true)

	s.SetDraining()
	expectBody(t, "GET", base+"/readyz", 503, "not ready: draining\n")
	s.SetReady(true) // draining is final
	expectBody(t, "GET", base+"/readyz", 503, "not ready: draining\n")
	expectBody(t, "GET", base+"/healthz", 200, "ok\n")
}

func TestMetrics(t *testing.T) {
	m := metrics.New("v9")
	m.ConnOpened(metrics.PathCopy)
	_, base := start(t, m, nil)

	code, hdr, body := do(t, "GET", base+"/metrics")
	if code != 200 || !strings.HasPrefix(hdr.Get("Content-Type"), "text/plain") {
		t.Fatalf("GET /metrics: %d %s", code, hdr.Get("Content-Type"))
	}
	for _, want := range []string{`smesh_build_info{version="v9"} 1`, `smesh_connections_total{path="copy"} 1`} {
		if !strings.Contains(body, want+"\n") {
			t.Errorf("/metrics has no %q", want)
		}
	}
	expectBody(t, "HEAD", base+"/metrics", 200, "")
}

func TestMethodsAndPaths(t *testing.T) {
	_, base := start(t, metrics.New("dev"), nil)
	for _, path := range []string{"/metrics", "/healthz", "/readyz", "/debug/connections"} {
		for _, method := range []string{"POST", "PUT", "DELETE", "PATCH"} {
			code, hdr, _ := do(t, method, base+path)
			if code != http.StatusMethodNotAllowed {
				t.Errorf("%s %s: %d, want 405", method, path, code)
			}
			if allow := hdr.Get("Allow"); !strings.Contains(allow, "GET") || !strings.Contains(allow, "HEAD") {
				t.Errorf("%s %s: Allow %q", method, path, allow)
			}
		}
	}
	for _, path := range []string{"/", "/nope", "/healthz/x", "/debug/"} {
		if code, _, _ := do(t, "GET", base+path); code != http.StatusNotFound {
			t.Errorf("GET %s: %d, want 404", path, code)
		}
	}
}

func getConnections(t *testing.T, base string) (Connections, string) {
	t.Helper()
	code, hdr, body := do(t, "GET", base+"/debug/connections")
	if code != 200 || hdr.Get("Content-Type") != "application/json" {
		t.Fatalf("GET /debug/connections: %d %s: %s", code, hdr.Get("Content-Type"), body)
	}
	var doc Connections
	if err := json.Unmarshal([]byte(body), &doc); err != nil {
		t.Fatalf("decoding %s: %v", body, err)
	}
	return doc, body
}

func TestDebugConnections(t *testing.T) {
	m := metrics.New("dev")
	list := []Conn{
		{Source: "10.0.1.5:41234", OriginalDst: "10.0.2.2:80", Path: metrics.PathTunnelOut, TxBytes: 100, RxBytes: 2000, AgeSeconds: 12.5},
		{Source: "10.0.1.5:41240", OriginalDst: "10.0.1.9:5432", Path: metrics.PathCopy, AgeSeconds: 0.25},
	}
	_, base := start(t, m, func() []Conn { return list })

	// No splice source: no count, no error.
	doc, body := getConnections(t, base)
	if len(doc.Connections) != 2 || doc.Connections[0] != list[0] || doc.Connections[1] != list[1] {
		t.Errorf("connections %+v, want %+v", doc.Connections, list)
	}
	if doc.SplicedHops != nil || doc.SpliceError != "" || strings.Contains(body, "splice") {
		t.Errorf("without a splice source: %s", body)
	}
	for _, key := range []string{`"source"`, `"original_dst"`, `"path"`, `"tx_bytes"`, `"rx_bytes"`, `"age_seconds"`} {
		if !strings.Contains(body, key) {
			t.Errorf("no %s in %s", key, body)
		}
	}

	m.SetSpliceSource(func() (metrics.SpliceCounters, error) { return metrics.SpliceCounters{Sockets: 6}, nil })
	if doc, body := getConnections(t, base); doc.SplicedHops == nil || *doc.SplicedHops != 3 {
		t.Errorf("spliced hops: %s", body)
	}

	m.SetSpliceSource(func() (metrics.SpliceCounters, error) {
		return metrics.SpliceCounters{}, errors.New("walking sockhash: boom")
	})
	doc, body = getConnections(t, base)
	if doc.SplicedHops != nil || doc.SpliceError != "walking sockhash: boom" || len(doc.Connections) != 2 {
		t.Errorf("failing splice source: %s", body)
	}
}

// An empty or missing list is an empty JSON array, not null.
func TestDebugConnectionsEmpty(t *testing.T) {
	for name, conns := range map[string]func() []Conn{
		"no callback": nil,
		"nil list":    func() []Conn { return nil },
		"empty list":  func() []Conn { return []Conn{} },
	} {
		t.Run(name, func(t *testing.T) {
			_, base := start(t, metrics.New("dev"), conns)
			if _, body := getConnections(t, base); !strings.Contains(body, `"connections": []`) {
				t.Errorf("got %s", body)
			}
		})
	}
}

func TestPortClash(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr := ln.Addr().(*net.TCPAddr).AddrPort()

	_, err = New(addr, metrics.New("dev"), nil, zerolog.Nop())
	if err == nil || !strings.Contains(err.Error(), "admin.listen") || !strings.Contains(err.Error(), addr.String()) {
		t.Fatalf("New on a taken port: %v", err)
	}
}

// Shutdown frees the port even when Serve never ran (startup failed later).
func TestShutdownWithoutServe(t *testing.T) {
	s, err := New(loopback0, metrics.New("dev"), nil, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	addr := s.Addr()
	if err := s.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", addr.String())
	if err != nil {
		t.Fatalf("port still taken after Shutdown: %v", err)
	}
	ln.Close()
}

func TestNilMetrics(t *testing.T) {
	if _, err := New(loopback0, nil, nil, zerolog.Nop()); err == nil {
		t.Fatal("New without metrics: no error")
	}
}

// Every timeout is set, so a slow or stuck client cannot hold a connection
// for ever.
func TestServerTimeouts(t *testing.T) {
	s, _ := start(t, metrics.New("dev"), nil)
	if s.srv.ReadHeaderTimeout <= 0 || s.srv.ReadTimeout <= 0 || s.srv.WriteTimeout <= 0 || s.srv.IdleTimeout <= 0 {
		t.Fatalf("timeouts not all set: %+v", s.srv)
	}
}
