package tunnel

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/smesh-dev/smesh/pkg/certs"
	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/proxy"
)

// pki is a test CA with node certificates in a directory, plus material a
// tunnel must refuse: another CA's node, an expired node, and certificates
// of the CA without a SPIFFE ID ("noid") or with one of another trust
// domain ("foreign").
type pki struct {
	dir string
	ca  *certs.CA
}

func newPKI(t testing.TB) *pki {
	t.Helper()
	dir := t.TempDir()
	ca, err := certs.Init(dir, []string{"a", "b", "c"}, "test.local")
	if err != nil {
		t.Fatal(err)
	}
	p := &pki{dir: dir, ca: ca}
	now := time.Now()
	p.issue(t, ca, "expired", now.Add(-48*time.Hour), now.Add(-24*time.Hour))
	other, err := certs.NewCA("test.local", now.Add(-time.Hour), now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	p.issue(t, other, "stranger", now.Add(-time.Hour), now.Add(time.Hour))
	p.issueURIs(t, "noid", nil)
	p.issueURIs(t, "foreign", []string{"spiffe://other.example/node/a"})
	return p
}

func (p *pki) issueURIs(t testing.TB, name string, uris []string) {
	t.Helper()
	c, k, err := p.ca.IssueURIs(name, uris, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(p.dir, name+".crt"), c, 0o644)
	os.WriteFile(filepath.Join(p.dir, name+".key"), k, 0o600)
}

func (p *pki) issue(t testing.TB, ca *certs.CA, name string, from, to time.Time) {
	t.Helper()
	c, k, err := ca.Issue(name, from, to)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(p.dir, name+".crt"), c, 0o644)
	os.WriteFile(filepath.Join(p.dir, name+".key"), k, 0o600)
}

func (p *pki) path(name string) string { return filepath.Join(p.dir, name) }

func (p *pki) creds(t testing.TB, node string, allow ...string) *Credentials {
	t.Helper()
	return p.credsWith(t, node, policy(t, allow...))
}

func (p *pki) credsWith(t testing.TB, node string, pol *IdentityPolicy) *Credentials {
	t.Helper()
	c, err := LoadCredentials(p.path(node+".crt"), p.path(node+".key"), p.path("ca.crt"), pol, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// policy is the identity policy of the test trust domain, allowing allow
// (empty: any identity in it).
func policy(t testing.TB, allow ...string) *IdentityPolicy {
	t.Helper()
	cfg := config.Default().Tunnel.TLS
	cfg.TrustDomain = "test.local"
	cfg.AllowIdentities = allow
	p, err := NewIdentityPolicy(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// nodeAddr stands for the address of the server's node in these tests.
// The tunnel never delivers to loopback, so the server is told that
// nodeAddr is local and the test dials map it to 127.0.0.1: no packet is
// ever sent to it (see testDial).
var nodeAddr = netip.MustParseAddr("198.18.0.2")

// testDial dials as net.Dialer does, with nodeAddr mapped to 127.0.0.1.
// Other addresses are refused: tests reach nothing outside loopback.
func testDial(ctx context.Context, network, address string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return nil, err
	}
	switch {
	case ap.Addr() == nodeAddr:
		ap = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), ap.Port())
	case !ap.Addr().IsLoopback():
		return nil, fmt.Errorf("test network: no route to %s", ap)
	}
	var d net.Dialer
	return d.DialContext(ctx, network, ap.String())
}

// onNode is where the tunnel reaches a loopback server of the test: the
// same port at nodeAddr.
func onNode(ap netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(nodeAddr, ap.Port()) }

// tlsConfig is a bare client configuration presenting node's certificate,
// for clients that misbehave on purpose.
func (p *pki) tlsConfig(t testing.TB, node string) *tls.Config {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(p.path(node+".crt"), p.path(node+".key"))
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}
}

func testLogger(t testing.TB) zerolog.Logger {
	if testing.Verbose() {
		return zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.DebugLevel)
	}
	return zerolog.Nop()
}

// backend is a local server behind the tunnel. Each connection starts with a
// command byte:
//
//	'E' echo until EOF, then half-close
//	'S' read until EOF, then answer count (8 bytes) and sha256
//	'G' send 1 MiB of zeros, half-close, then read until EOF and report it
//	'R' read one more byte, then reset
//	'H' hold: read until EOF or error, report it
type backend struct {
	ln       *net.TCPListener
	results  chan error
	accepted atomic.Int64 // connections the backend accepted
}

func newBackend(t testing.TB) *backend {
	t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	b := &backend{ln: ln, results: make(chan error, 100)}
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			b.accepted.Add(1)
			go b.serve(c)
		}
	}()
	return b
}

func (b *backend) addr() netip.AddrPort { return b.ln.Addr().(*net.TCPAddr).AddrPort() }

func (b *backend) serve(c *net.TCPConn) {
	defer c.Close()
	var cmd [1]byte
	if _, err := io.ReadFull(c, cmd[:]); err != nil {
		return
	}
	buf := make([]byte, 32<<10)
	switch cmd[0] {
	case 'E':
		if _, err := io.CopyBuffer(struct{ io.Writer }{c}, struct{ io.Reader }{c}, buf); err == nil {
			c.CloseWrite()
		}
	case 'S':
		h := sha256.New()
		n, err := io.CopyBuffer(h, struct{ io.Reader }{c}, buf)
		if err != nil {
			return
		}
		var out [8]byte
		for i := range 8 {
			out[i] = byte(n >> (56 - 8*i))
		}
		c.Write(append(out[:], h.Sum(nil)...))
	case 'G':
		zeros := make([]byte, 1<<20)
		if _, err := c.Write(zeros); err != nil {
			b.results <- err
			return
		}
		c.CloseWrite()
		n, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{c}, buf)
		if err == nil && n != 12345 {
			err = errors.New("wrong count after half-close")
		}
		b.results <- err
	case 'R':
		io.ReadFull(c, cmd[:])
		c.SetLinger(0)
	case 'H':
		_, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{c}, buf)
		b.results <- err
	}
}

type harness struct {
	pki     *pki
	backend *backend
	server  *Server
	stats   *Stats
}

func newHarness(t testing.TB, mod func(*ServerOptions)) *harness {
	t.Helper()
	h := &harness{pki: newPKI(t), backend: newBackend(t), stats: new(Stats)}
	local := new(LocalAddrs)
	local.Set([]netip.Addr{nodeAddr})
	o := ServerOptions{
		Listen:           netip.MustParseAddrPort("127.0.0.1:0"),
		Credentials:      h.pki.creds(t, "b", "spiffe://test.local/node/a", "spiffe://test.local/node/b"),
		MaxConnections:   100,
		HandshakeTimeout: 2 * time.Second,
		Local:            local,
		Dial:             testDial,
		Stats:            h.stats,
		Logger:           testLogger(t),
	}
	if mod != nil {
		mod(&o)
	}
	s, err := Listen(o)
	if err != nil {
		t.Fatal(err)
	}
	h.server = s
	go s.Serve(context.Background())
	t.Cleanup(func() { s.Close() })
	return h
}

func (h *harness) client(t testing.TB, node string) *Client {
	var creds *Credentials
	if node != "" {
		creds = h.pki.creds(t, node)
	}
	return h.newClient(t, ClientOptions{Credentials: creds})
}

// newClient makes a client of the harness's server: to its port, through
// testDial, with a timeout and the test's log unless o says otherwise.
func (h *harness) newClient(t testing.TB, o ClientOptions) *Client {
	o.PeerPort, o.Dial = h.server.Addr().Port(), testDial
	if o.Timeout == 0 {
		o.Timeout = 5 * time.Second
	}
	o.Logger = testLogger(t)
	return NewClient(o)
}

// dst is the backend as the tunnel's clients name it.
func (h *harness) dst() string { return onNode(h.backend.addr()).String() }

func (h *harness) dial(t testing.TB, c *Client, cmd byte) *Conn {
	t.Helper()
	nc, err := c.DialContext(context.Background(), "tcp", h.dst())
	if err != nil {
		t.Fatal(err)
	}
	conn := nc.(*Conn)
	if _, err := conn.Write([]byte{cmd}); err != nil {
		t.Fatal(err)
	}
	return conn
}

// waitCount waits for the server to count reason (it counts after the
// client already saw the outcome).
func (h *harness) waitCount(t testing.TB, r Reason, want uint64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for h.stats.Errors(r) < want {
		if time.Now().After(deadline) {
			t.Fatalf("server counted %d %s, want %d; all: %v", h.stats.Errors(r), r, want, h.stats.ErrorCounts())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestEchoAndResumption: in protocol v1 (one TLS connection per tunnelled
// connection) the connections after the first resume a TLS session.
func TestEchoAndResumption(t *testing.T) {
	h := newHarness(t, nil)
	c := h.newClient(t, ClientOptions{Credentials: h.pki.creds(t, "a"), ProtocolV1: true})
	for i := range 3 {
		conn := h.dial(t, c, 'E')
		if conn.Resumed != (i > 0) {
			t.Errorf("connection %d: resumed %v", i, conn.Resumed)
		}
		echo(t, conn, 3<<20+17)
	}
	if n := h.stats.ServerHandshakes.Count(true, true); n != 2 {
		t.Errorf("server resumed %d sessions, want 2", n)
	}
}

// echo sends n random bytes through conn (an 'E' connection), half-closes,
// checks that exactly they come back and closes conn.
func echo(t testing.TB, conn net.Conn, n int) {
	t.Helper()
	data := make([]byte, n)
	rand.Read(data)
	go func() {
		conn.Write(data)
		conn.(*Conn).CloseWrite()
	}()
	got, err := io.ReadAll(conn)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("echo returned %d bytes that differ from the %d sent", len(got), len(data))
	}
	conn.Close()
}

func TestNoResumption(t *testing.T) {
	h := newHarness(t, nil)
	c := h.newClient(t, ClientOptions{Credentials: h.pki.creds(t, "a"), DisableResumption: true, ProtocolV1: true})
	for range 2 {
		conn := h.dial(t, c, 'E')
		if conn.Resumed {
			t.Error("resumed with resumption disabled")
		}
		conn.Close()
	}
}

func TestHalfCloseBothWays(t *testing.T) {
	for _, mode := range []string{"mtls", "plaintext"} {
		t.Run(mode, func(t *testing.T) {
			h := newHarness(t, func(o *ServerOptions) {
				if mode == "plaintext" {
					o.Credentials = nil
				}
			})
			node := "a"
			if mode == "plaintext" {
				node = ""
			}
			c := h.client(t, node)

			// Client half-closes, then reads the answer.
			conn := h.dial(t, c, 'S')
			payload := bytes.Repeat([]byte("x"), 100000)
			conn.Write(payload)
			if err := conn.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			ans, err := io.ReadAll(conn)
			if err != nil || len(ans) != 8+32 {
				t.Fatalf("answer after half-close: %d bytes, %v", len(ans), err)
			}
			if sum := sha256.Sum256(payload); !bytes.Equal(ans[8:], sum[:]) {
				t.Error("server received different bytes")
			}
			conn.Close()

			// Server half-closes, the client still sends.
			conn = h.dial(t, c, 'G')
			got, err := io.ReadAll(conn)
			if err != nil || len(got) != 1<<20 {
				t.Fatalf("reading until the server's half-close: %d bytes, %v", len(got), err)
			}
			conn.Write(make([]byte, 12345))
			conn.CloseWrite()
			if err := <-h.backend.results; err != nil {
				t.Errorf("server after its half-close: %v", err)
			}
			conn.Close()
		})
	}
}

func TestResetBothWays(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(t, "a")

	conn := h.dial(t, c, 'R')
	conn.Write([]byte{1})
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	var b [1]byte
	_, err := conn.Read(b[:])
	var ne net.Error
	if err == nil || err == io.EOF || (errors.As(err, &ne) && ne.Timeout()) {
		t.Errorf("backend reset; client read %v, want a reset error", err)
	}
	conn.Close()

	conn = h.dial(t, c, 'H')
	conn.Write([]byte("some bytes"))
	time.Sleep(50 * time.Millisecond)
	conn.Abort()
	select {
	case err := <-h.backend.results:
		if err == nil {
			t.Error("client reset; backend read a clean EOF")
		}
	case <-time.After(5 * time.Second):
		t.Error("client reset; backend never noticed")
	}
}

// TestTruncationIsNotEOF: a tunnel connection whose TCP stream ends without
// close_notify must reach the local server as an error, not as an end of
// stream it could take for a complete message.
func TestTruncationIsNotEOF(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(t, "a")
	conn := h.dial(t, c, 'H')
	conn.Write([]byte("partial message"))
	time.Sleep(50 * time.Millisecond)
	conn.raw.CloseWrite() // a bare FIN, no close_notify
	select {
	case err := <-h.backend.results:
		if err == nil {
			t.Error("tunnel stream cut without close_notify; backend read a clean EOF")
		}
	case <-time.After(5 * time.Second):
		t.Error("backend never noticed the cut")
	}
	conn.Abort()
}

func TestConcurrent(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(t, "a")
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for i := range 50 {
		wg.Go(func() {
			nc, err := c.DialContext(context.Background(), "tcp", h.dst())
			if err != nil {
				errs <- err
				return
			}
			defer nc.Close()
			data := bytes.Repeat([]byte{byte(i)}, 1000*i+1)
			go func() {
				nc.Write([]byte{'E'})
				nc.Write(data)
				nc.(*Conn).CloseWrite()
			}()
			got, err := io.ReadAll(nc)
			if err == nil && !bytes.Equal(got, data) {
				err = errors.New("echo differs")
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

// rawDial opens a TLS connection with cfg (or plain TCP with nil) to the
// tunnel server, for clients that misbehave.
func (h *harness) rawDial(t *testing.T, cfg *tls.Config) (net.Conn, error) {
	t.Helper()
	nc, err := net.Dial("tcp", h.server.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	if cfg == nil {
		return nc, nil
	}
	tc := tls.Client(nc, cfg)
	tc.SetDeadline(time.Now().Add(5 * time.Second))
	return tc, tc.Handshake()
}

// readStatus reads the server's answer to a header.
func readStatus(t *testing.T, c net.Conn) (Status, error) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var st [StatusSize]byte
	if _, err := io.ReadFull(c, st[:]); err != nil {
		return Status{}, err
	}
	return ParseStatus(st[:])
}

// TestBadInput sends every kind of bad input the server must refuse, checks
// the reason it counts (and answers, where a status is possible), and that
// it still serves a good client afterwards.
func TestBadInput(t *testing.T) {
	var closedPort uint16
	{
		ln, _ := net.Listen("tcp4", "127.0.0.1:0")
		closedPort = uint16(ln.Addr().(*net.TCPAddr).Port)
		ln.Close()
	}
	h := newHarness(t, func(o *ServerOptions) {
		o.HandshakeTimeout = 300 * time.Millisecond
	})
	// allow_ports needs a server of its own; it allows any identity of
	// the trust domain.
	hp := newHarness(t, func(o *ServerOptions) {
		o.AllowPorts = []uint16{1}
		o.Credentials.SetPolicy(policy(t))
	})
	backend := onNode(h.backend.addr())
	header := func(dst netip.AddrPort) []byte {
		b, err := AppendHeader(nil, dst)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	good := h.pki.tlsConfig(t, "a")

	cases := []struct {
		name   string
		h      *harness
		cfg    *tls.Config // nil: plain TCP
		send   []byte
		status bool // a status is answered
		want   Reason
	}{
		{"plaintext", h, nil, []byte("GET / HTTP/1.1\r\nHost: b\r\n\r\n"), false, ReasonNotTLS},
		{"garbage", h, nil, bytes.Repeat([]byte{0xff, 0x00, 0x42}, 100), false, ReasonNotTLS},
		{"silent TCP client", h, nil, nil, false, ReasonHandshakeTimeout},
		{"silent TLS client", h, good, nil, false, ReasonHeaderTimeout},
		{"truncated header", h, good, header(backend)[:10], false, ReasonTruncatedHeader},
		{"oversized header", h, good, append(header(backend), "payload too early"...), true, ReasonOversizedHeader},
		{"unknown version", h, good, func() []byte { b := header(backend); b[4] = 9; return b }(), true, ReasonUnsupportedVersion},
		{"bad magic", h, good, func() []byte { b := header(backend); b[0] = 'X'; return b }(), true, ReasonBadMagic},
		{"relay attempt", h, good, header(netip.MustParseAddrPort("192.0.2.1:80")), true, ReasonNotLocal},
		{"to the tunnel port itself", h, good, header(onNode(h.server.Addr())), true, ReasonOwnPort},
		{"port not allowed", hp, hp.pki.tlsConfig(t, "a"), header(onNode(hp.backend.addr())), true, ReasonPortNotAllowed},
		{"nothing listening", h, good, header(netip.AddrPortFrom(nodeAddr, closedPort)), true, ReasonUnreachable},
		// The backend listens on 127.0.0.1: a peer must not reach it.
		{"loopback", h, good, header(h.backend.addr()), true, ReasonLoopback},
		{"loopback, another address", h, good, header(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.53"), h.backend.addr().Port())), true, ReasonLoopback},
		{"loopback IPv6", h, good, header(netip.AddrPortFrom(netip.IPv6Loopback(), h.backend.addr().Port())), true, ReasonLoopback},
		{"loopback, tunnel port", h, good, header(h.server.Addr()), true, ReasonLoopback},
		{"other CA", h, h.pki.tlsConfig(t, "stranger"), nil, false, ReasonUnknownCA},
		{"expired", h, h.pki.tlsConfig(t, "expired"), nil, false, ReasonCertExpired},
		{"identity not allowed", h, h.pki.tlsConfig(t, "c"), nil, false, ReasonIdentityNotAllowed},
		// With allow_identities empty the trust domain still decides.
		{"no SPIFFE ID, any identity allowed", hp, hp.pki.tlsConfig(t, "noid"), nil, false, ReasonBadIdentity},
		{"another trust domain, any identity allowed", hp, hp.pki.tlsConfig(t, "foreign"), nil, false, ReasonWrongTrustDomain},
		{"no client certificate", h, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}, nil, false, ReasonTLSHandshake},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := c.h.stats.Errors(c.want)
			conn, err := c.h.rawDial(t, c.cfg)
			if err == nil && c.send != nil {
				_, err = conn.Write(c.send)
			}
			if err == nil && c.want == ReasonTruncatedHeader {
				err = conn.(*tls.Conn).CloseWrite()
			}
			if c.status {
				if err != nil {
					t.Fatal(err)
				}
				st, err := readStatus(t, conn)
				if err != nil {
					t.Fatalf("reading the status: %v", err)
				}
				if st.OK || st.Reason != c.want {
					t.Errorf("status %+v, want refused %s", st, c.want)
				}
			} else if err == nil {
				// The server ends the connection without a status.
				conn.SetReadDeadline(time.Now().Add(5 * time.Second))
				var b [1]byte
				if n, err := conn.Read(b[:]); n != 0 || err == nil {
					t.Errorf("server answered %d bytes, %v", n, err)
				}
			}
			c.h.waitCount(t, c.want, before+1)
		})
	}
	// The server still serves.
	conn := h.dial(t, h.client(t, "a"), 'E')
	conn.Write([]byte("still here"))
	conn.CloseWrite()
	if got, err := io.ReadAll(conn); err != nil || string(got) != "still here" {
		t.Errorf("after the bad input: %q, %v", got, err)
	}
}

// TestClientRefusals: what the client does when the peer refuses or is not
// who it should be.
func TestClientRefusals(t *testing.T) {
	h := newHarness(t, nil)
	ctx := context.Background()

	// The peer refuses: a RefusedError naming its reason.
	c := h.client(t, "a")
	_, err := c.DialContext(ctx, "tcp", onNode(h.server.Addr()).String())
	var re *RefusedError
	if !errors.As(err, &re) || re.Reason != ReasonOwnPort {
		t.Errorf("dial to the tunnel port: %v, want a refusal for own_port", err)
	}
	if n := c.stats.Errors(ReasonPeerRefused); n != 1 {
		t.Errorf("client counted %d peer_refused", n)
	}

	// The server's certificate is from another CA: the client refuses it.
	stranger := newHarness(t, func(o *ServerOptions) {
		p := newPKI(t) // another CA, the same names
		o.Credentials = p.creds(t, "b")
	})
	c = stranger.newClient(t, ClientOptions{Credentials: h.pki.creds(t, "a")})
	if _, err := c.DialContext(ctx, "tcp", stranger.dst()); err == nil {
		t.Error("client accepted a server certificate from another CA")
	}
	if n := c.stats.Errors(ReasonPeerHandshake); n != 1 {
		t.Errorf("client counted %d peer_handshake", n)
	}

	// The server's identity is not allowed.
	c = h.newClient(t, ClientOptions{Credentials: h.pki.creds(t, "a", "spiffe://test.local/node/z")})
	if _, err := c.DialContext(ctx, "tcp", h.dst()); err == nil {
		t.Error("client accepted a server identity outside allow_identities")
	}
	// Nor is a server without a SPIFFE ID, or of another trust domain,
	// with allow_identities empty.
	// (A TLS server of its own: smeshd would not start with either.)
	for _, name := range []string{"noid", "foreign"} {
		ln, err := tls.Listen("tcp4", "127.0.0.1:0", h.pki.tlsConfig(t, name))
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.(*tls.Conn).Handshake()
				c.Close()
			}
		}()
		c = NewClient(ClientOptions{PeerPort: uint16(ln.Addr().(*net.TCPAddr).Port), Credentials: h.pki.creds(t, "a"), Dial: testDial})
		_, err = c.DialContext(ctx, "tcp", h.dst())
		if err == nil {
			t.Errorf("client accepted the server certificate %q", name)
		}
		if n := c.stats.Errors(ReasonPeerHandshake); n != 1 {
			t.Errorf("server certificate %q: client counted %d peer_handshake (%v)", name, n, err)
		}
	}
}

// TestPeerRefusesHandshake: when the server refuses this node's
// certificate, the client says that the peer refused the handshake and
// what its TLS alert tells, whether the alert comes before the header is
// sent or after (in TLS 1.3 the client's handshake is done before the
// server has checked its certificate).
func TestPeerRefusesHandshake(t *testing.T) {
	h := newHarness(t, nil) // allows a and b only
	c := h.client(t, "c")
	for i := range 10 {
		_, err := c.DialContext(context.Background(), "tcp", h.dst())
		if err == nil || !strings.Contains(err.Error(), "refused the TLS handshake") || !strings.Contains(err.Error(), "bad certificate") {
			t.Fatalf("dial %d with an identity the server refuses: %v, want the peer's refusal and its alert", i, err)
		}
	}
	if n := c.stats.Errors(ReasonPeerRefusedHandshake); n != 10 {
		t.Errorf("client counted %d peer_refused_handshake of 10; all: %v", n, c.stats.ErrorCounts())
	}

	// The server resets the connection after its alert, and the client
	// sends its header only once the reset arrived: the write fails, the
	// alert is still there to read.
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	closed := make(chan struct{})
	go func() {
		defer close(closed)
		nc, err := ln.AcceptTCP()
		if err != nil {
			return
		}
		strict := h.pki.creds(t, "b", "spiffe://test.local/node/a")
		tls.Server(nc, strict.ServerConfig()).Handshake()
		nc.SetLinger(0)
		nc.Close()
	}()
	c = NewClient(ClientOptions{
		PeerPort:    uint16(ln.Addr().(*net.TCPAddr).Port),
		Credentials: h.pki.creds(t, "c"),
		Dial:        testDial,
		Timeout:     5 * time.Second,
	})
	c.testHookHandshakeDone = func() { <-closed }
	_, err = c.DialContext(context.Background(), "tcp", h.dst())
	if err == nil || !strings.Contains(err.Error(), "refused the TLS handshake") || !strings.Contains(err.Error(), "bad certificate") {
		t.Errorf("header sent after the peer's alert and reset: %v, want the peer's refusal and its alert", err)
	}
	if n := c.stats.Errors(ReasonPeerRefusedHandshake); n != 1 {
		t.Errorf("client counted %d peer_refused_handshake; all: %v", n, c.stats.ErrorCounts())
	}
}

// TestMaxConnections: over max_connections, a client gets a clear refusal;
// once a slot is free, it is served again.
func TestMaxConnections(t *testing.T) {
	h := newHarness(t, func(o *ServerOptions) { o.MaxConnections = 2 })
	c := h.client(t, "a")
	held := []*Conn{h.dial(t, c, 'H'), h.dial(t, c, 'H')}
	_, err := c.DialContext(context.Background(), "tcp", h.dst())
	var re *RefusedError
	if !errors.As(err, &re) || re.Reason != ReasonTooManyConnections {
		t.Fatalf("third connection: %v, want too_many_connections", err)
	}
	held[0].CloseWrite()
	<-h.backend.results
	held[0].Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		nc, err := c.DialContext(context.Background(), "tcp", h.dst())
		if err == nil {
			nc.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a slot was freed but the server still refuses: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	held[1].Close()
}

// TestRotation: new certificate files are picked up without a restart, and
// a connection opened before the rotation keeps working.
func TestRotation(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(t, "a")
	open := h.dial(t, c, 'E')

	// The server's files are replaced by those of a new CA: the old
	// client no longer gets in, a client of the new CA does.
	next := newPKI(t)
	for _, f := range []string{"b.crt", "b.key", "ca.crt"} {
		data, _ := os.ReadFile(next.path(f))
		tmp := h.pki.path(f + ".tmp")
		os.WriteFile(tmp, data, 0o600)
		os.Rename(tmp, h.pki.path(f))
	}
	time.Sleep(reloadInterval + 100*time.Millisecond)
	newClient := h.newClient(t, ClientOptions{Credentials: next.creds(t, "a")})
	deadline := time.Now().Add(5 * time.Second)
	for {
		// The first handshake after the interval triggers the reload
		// and may still use the old set.
		nc, err := newClient.DialContext(context.Background(), "tcp", h.dst())
		if err == nil {
			nc.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("client of the new CA refused after rotation: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if nc, err := c.DialContext(context.Background(), "tcp", h.dst()); err == nil {
		nc.Close()
		t.Error("client of the old CA still accepted after rotation (resumed session?)")
	}
	open.Write([]byte("across the rotation"))
	open.CloseWrite()
	if got, err := io.ReadAll(open); err != nil || string(got) != "across the rotation" {
		t.Errorf("connection opened before the rotation: %q, %v", got, err)
	}
}

// TestRelayAllocations: the relay and the tunnel connection allocate
// nothing per read or write, in either direction: 4096 round trips of one
// TLS record (16 KiB) each way. crypto/tls itself allocates a small reader
// per read of its connection, three per round trip: one at the client (the
// test reads), two at the server's relay (it first takes what is at hand,
// nothing, then waits and reads); anything of ours that allocated per read
// or per write would add at least 4096 on top. (The server's look for more
// to read allocated twice per write.)
func TestRelayAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are meaningless under the race detector")
	}
	h := newHarness(t, nil)
	c := h.client(t, "a")
	conn := h.dial(t, c, 'E')
	chunk := make([]byte, 16<<10)
	echo := make([]byte, len(chunk))
	roundTrip := func() {
		t.Helper()
		if _, err := conn.Write(chunk); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(conn, echo); err != nil {
			t.Fatal(err)
		}
	}
	roundTrip() // warm up buffers on both sides
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range 4096 {
		roundTrip()
	}
	runtime.ReadMemStats(&after)
	conn.CloseWrite()
	if rest, err := io.ReadAll(conn); err != nil || len(rest) != 0 {
		t.Fatalf("after the echo: %d bytes more, %v", len(rest), err)
	}
	t.Logf("%d allocations", after.Mallocs-before.Mallocs)
	if n := after.Mallocs - before.Mallocs; n > 3*4096+512 {
		t.Errorf("%d allocations in 4096 round trips through the tunnel", n)
	}
}

func TestLocalAddrs(t *testing.T) {
	var l LocalAddrs
	if !l.Contains(netip.MustParseAddr("127.0.0.5")) || !l.Contains(netip.MustParseAddr("::1")) {
		t.Error("loopback is not local")
	}
	if l.Contains(netip.MustParseAddr("10.0.0.1")) {
		t.Error("empty set contains 10.0.0.1")
	}
	l.Set([]netip.Addr{netip.MustParseAddr("10.0.0.1")})
	if !l.Contains(netip.MustParseAddr("10.0.0.1")) || !l.Contains(netip.MustParseAddr("::ffff:10.0.0.1")) {
		t.Error("set address is not local")
	}
	if l.Contains(netip.MustParseAddr("10.0.0.2")) {
		t.Error("10.0.0.2 is local")
	}
}

// BenchmarkConnect measures new tunnel connections per second over loopback
// (client, server and backend in this process): open, a one-byte request
// and its echo, close. "pooled" is what smeshd does between nodes of this
// version (protocol v2: a warm TLS connection, no handshake); "resumed" is
// protocol v1 with a TLS session resumed per connection (what an older
// peer gets); "full" turns resumption off too.
//
//	go test -run '^$' -bench Connect -benchtime 3s ./pkg/tunnel
func BenchmarkConnect(b *testing.B) {
	for _, mode := range []string{"pooled", "resumed", "full"} {
		b.Run(mode, func(b *testing.B) {
			h := newHarness(b, nil)
			c := h.newClient(b, ClientOptions{
				Credentials:       h.pki.creds(b, "a"),
				DisableResumption: mode == "full",
				ProtocolV1:        mode != "pooled",
			})
			dst := h.dst()
			var one [1]byte
			b.ResetTimer()
			for b.Loop() {
				nc, err := c.OpenEarly(context.Background(), "tcp", dst, []byte{'E', 1})
				if err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(nc, one[:]); err != nil {
					b.Fatal(err)
				}
				nc.(*Conn).CloseWrite()
				if _, err := io.ReadAll(nc); err != nil {
					b.Fatal(err)
				}
				nc.Close()
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "conn/s")
			if mode == "resumed" && h.stats.ServerHandshakes.Count(true, true) == 0 {
				b.Error("no session was resumed")
			}
			if mode == "pooled" && h.handshakes() > 2 {
				b.Errorf("%d handshakes", h.handshakes())
			}
		})
	}
}

// BenchmarkThroughput measures one tunnel connection's bulk throughput over
// loopback (client, server and backend in this process): 64 KiB writes into
// the tunnel, relayed by the server to a local sink.
//
//	go test -run '^$' -bench Throughput ./pkg/tunnel
func BenchmarkThroughput(b *testing.B) {
	h := newHarness(b, nil)
	c := h.client(b, "a")
	conn := h.dial(b, c, 'S')
	chunk := make([]byte, 64<<10)
	b.SetBytes(int64(len(chunk)))
	b.ResetTimer()
	for b.Loop() {
		if _, err := conn.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	conn.CloseWrite()
	if _, err := io.ReadAll(conn); err != nil {
		b.Fatal(err)
	}
}

// TestPins: with [[tunnel.tls.peers]], the client opens a tunnel to a
// destination only to a server whose identity the most specific entry for
// it lists; destinations outside every entry may be served by any peer.
func TestPins(t *testing.T) {
	h := newHarness(t, nil) // the server is node b
	pinned := func(pins ...Pin) *Client {
		p := policy(t)
		p.Pins = pins
		return h.newClient(t, ClientOptions{Credentials: h.pki.credsWith(t, "a", p)})
	}
	b, c := spiffeid.RequireFromString("spiffe://test.local/node/b"), spiffeid.RequireFromString("spiffe://test.local/node/c")
	node := netip.PrefixFrom(nodeAddr, 32)
	wide := netip.MustParsePrefix("198.18.0.0/15")
	for _, tc := range []struct {
		name string
		pins []Pin
		ok   bool
	}{
		{"pinned to the server's identity", []Pin{{node, []spiffeid.ID{b}}}, true},
		{"pinned to another identity", []Pin{{node, []spiffeid.ID{c}}}, false},
		{"pinned to both", []Pin{{node, []spiffeid.ID{c, b}}}, true},
		{"the most specific entry decides", []Pin{{node, []spiffeid.ID{c}}, {wide, []spiffeid.ID{b}}}, false},
		{"the most specific entry decides, allowing", []Pin{{wide, []spiffeid.ID{c}}, {node, []spiffeid.ID{b}}}, true},
		{"not pinned", []Pin{{netip.MustParsePrefix("198.19.0.0/16"), []spiffeid.ID{c}}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cl := pinned(tc.pins...)
			slices.SortStableFunc(cl.creds.policy.Load().Pins, func(x, y Pin) int { return y.Prefix.Bits() - x.Prefix.Bits() })
			for i := range 2 { // a full handshake, then a resumed one
				nc, err := cl.DialContext(context.Background(), "tcp", h.dst())
				if tc.ok {
					if err != nil {
						t.Fatalf("dial %d: %v", i, err)
					}
					nc.Close()
					continue
				}
				if err == nil {
					nc.Close()
					t.Fatalf("dial %d: a server that is not pinned for %s was accepted", i, nodeAddr)
				}
				if !strings.Contains(err.Error(), "spiffe://test.local/node/b, which tunnel.tls.peers does not list") {
					t.Errorf("dial %d: %v", i, err)
				}
			}
			if n := cl.stats.Errors(ReasonPeerIdentity); !tc.ok && n != 2 {
				t.Errorf("client counted %d peer_identity, want 2", n)
			}
		})
	}
	// A session resumed for one destination is checked against the pins of
	// the next: the same server (the same session cache entry) for another
	// destination pinned to someone else is refused.
	p := policy(t)
	p.Pins = []Pin{{netip.PrefixFrom(nodeAddr, 32), []spiffeid.ID{c}}}
	cl := h.newClient(t, ClientOptions{Credentials: h.pki.credsWith(t, "a", p)})
	if nc, err := cl.DialContext(context.Background(), "tcp", "127.0.0.1:"+strconv.Itoa(int(h.backend.addr().Port()))); err == nil {
		nc.Close()
	}
	if nc, err := cl.DialContext(context.Background(), "tcp", h.dst()); err == nil {
		nc.Close()
		t.Error("a resumed session skipped the pin")
	}
}

// TestPinsFromConfig: NewIdentityPolicy turns [[tunnel.tls.peers]] into pins,
// most specific first.
func TestPinsFromConfig(t *testing.T) {
	cfg := config.Default().Tunnel.TLS
	cfg.Peers = []config.Peer{
		{CIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}, Identities: []string{"spiffe://smesh.local/node/x"}},
		{CIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.2.0/24"), netip.MustParsePrefix("fd00:5e::/32")}, Identities: []string{"spiffe://smesh.local/node/y"}},
	}
	p, err := NewIdentityPolicy(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for dst, want := range map[string]string{
		"10.1.2.3":   "spiffe://smesh.local/node/y",
		"10.1.3.3":   "spiffe://smesh.local/node/x",
		"fd00:5e::1": "spiffe://smesh.local/node/y",
		"11.0.0.1":   "",
	} {
		pin, ok := p.pinned(netip.MustParseAddr(dst))
		got := ""
		if ok {
			got = pin.IDs[0].String()
		}
		if got != want {
			t.Errorf("pin for %s: %q, want %q", dst, got, want)
		}
	}
	cfg.Peers[0].Identities = []string{"spiffe://other.example/node/x"}
	if _, err := NewIdentityPolicy(cfg); err == nil {
		t.Error("a pinned identity outside the trust domain was accepted")
	}
}

// TestHandshakeBudget: many idle connections from one source, more than
// max_connections and max_handshakes_per_source, renewed as they are
// refused, neither take the places of authenticated connections nor keep a
// legitimate peer out, even one from the same source address.
func TestHandshakeBudget(t *testing.T) {
	h := newHarness(t, func(o *ServerOptions) {
		o.MaxConnections = 4
		o.MaxHandshakes = 16
		o.MaxHandshakesPerSource = 8
		o.HandshakeTimeout = time.Minute // idle connections stay until pushed out
	})
	c := h.client(t, "a")
	held := []*Conn{h.dial(t, c, 'H')}

	// 50 idle connections from 127.0.0.1: beyond 8 they are reset at
	// once, for none of the 8 pending is stale yet.
	idle := func(src string, n int) {
		for range n {
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
			// The server may reset it before connect(2) returns.
			if nc, err := d.Dial("tcp4", h.server.Addr().String()); err == nil {
				t.Cleanup(func() { nc.Close() })
			}
		}
	}
	idle("127.0.0.1", 50)
	h.waitCount(t, ReasonTooManyHandshakes, 42)
	if total, mine := h.server.handshakes.pendingCount(netip.MustParseAddr("127.0.0.1")); total != 8 || mine != 8 {
		t.Errorf("%d connections pending, %d from 127.0.0.1; want 8 and 8", total, mine)
	}
	// Once they are stale, a peer from the same address takes the place
	// of the oldest, and gets through; the idle connections held no place
	// among max_connections.
	time.Sleep(staleAfter(time.Minute) + 100*time.Millisecond)
	for range 3 {
		held = append(held, h.dial(t, c, 'H'))
	}
	// (The first one pushed one out; the others found the place free.)
	if n := h.stats.Errors(ReasonHandshakeEvicted); n != 1 {
		t.Errorf("%d stale handshakes evicted, want 1", n)
	}
	// More sources: over the total, the busiest source with stale
	// connections (127.0.0.1, not the fresh 127.0.0.2) makes room.
	idle("127.0.0.2", 8)
	idle("127.0.0.3", 4)
	deadline := time.Now().Add(5 * time.Second)
	for {
		total, mine := h.server.handshakes.pendingCount(netip.MustParseAddr("127.0.0.3"))
		if total == 16 && mine == 4 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d connections pending, %d from 127.0.0.3; want 16 and 4", total, mine)
		}
		time.Sleep(10 * time.Millisecond)
	}
	_, fromFirst := h.server.handshakes.pendingCount(netip.MustParseAddr("127.0.0.1"))
	if fromFirst != 4 {
		t.Errorf("127.0.0.1 has %d pending, want 4: its stale connections make room", fromFirst)
	}
	// An eviction is counted by the evicted connection's own goroutine,
	// which may run after the pending counts changed.
	h.waitCount(t, ReasonHandshakeEvicted, 4)
	if n := h.stats.Errors(ReasonHandshakeEvicted); n != 4 {
		t.Errorf("%d stale handshakes evicted in all, want 4", n)
	}
	for _, conn := range held {
		conn.Write([]byte("still served"))
		conn.CloseWrite()
		if err := <-h.backend.results; err != nil {
			t.Errorf("held connection: %v", err)
		}
		conn.Close()
	}
}

// TestIdleTimeout: a tunnelled connection that moves nothing for
// idle_timeout is reset at both ends; one that keeps moving is not.
func TestIdleTimeout(t *testing.T) {
	h := newHarness(t, func(o *ServerOptions) { o.IdleTimeout = 500 * time.Millisecond })
	c := h.client(t, "a")
	busy := h.dial(t, c, 'E')
	idle := h.dial(t, c, 'H')
	idle.Write([]byte("then nothing"))

	// The busy one echoes a byte every 100 ms for 1.5 s.
	for i := range 15 {
		if _, err := busy.Write([]byte{byte(i)}); err != nil {
			t.Fatalf("busy connection, write %d: %v", i, err)
		}
		var b [1]byte
		busy.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(busy, b[:]); err != nil || b[0] != byte(i) {
			t.Fatalf("busy connection, echo %d: %v", i, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	select {
	case err := <-h.backend.results:
		if err == nil {
			t.Error("idle connection: the backend read a clean end of stream, want a reset")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("idle connection still open at the backend")
	}
	idle.SetReadDeadline(time.Now().Add(5 * time.Second))
	var b [1]byte
	if _, err := idle.Read(b[:]); err == nil || errors.Is(err, io.EOF) || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("idle connection, client side: %v, want a reset", err)
	}
	if n := h.stats.Errors(ReasonIdleTimeout); n != 1 {
		t.Errorf("server counted %d idle_timeout, want 1", n)
	}
	busy.CloseWrite()
	if rest, err := io.ReadAll(busy); err != nil || len(rest) != 0 {
		t.Errorf("busy connection at its end: %q, %v", rest, err)
	}
}

// TestReadNoWait: what the relay reads a tunnel connection with, in both
// protocols: nothing at hand is ErrWouldBlock at once; WaitReadable waits
// for the peer's bytes (under the read deadline) and then ReadNoWait has
// them; the peer's end of stream comes through as io.EOF.
func TestReadNoWait(t *testing.T) {
	h := newHarness(t, nil)
	for _, v1 := range []bool{false, true} {
		t.Run(fmt.Sprintf("v1=%v", v1), func(t *testing.T) {
			c := h.newClient(t, ClientOptions{Credentials: h.pki.creds(t, "a"), ProtocolV1: v1})
			conn := h.dial(t, c, 'E')
			buf := make([]byte, 64<<10)
			// The first read waits for the peer's status (v2): the echo
			// of a first message.
			if _, err := conn.Write([]byte("hello")); err != nil {
				t.Fatal(err)
			}
			if n, err := io.ReadFull(conn, buf[:5]); err != nil || string(buf[:n]) != "hello" {
				t.Fatalf("echo: %q, %v", buf[:n], err)
			}

			if n, err := conn.ReadNoWait(buf); n != 0 || !errors.Is(err, proxy.ErrWouldBlock) {
				t.Fatalf("ReadNoWait with nothing sent: %d, %v; want ErrWouldBlock", n, err)
			}
			conn.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			if err := conn.WaitReadable(); !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("WaitReadable with nothing sent: %v; want the deadline", err)
			}
			conn.SetReadDeadline(time.Time{})

			msg := make([]byte, 200<<10)
			rand.Read(msg)
			go func() {
				conn.Write(msg)
				conn.CloseWrite()
			}()
			var got []byte
			for {
				n, err := conn.ReadNoWait(buf)
				got = append(got, buf[:n]...)
				if errors.Is(err, proxy.ErrWouldBlock) {
					if err := conn.WaitReadable(); err != nil {
						t.Fatalf("WaitReadable: %v", err)
					}
					continue
				}
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatalf("ReadNoWait after %d bytes: %v", len(got), err)
				}
			}
			if !bytes.Equal(got, msg) {
				t.Fatalf("echo: %d bytes, not what was sent", len(got))
			}
		})
	}
}

// TestReadNoWaitBeforeStatus: before the peer's status, ReadNoWait does
// not wait for it (the relay would hold a buffer meanwhile, one per
// connection a busy peer has not answered yet): it says ErrWouldBlock,
// WaitReadable waits for the status, and the bytes after it come as usual.
func TestReadNoWaitBeforeStatus(t *testing.T) {
	gate := make(chan struct{})
	h := newHarness(t, func(o *ServerOptions) {
		// The server answers once it connected to the destination:
		// held here, the status stays pending.
		o.Dial = func(ctx context.Context, network, address string) (net.Conn, error) {
			<-gate
			return testDial(ctx, network, address)
		}
	})
	c := h.client(t, "a")
	nc, err := c.OpenEarly(context.Background(), "tcp", h.dst(), []byte("Ehello"))
	if err != nil {
		t.Fatal(err)
	}
	conn := nc.(*Conn)
	defer conn.Close()
	buf := make([]byte, 64)
	done := make(chan error, 1)
	go func() {
		_, err := conn.ReadNoWait(buf)
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, proxy.ErrWouldBlock) {
			t.Fatalf("ReadNoWait before the status: %v, want ErrWouldBlock", err)
		}
	case <-time.After(5 * time.Second):
		close(gate)
		t.Fatal("ReadNoWait before the status waited for it")
	}
	close(gate)
	var got []byte
	for len(got) < 5 {
		if err := conn.WaitReadable(); err != nil {
			t.Fatalf("WaitReadable: %v", err)
		}
		n, err := conn.ReadNoWait(buf)
		got = append(got, buf[:n]...)
		if err != nil && !errors.Is(err, proxy.ErrWouldBlock) {
			t.Fatalf("ReadNoWait after %q: %v", got, err)
		}
	}
	if string(got) != "hello" {
		t.Fatalf("echo %q, want hello", got)
	}
}

// TestStatusTimeoutWithoutBuffer: a relay that waits for the status without
// a buffer (WaitReadable, ReadNoWait) still gives up after the client's
// timeout, with an error that is not a deadline's (the relay's idle timeout
// would take that for its own and read again).
func TestStatusTimeoutWithoutBuffer(t *testing.T) {
	gate := make(chan struct{})
	h := newHarness(t, func(o *ServerOptions) {
		o.Dial = func(ctx context.Context, network, address string) (net.Conn, error) {
			<-gate
			return testDial(ctx, network, address)
		}
	})
	t.Cleanup(func() { close(gate) }) // before the server closes
	c := h.newClient(t, ClientOptions{Credentials: h.pki.creds(t, "a"), Timeout: 200 * time.Millisecond})
	nc, err := c.OpenEarly(context.Background(), "tcp", h.dst(), []byte("E"))
	if err != nil {
		t.Fatal(err)
	}
	conn := nc.(*Conn)
	defer conn.Close()
	buf := make([]byte, 64)
	for i := 0; ; i++ {
		if i == 100 {
			t.Fatal("no end to the wait for a status that never comes")
		}
		if err := conn.WaitReadable(); err != nil {
			t.Fatalf("WaitReadable: %v", err)
		}
		_, err := conn.ReadNoWait(buf)
		if errors.Is(err, proxy.ErrWouldBlock) {
			continue
		}
		if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("ReadNoWait without a status: %v, want an error that is not a deadline's", err)
		}
		break
	}
}

// TestMoreLooksUntilIdle: a server stream looks at its local end for more
// to send along (corking) while each look finds some, and stops looking
// once one finds nothing: request/response connections then cost no
// recv(MSG_PEEK) per answer.
func TestMoreLooksUntilIdle(t *testing.T) {
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	far, err := net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer far.Close()
	near, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	defer near.Close()
	rc, err := near.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	far.Write([]byte("x"))
	s := &serverStream{local: newPeeker(rc)}
	for !s.more() { // the byte is on its way: look again, afresh
		time.Sleep(time.Millisecond)
		s = &serverStream{local: newPeeker(rc)}
	}
	if !s.more() {
		t.Fatal("a look with a byte to read found nothing")
	}
	io.ReadFull(near, make([]byte, 1))
	if s.more() {
		t.Fatal("a look with nothing to read found something")
	}
	far.Write([]byte("y"))
	time.Sleep(10 * time.Millisecond) // the byte arrives; more() must not look anyway
	if s.more() {
		t.Error("after a look found nothing, more() looked again")
	}
}
