package tunnel

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/smesh-dev/smesh/pkg/certs"
)

// pki is a test CA with node certificates in a directory, plus material a
// tunnel must refuse: another CA's node, an expired node.
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
	return p
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
	c, err := LoadCredentials(p.path(node+".crt"), p.path(node+".key"), p.path("ca.crt"), allow, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

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
	ln      *net.TCPListener
	results chan error
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
	o := ServerOptions{
		Listen:           netip.MustParseAddrPort("127.0.0.1:0"),
		Credentials:      h.pki.creds(t, "b", "spiffe://test.local/node/a", "spiffe://test.local/node/b"),
		MaxConnections:   100,
		HandshakeTimeout: 2 * time.Second,
		Local:            new(LocalAddrs),
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
	return NewClient(ClientOptions{PeerPort: h.server.Addr().Port(), Credentials: creds, Timeout: 5 * time.Second, Logger: testLogger(t)})
}

func (h *harness) dial(t testing.TB, c *Client, cmd byte) *Conn {
	t.Helper()
	nc, err := c.DialContext(context.Background(), "tcp", h.backend.addr().String())
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

func TestEchoAndResumption(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(t, "a")
	for i := range 3 {
		conn := h.dial(t, c, 'E')
		if conn.Resumed != (i > 0) {
			t.Errorf("connection %d: resumed %v", i, conn.Resumed)
		}
		data := make([]byte, 3<<20+17)
		rand.Read(data)
		go func() {
			conn.Write(data)
			conn.CloseWrite()
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
	if n := h.stats.ServerHandshakes.Count(true, true); n != 2 {
		t.Errorf("server resumed %d sessions, want 2", n)
	}
}

func TestNoResumption(t *testing.T) {
	h := newHarness(t, nil)
	c := NewClient(ClientOptions{PeerPort: h.server.Addr().Port(), Credentials: h.pki.creds(t, "a"), DisableResumption: true})
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
			nc, err := c.DialContext(context.Background(), "tcp", h.backend.addr().String())
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
	// allow_ports needs a server of its own.
	hp := newHarness(t, func(o *ServerOptions) { o.AllowPorts = []uint16{1} })
	backend := h.backend.addr()
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
		{"to the tunnel port itself", h, good, header(h.server.Addr()), true, ReasonOwnPort},
		{"port not allowed", hp, hp.pki.tlsConfig(t, "a"), header(hp.backend.addr()), true, ReasonPortNotAllowed},
		{"nothing listening", h, good, header(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), closedPort)), true, ReasonUnreachable},
		{"other CA", h, h.pki.tlsConfig(t, "stranger"), nil, false, ReasonUnknownCA},
		{"expired", h, h.pki.tlsConfig(t, "expired"), nil, false, ReasonCertExpired},
		{"identity not allowed", h, h.pki.tlsConfig(t, "c"), nil, false, ReasonIdentityNotAllowed},
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
	_, err := c.DialContext(ctx, "tcp", "127.0.0.1:"+itoa(h.server.Addr().Port()))
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
	c = NewClient(ClientOptions{PeerPort: stranger.server.Addr().Port(), Credentials: h.pki.creds(t, "a")})
	if _, err := c.DialContext(ctx, "tcp", stranger.backend.addr().String()); err == nil {
		t.Error("client accepted a server certificate from another CA")
	}
	if n := c.stats.Errors(ReasonPeerHandshake); n != 1 {
		t.Errorf("client counted %d peer_handshake", n)
	}

	// The server's identity is not allowed.
	c = NewClient(ClientOptions{PeerPort: h.server.Addr().Port(), Credentials: h.pki.creds(t, "a", "spiffe://test.local/node/z")})
	if _, err := c.DialContext(ctx, "tcp", h.backend.addr().String()); err == nil {
		t.Error("client accepted a server identity outside allow_identities")
	}
}

func itoa(p uint16) string {
	return netip.AddrPortFrom(netip.IPv4Unspecified(), p).String()[len("0.0.0.0:"):]
}

// TestMaxConnections: over max_connections, a client gets a clear refusal;
// once a slot is free, it is served again.
func TestMaxConnections(t *testing.T) {
	h := newHarness(t, func(o *ServerOptions) { o.MaxConnections = 2 })
	c := h.client(t, "a")
	held := []*Conn{h.dial(t, c, 'H'), h.dial(t, c, 'H')}
	_, err := c.DialContext(context.Background(), "tcp", h.backend.addr().String())
	var re *RefusedError
	if !errors.As(err, &re) || re.Reason != ReasonTooManyConnections {
		t.Fatalf("third connection: %v, want too_many_connections", err)
	}
	held[0].CloseWrite()
	<-h.backend.results
	held[0].Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		nc, err := c.DialContext(context.Background(), "tcp", h.backend.addr().String())
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
	newClient := NewClient(ClientOptions{PeerPort: h.server.Addr().Port(), Credentials: next.creds(t, "a")})
	deadline := time.Now().Add(5 * time.Second)
	for {
		// The first handshake after the interval triggers the reload
		// and may still use the old set.
		nc, err := newClient.DialContext(context.Background(), "tcp", h.backend.addr().String())
		if err == nil {
			nc.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("client of the new CA refused after rotation: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if nc, err := c.DialContext(context.Background(), "tcp", h.backend.addr().String()); err == nil {
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
// nothing per read. 64 MiB are 4096 TLS records, and the server's relay
// reads at most one record per read. crypto/tls itself allocates a small
// reader per socket read (about one per two records here); anything of ours
// that allocated per read would add at least one per record on top.
func TestRelayAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are meaningless under the race detector")
	}
	h := newHarness(t, nil)
	c := h.client(t, "a")
	conn := h.dial(t, c, 'S')
	chunk := make([]byte, 64<<10)
	conn.Write(chunk) // warm up buffers on both sides
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range 1024 {
		if _, err := conn.Write(chunk); err != nil {
			t.Fatal(err)
		}
	}
	conn.CloseWrite()
	ans, err := io.ReadAll(conn)
	runtime.ReadMemStats(&after)
	if err != nil || len(ans) != 40 {
		t.Fatalf("answer: %d bytes, %v", len(ans), err)
	}
	t.Logf("%d allocations", after.Mallocs-before.Mallocs)
	if n := after.Mallocs - before.Mallocs; n > 4096 {
		t.Errorf("%d allocations while relaying 64 MiB through the tunnel", n)
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
// (client, server and backend in this process): dial, TLS handshake, header
// and status, a one-byte request and its echo, close. "resumed" is what
// smeshd does (a session cache per peer); "full" turns resumption off.
//
//	go test -run '^$' -bench Connect -benchtime 3s ./pkg/tunnel
func BenchmarkConnect(b *testing.B) {
	for _, mode := range []string{"resumed", "full"} {
		b.Run(mode, func(b *testing.B) {
			h := newHarness(b, nil)
			c := NewClient(ClientOptions{
				PeerPort:          h.server.Addr().Port(),
				Credentials:       h.pki.creds(b, "a"),
				DisableResumption: mode == "full",
			})
			dst := h.backend.addr().String()
			var one [1]byte
			b.ResetTimer()
			for b.Loop() {
				nc, err := c.DialContext(context.Background(), "tcp", dst)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := nc.Write([]byte{'E', 1}); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(nc, one[:]); err != nil {
					b.Fatal(err)
				}
				nc.Close()
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "conn/s")
			if mode == "resumed" && h.stats.ServerHandshakes.Count(true, true) == 0 {
				b.Error("no session was resumed")
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
