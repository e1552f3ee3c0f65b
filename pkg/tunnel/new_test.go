package tunnel

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/smesh-dev/smesh/pkg/certs"
	"github.com/smesh-dev/smesh/pkg/config"
)

func tunnelConfig(mode string) config.Tunnel {
	cfg := config.Default().Tunnel
	cfg.Listen = netip.MustParseAddrPort("127.0.0.1:0")
	cfg.TLS.Mode = mode
	return cfg
}

// TestNewMissingCertificates: in mtls mode, missing files stop smeshd with
// a message that says how to get them.
func TestNewMissingCertificates(t *testing.T) {
	cfg := tunnelConfig("mtls")
	dir := t.TempDir()
	cfg.TLS.Cert, cfg.TLS.Key, cfg.TLS.CA = filepath.Join(dir, "n.crt"), filepath.Join(dir, "n.key"), filepath.Join(dir, "ca.crt")
	_, err := New(cfg, nil, zerolog.Nop())
	if err == nil {
		t.Fatal("New without certificate files succeeded")
	}
	for _, want := range []string{"tunnel.tls.cert", "smeshd certs init"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

// TestNewDisabledWarns: plaintext only when asked for, loudly; and a
// plaintext node and an mTLS node do not talk (no fallback either way).
func TestNewDisabledWarns(t *testing.T) {
	// The server logs from its own goroutines while the test reads.
	var log lockedBuffer
	plain, err := New(tunnelConfig("disabled"), nil, zerolog.New(&log))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	onTestNode(plain)
	go plain.Server.Serve(context.Background())
	if !strings.Contains(log.String(), `"level":"warn"`) || !strings.Contains(log.String(), "TUNNEL TLS IS DISABLED") {
		t.Errorf("no warning for tunnel.tls.mode = \"disabled\": %s", log.String())
	}
	if plain.Credentials != nil {
		t.Error("disabled mode loaded credentials")
	}

	dir := t.TempDir()
	if _, err := certs.Init(dir, []string{"a"}, "test.local"); err != nil {
		t.Fatal(err)
	}
	cfg := tunnelConfig("mtls")
	cfg.TLS.Cert, cfg.TLS.Key, cfg.TLS.CA = filepath.Join(dir, "a.crt"), filepath.Join(dir, "a.key"), filepath.Join(dir, "ca.crt")
	cfg.TLS.TrustDomain = "test.local"
	secure, err := New(cfg, nil, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer secure.Close()
	onTestNode(secure)
	go secure.Server.Serve(context.Background())

	backend := newBackend(t)
	ctx := context.Background()
	// mTLS client to the plaintext server, plaintext client to the mTLS
	// server: both fail.
	for _, c := range []struct {
		name   string
		client *Client
		server *Server
	}{
		{"mtls client, plaintext server", NewClient(ClientOptions{PeerPort: plain.Server.Addr().Port(), Credentials: secure.Credentials, Timeout: 2 * time.Second, Dial: testDial}), plain.Server},
		{"plaintext client, mtls server", NewClient(ClientOptions{PeerPort: secure.Server.Addr().Port(), Timeout: 2 * time.Second, Dial: testDial}), secure.Server},
	} {
		if nc, err := c.client.DialContext(ctx, "tcp", onNode(backend.addr()).String()); err == nil {
			nc.Close()
			t.Errorf("%s: connected", c.name)
		}
	}
	// Plaintext to plaintext works: disabled means disabled, not broken.
	pc := NewClient(ClientOptions{PeerPort: plain.Server.Addr().Port(), Dial: testDial})
	nc, err := pc.DialContext(ctx, "tcp", onNode(backend.addr()).String())
	if err != nil {
		t.Fatal(err)
	}
	nc.Write([]byte("Eplain"))
	nc.(*Conn).CloseWrite()
	if got, err := io.ReadAll(nc); err != nil || string(got) != "plain" {
		t.Errorf("plaintext tunnel: %q, %v", got, err)
	}
}

// onTestNode makes a tunnel made by New deliver as the harness's server
// does: to nodeAddr, reached on loopback (see testDial).
func onTestNode(t *Tunnel) {
	t.Local.Set([]netip.Addr{nodeAddr})
	t.Server.scope.Dial = testDial
}

// TestExpiryWarning: a certificate close to its end is logged as a warning
// when loaded.
func TestExpiryWarning(t *testing.T) {
	p := newPKI(t)
	p.issue(t, p.ca, "soon", time.Now().Add(-time.Hour), time.Now().Add(48*time.Hour))
	var log bytes.Buffer
	if _, err := LoadCredentials(p.path("soon.crt"), p.path("soon.key"), p.path("ca.crt"), policy(t), zerolog.New(&log)); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(log.String(), "expires soon") {
		t.Errorf("no expiry warning for a certificate valid 48 more hours: %q", log.String())
	}
	log.Reset()
	if _, err := LoadCredentials(p.path("a.crt"), p.path("a.key"), p.path("ca.crt"), policy(t), zerolog.New(&log)); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(log.String(), "expires soon") {
		t.Errorf("expiry warning for a certificate valid a year: %q", log.String())
	}
}

// TestBadRotationKeepsOldCredentials: files that change into something that
// does not load leave the previous credentials in force.
func TestBadRotationKeepsOldCredentials(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(t, "a")
	if err := os.WriteFile(h.pki.path("b.crt"), []byte("not a certificate"), 0o644); err != nil {
		t.Fatal(err)
	}
	time.Sleep(reloadInterval + 100*time.Millisecond)
	for range 3 { // the first handshake after the interval tries the reload
		nc, err := c.DialContext(context.Background(), "tcp", h.dst())
		if err != nil {
			var re *RefusedError
			t.Fatalf("after a broken rotation: %v (refused: %v)", err, errors.As(err, &re))
		}
		nc.Close()
	}
}

// lockedBuffer is a bytes.Buffer that goroutines may write while another
// reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
