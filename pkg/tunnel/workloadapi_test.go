package tunnel

import (
	"context"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/smesh-dev/smesh/pkg/certs"
	"github.com/smesh-dev/smesh/pkg/config"
)

// fakeAgent speaks the SPIFFE Workload API (the proto's generated server)
// on a unix socket, as a SPIRE agent does: FetchX509SVID streams the
// current SVID and then every one pushed.
type fakeAgent struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	addr string

	mu      sync.Mutex
	current *workload.X509SVIDResponse
	subs    map[chan *workload.X509SVIDResponse]bool
}

func startAgent(t *testing.T, first *workload.X509SVIDResponse) *fakeAgent {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	a := &fakeAgent{addr: "unix://" + sock, current: first, subs: make(map[chan *workload.X509SVIDResponse]bool)}
	s := grpc.NewServer()
	workload.RegisterSpiffeWorkloadAPIServer(s, a)
	go s.Serve(ln)
	t.Cleanup(s.Stop)
	return a
}

func (a *fakeAgent) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	// Workload API clients must send this header (SPIFFE Workload API
	// spec, 5.1); agents refuse calls without it.
	md, _ := metadata.FromIncomingContext(stream.Context())
	if v := md.Get("workload.spiffe.io"); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	ch := make(chan *workload.X509SVIDResponse, 4)
	a.mu.Lock()
	a.subs[ch] = true
	resp := a.current
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.subs, ch)
		a.mu.Unlock()
	}()
	for {
		if err := stream.Send(resp); err != nil {
			return err
		}
		select {
		case resp = <-ch:
		case <-stream.Context().Done():
			return stream.Context().Err()
		}
	}
}

// push rotates: every stream gets resp.
func (a *fakeAgent) push(resp *workload.X509SVIDResponse) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.current = resp
	for ch := range a.subs {
		ch <- resp
	}
}

// svid issues node's certificate from ca as a Workload API response: DER
// certificate, PKCS#8 DER key, DER bundle.
func svid(t *testing.T, ca *certs.CA, node string) (*workload.X509SVIDResponse, *big.Int) {
	t.Helper()
	certPEM, keyPEM, err := ca.Issue(node, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	leaf, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return &workload.X509SVIDResponse{Svids: []*workload.X509SVID{{
		SpiffeId:    ca.ID(node),
		X509Svid:    cb.Bytes,
		X509SvidKey: kb.Bytes,
		Bundle:      ca.Cert.Raw,
	}}}, leaf.Leaf.SerialNumber
}

func workloadCreds(t *testing.T, addr string, allow ...string) *Credentials {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The tests' CA is of trust domain example.org.
	policy, err := NewIdentityPolicy(config.TLS{TrustDomain: "example.org", AllowIdentities: allow})
	if err != nil {
		t.Fatal(err)
	}
	c, err := WorkloadAPICredentials(ctx, addr, policy, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestWorkloadAPICredentials: both ends of a tunnel take their certificate
// and CA from a Workload API; the agent rotates the server's SVID; new
// connections see the new certificate at once (pushed, no polling), and a
// connection opened before keeps flowing.
func TestWorkloadAPICredentials(t *testing.T) {
	ca, err := certs.NewCA("example.org", time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	first, firstSerial := svid(t, ca, "b")
	serverAgent := startAgent(t, first)
	clientSVID, _ := svid(t, ca, "a")
	clientAgent := startAgent(t, clientSVID)

	stats := new(Stats)
	serverCreds := workloadCreds(t, serverAgent.addr, "spiffe://example.org/node/a")
	if got := serverCreds.Source(); got != serverAgent.addr {
		t.Errorf("Source() = %q, want the Workload API's address", got)
	}
	local := new(LocalAddrs)
	local.Set([]netip.Addr{nodeAddr})
	srv, err := Listen(ServerOptions{
		Listen:           netip.MustParseAddrPort("127.0.0.1:0"),
		Credentials:      serverCreds,
		MaxConnections:   10,
		HandshakeTimeout: 2 * time.Second,
		Local:            local,
		Dial:             testDial,
		Stats:            stats,
		Logger:           testLogger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(context.Background())
	t.Cleanup(func() { srv.Close() })
	back := newBackend(t)
	client := NewClient(ClientOptions{PeerPort: srv.Addr().Port(), Credentials: workloadCreds(t, clientAgent.addr, "spiffe://example.org/node/b"),
		Dial: testDial, Timeout: 5 * time.Second, Logger: testLogger(t)})

	// presented is the serial of the certificate the tunnel server shows.
	presented := func() *big.Int {
		t.Helper()
		cert, err := tls.X509KeyPair(pemOf(clientSVID.Svids[0].X509Svid, "CERTIFICATE"), pemOf(clientSVID.Svids[0].X509SvidKey, "PRIVATE KEY"))
		if err != nil {
			t.Fatal(err)
		}
		c, err := tls.Dial("tcp", srv.Addr().String(), &tls.Config{Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].SerialNumber
	}
	if got := presented(); got.Cmp(firstSerial) != 0 {
		t.Fatalf("server presents serial %v, want the SVID's %v", got, firstSerial)
	}
	echo := func(c net.Conn, msg string) {
		t.Helper()
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, len(msg))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
			t.Fatalf("echo %q: got %q, %v", msg, buf, err)
		}
	}
	dial := func() net.Conn {
		t.Helper()
		nc, err := client.DialContext(context.Background(), "tcp", onNode(back.addr()).String())
		if err != nil {
			t.Fatalf("tunnel with Workload API credentials: %v (errors %v)", err, stats.ErrorCounts())
		}
		if _, err := nc.Write([]byte{'E'}); err != nil {
			t.Fatal(err)
		}
		return nc
	}
	open := dial()
	defer open.Close()
	echo(open, "before the rotation")

	next, nextSerial := svid(t, ca, "b")
	serverAgent.push(next)
	deadline := time.Now().Add(5 * time.Second)
	for presented().Cmp(nextSerial) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("server still presents serial %v after the agent pushed %v", presented(), nextSerial)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// New tunnels work with the new SVID; the old one was never dropped.
	fresh := dial()
	echo(fresh, "after the rotation")
	fresh.Close()
	echo(open, "across the rotation")
	if err := open.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if rest, err := io.ReadAll(open); err != nil || len(rest) != 0 {
		t.Errorf("old connection after half-close: %q, %v", rest, err)
	}
}

// TestWorkloadAPINoAgent: without an agent, WorkloadAPICredentials gives up
// when ctx ends and says what to check.
func TestWorkloadAPINoAgent(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	policy, err := NewIdentityPolicy(config.TLS{TrustDomain: "example.org"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = WorkloadAPICredentials(ctx, "unix://"+filepath.Join(t.TempDir(), "none.sock"), policy, testLogger(t))
	if err == nil || !errors.Is(err, context.DeadlineExceeded) && !strings.Contains(err.Error(), "SPIRE agent") {
		t.Fatalf("WorkloadAPICredentials without an agent = %v", err)
	}
	if !strings.Contains(err.Error(), "tunnel.tls.workload_api_socket") {
		t.Errorf("error %q does not name the key", err)
	}
}

func pemOf(der []byte, typ string) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

// TestNewFromWorkloadAPI: [tunnel.tls] source = "workload_api" builds the
// tunnel on the agent's SVID, with no certificate files at all.
func TestNewFromWorkloadAPI(t *testing.T) {
	ca, err := certs.NewCA("example.org", time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	resp, serial := svid(t, ca, "n")
	agent := startAgent(t, resp)
	cfg := tunnelConfig("mtls")
	cfg.TLS.Source = "workload_api"
	cfg.TLS.WorkloadAPISocket = agent.addr
	cfg.TLS.TrustDomain = "example.org"
	cfg.TLS.Cert, cfg.TLS.Key, cfg.TLS.CA = "/nonexistent/c", "/nonexistent/k", "/nonexistent/ca"
	tun, err := New(cfg, nil, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer tun.Close()
	if got := tun.Credentials.Source(); got != agent.addr {
		t.Errorf("Source() = %q", got)
	}
	if got := tun.Credentials.current().cert.Leaf.SerialNumber; got.Cmp(serial) != 0 {
		t.Errorf("certificate serial %v, want the SVID's %v", got, serial)
	}
}
