package tunnel

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"
)

// handshakes is how many TLS handshakes the harness's server completed.
func (h *harness) handshakes() uint64 {
	s := &h.stats.ServerHandshakes
	return s.Count(true, false) + s.Count(true, true)
}

// TestPoolReuse: in protocol v2 the connections after the first ride the
// first one's TLS connection: one handshake for all of them.
func TestPoolReuse(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(t, "a")
	for i := range 5 {
		conn := h.dial(t, c, 'E')
		if conn.v1 != nil {
			t.Fatal("a client and a server of this version speak protocol v1")
		}
		if conn.Reused != (i > 0) {
			t.Errorf("connection %d: reused %v", i, conn.Reused)
		}
		echo(t, conn, 100000*i+1)
	}
	if n := h.handshakes(); n != 1 {
		t.Errorf("server did %d handshakes for 5 connections, want 1", n)
	}
	if n := h.stats.In.Connections.Load(); n != 5 {
		t.Errorf("server counted %d tunnelled connections, want 5", n)
	}
	if n := c.stats.Out.Connections.Load(); n != 5 {
		t.Errorf("client counted %d tunnelled connections, want 5", n)
	}
	peer := netip.AddrPortFrom(nodeAddr, h.server.Addr().Port())
	if n := c.pool.idleCount(peer); n != 1 {
		t.Errorf("pool holds %d idle links, want 1", n)
	}
	// A connection that did not end cleanly in both directions takes its
	// link with it.
	conn := h.dial(t, c, 'H')
	conn.Abort()
	<-h.backend.results
	conn = h.dial(t, c, 'E')
	echo(t, conn, 10)
	if n := h.handshakes(); n != 2 {
		t.Errorf("server did %d handshakes, want 2: a reset connection's link is not reused", n)
	}
}

// TestProtocolV1Peers: a node of this version and one that speaks only v1
// talk v1, either way round: one TLS connection per tunnelled connection.
func TestProtocolV1Peers(t *testing.T) {
	old := newHarness(t, func(o *ServerOptions) { o.ProtocolV1 = true })
	c := old.client(t, "a")
	for range 3 {
		conn := old.dial(t, c, 'E')
		if conn.v1 == nil {
			t.Fatal("a server that speaks v1 only got v2")
		}
		echo(t, conn, 5000)
	}
	if n := old.handshakes(); n != 3 {
		t.Errorf("v1 server did %d handshakes for 3 connections, want 3", n)
	}
	// A refusal reads the same to a client of this version.
	_, err := c.DialContext(context.Background(), "tcp", onNode(old.server.Addr()).String())
	var re *RefusedError
	if !errors.As(err, &re) || re.Reason != ReasonOwnPort {
		t.Errorf("v1 refusal: %v, want own_port", err)
	}

	h := newHarness(t, nil)
	oldClient := h.newClient(t, ClientOptions{Credentials: h.pki.creds(t, "a"), ProtocolV1: true})
	for range 2 {
		conn := h.dial(t, oldClient, 'E')
		if conn.v1 == nil {
			t.Fatal("a client that speaks v1 only got v2")
		}
		echo(t, conn, 5000)
	}
}

// TestEarlyData: a v2 client sends before the status; the server checks
// the destination before it connects anything, so a refused destination
// gets none of the early bytes, and the refusal reaches the client as the
// error of its Read.
func TestEarlyData(t *testing.T) {
	h := newHarness(t, func(o *ServerOptions) { o.AllowPorts = []uint16{1} })
	c := h.client(t, "a")
	nc, err := c.Open(context.Background(), "tcp", h.dst())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := nc.Write([]byte("E early bytes")); err != nil {
		t.Fatalf("writing before the status: %v", err)
	}
	_, err = nc.Read(make([]byte, 10))
	var re *RefusedError
	if !errors.As(err, &re) || re.Reason != ReasonPortNotAllowed {
		t.Fatalf("read after early data to a port not allowed: %v, want port_not_allowed", err)
	}
	if _, err := nc.Write([]byte("more")); err == nil {
		t.Error("write after the refusal succeeded")
	}
	nc.Close()
	if n := h.backend.accepted.Load(); n != 0 {
		t.Errorf("the backend accepted %d connections for a refused destination", n)
	}
	if n := c.stats.Errors(ReasonPeerRefused); n != 1 {
		t.Errorf("client counted %d peer_refused", n)
	}
	if n := c.stats.Out.Connections.Load(); n != 0 {
		t.Errorf("client counted %d established connections", n)
	}

	// Early data to an allowed destination arrives, more than one read's
	// worth too (the writer waits for the status past earlyMax).
	h = newHarness(t, nil)
	c = h.client(t, "a")
	nc, err = c.Open(context.Background(), "tcp", h.dst())
	if err != nil {
		t.Fatal(err)
	}
	payload := make([]byte, 3*earlyMax+5)
	rand.Read(payload)
	if _, err := nc.Write(append([]byte{'S'}, payload...)); err != nil {
		t.Fatal(err)
	}
	nc.(*Conn).CloseWrite()
	checkSum(t, nc, payload)
}

// checkSum reads an 'S' connection's answer: count and sha256 of payload.
func checkSum(t testing.TB, r io.Reader, payload []byte) {
	t.Helper()
	ans, err := io.ReadAll(r)
	if err != nil || len(ans) != 8+32 {
		t.Fatalf("answer: %d bytes, %v", len(ans), err)
	}
	sum := sha256.Sum256(payload)
	if n := binary.BigEndian.Uint64(ans[:8]); n != uint64(len(payload)) || !bytes.Equal(ans[8:], sum[:]) {
		t.Errorf("server received %d bytes, want %d, sums equal %v", n, len(payload), bytes.Equal(ans[8:], sum[:]))
	}
}

// TestShortConnectionsBesideBulk: 2,000 short connections, bytes checked,
// while one bulk transfer runs to the same node: neither starves the other,
// and the short ones ride pooled TLS connections.
func TestShortConnectionsBesideBulk(t *testing.T) {
	h := newHarness(t, nil)
	c := h.client(t, "a")
	bulkDone := make(chan error, 1)
	shortDone := make(chan struct{})
	var bulkBytes int64
	go func() {
		conn, err := c.DialContext(context.Background(), "tcp", h.dst())
		if err != nil {
			bulkDone <- err
			return
		}
		defer conn.Close()
		hash := sha256.New()
		chunk := make([]byte, 256<<10)
		conn.Write([]byte{'S'})
		// Until the short connections are all done, and at least 64 MiB.
		for i := 0; ; i++ {
			select {
			case <-shortDone:
				if bulkBytes >= 64<<20 {
					conn.(*Conn).CloseWrite()
					ans, err := io.ReadAll(conn)
					if err == nil && (len(ans) != 40 || binary.BigEndian.Uint64(ans[:8]) != uint64(bulkBytes) || !bytes.Equal(ans[8:], hash.Sum(nil))) {
						err = fmt.Errorf("bulk: server received other bytes than the %d sent", bulkBytes)
					}
					bulkDone <- err
					return
				}
			default:
			}
			binary.LittleEndian.PutUint64(chunk, uint64(i))
			if _, err := conn.Write(chunk); err != nil {
				bulkDone <- err
				return
			}
			hash.Write(chunk)
			bulkBytes += int64(len(chunk))
		}
	}()

	const total, workers = 2000, 8
	errs := make(chan error, total)
	var wg sync.WaitGroup
	next := make(chan int)
	for range workers {
		wg.Go(func() {
			for i := range next {
				errs <- shortConn(c, h.dst(), i)
			}
		})
	}
	for i := range total {
		next <- i
	}
	close(next)
	wg.Wait()
	close(shortDone)
	close(errs)
	failed := 0
	for err := range errs {
		if err != nil {
			if failed++; failed <= 5 {
				t.Error(err)
			}
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d short connections failed", failed, total)
	}
	if err := <-bulkDone; err != nil {
		t.Fatalf("bulk transfer beside the short connections: %v", err)
	}
	if n := h.stats.In.Connections.Load(); n != total+1 {
		t.Errorf("server counted %d tunnelled connections, want %d", n, total+1)
	}
	if n := h.handshakes(); n > 2*workers+2 {
		t.Errorf("%d handshakes for %d short connections from %d workers: the pool did not keep them", n, total, workers)
	}
}

// shortConn echoes a few bytes that depend on i, as the outbound proxy
// would open it (no wait for the status).
func shortConn(c *Client, dst string, i int) error {
	data := bytes.Repeat([]byte{byte(i)}, 1+i%1500)
	var nc net.Conn
	var err error
	if i%2 == 0 {
		// As the outbound proxy opens them: what the app sent at once
		// goes with the header.
		nc, err = c.OpenEarly(context.Background(), "tcp", dst, append([]byte{'E'}, data...))
	} else {
		nc, err = c.Open(context.Background(), "tcp", dst)
		if err == nil {
			nc.Write([]byte{'E'})
			nc.Write(data)
		}
	}
	if err != nil {
		return fmt.Errorf("connection %d: %w", i, err)
	}
	defer nc.Close()
	nc.(*Conn).CloseWrite()
	got, err := io.ReadAll(nc)
	if err != nil {
		return fmt.Errorf("connection %d: %w", i, err)
	}
	if !bytes.Equal(got, data) {
		return fmt.Errorf("connection %d: echo of %d bytes returned %d other bytes", i, len(data), len(got))
	}
	return nil
}

// restart stops the harness's server (graceful: Shutdown; else Close, as
// when smeshd dies) and starts a new one on the same port with the same
// options.
func (h *harness) restart(t *testing.T, graceful bool) {
	t.Helper()
	o := h.server.o
	o.Listen = h.server.Addr()
	o.OwnPorts = nil
	if graceful {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		h.server.Shutdown(ctx)
	} else {
		h.server.Close()
	}
	s, err := Listen(o)
	if err != nil {
		t.Fatal(err)
	}
	h.server = s
	go s.Serve(context.Background())
	t.Cleanup(func() { s.Close() })
}

// TestPeerRestart: the peer's smeshd restarts while a connection is being
// relayed and others idle in the pool: the relayed one sees an error (a
// reset, not an end of stream), and the connections opened afterwards all
// succeed on new TLS connections, none on a dead pooled one.
func TestPeerRestart(t *testing.T) {
	for _, graceful := range []bool{false, true} {
		t.Run(fmt.Sprintf("graceful=%v", graceful), func(t *testing.T) {
			h := newHarness(t, nil)
			c := h.client(t, "a")
			// Four idle pooled links.
			var conns []*Conn
			for range 4 {
				conns = append(conns, h.dial(t, c, 'E'))
			}
			for _, conn := range conns {
				echo(t, conn, 1000)
			}
			peer := netip.AddrPortFrom(nodeAddr, h.server.Addr().Port())
			if n := c.pool.idleCount(peer); n != 4 {
				t.Fatalf("pool holds %d idle links, want 4", n)
			}
			mid := h.dial(t, c, 'E')
			mid.Write([]byte("before"))
			buf := make([]byte, 6)
			if _, err := io.ReadFull(mid, buf); err != nil {
				t.Fatal(err)
			}
			var midErr error
			done := make(chan struct{})
			go func() {
				defer close(done)
				_, midErr = io.ReadAll(mid)
			}()
			if graceful {
				// Shutdown waits for the relayed connection until its
				// context ends; end it meanwhile, with an error.
				go func() {
					time.Sleep(300 * time.Millisecond)
					mid.Abort()
				}()
			}
			h.restart(t, graceful)
			<-done
			if midErr == nil {
				t.Error("connection relayed across the restart read a clean end of stream, want an error")
			}
			before := c.stats.ErrorCounts()
			for i := range 20 {
				if err := shortConn(c, h.dst(), i); err != nil {
					t.Fatalf("after the restart: %v", err)
				}
			}
			if after := c.stats.ErrorCounts(); fmt.Sprint(after) != fmt.Sprint(before) {
				t.Errorf("client counted failures after the restart: %v, before %v", after, before)
			}
		})
	}
}

// TestPooledLinkPolicy: a pooled TLS connection carries no more tunnelled
// connections once its peer's certificate was rotated or dropped from the
// allow list, on either side, or this node's own certificate changed.
func TestPooledLinkPolicy(t *testing.T) {
	warm := func(t *testing.T) (*harness, *Client, *Credentials) {
		h := newHarness(t, nil)
		creds := h.pki.creds(t, "a")
		c := h.newClient(t, ClientOptions{Credentials: creds})
		echo(t, h.dial(t, c, 'E'), 100)
		if n := h.handshakes(); n != 1 {
			t.Fatalf("%d handshakes", n)
		}
		return h, c, creds
	}
	// rotate writes a new certificate and key for name, of the same CA,
	// over certFile and keyFile, and waits until a reload may see them.
	rotate := func(t *testing.T, h *harness, name, certFile, keyFile string) {
		c, k, err := h.pki.ca.Issue(name, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range []struct {
			path string
			data []byte
		}{{certFile, c}, {keyFile, k}} {
			os.WriteFile(f.path+".tmp", f.data, 0o600)
			if err := os.Rename(f.path+".tmp", f.path); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(reloadInterval + 100*time.Millisecond)
	}

	t.Run("server certificate rotated", func(t *testing.T) {
		h, c, _ := warm(t)
		rotate(t, h, "b", h.pki.path("b.crt"), h.pki.path("b.key"))
		// Its first bytes go with the header on the pooled link, which
		// the server retires: they are sent again on a new one.
		payload := make([]byte, earlyMax-1)
		rand.Read(payload)
		nc, err := c.OpenEarly(context.Background(), "tcp", h.dst(), append([]byte{'E'}, payload...))
		if err != nil {
			t.Fatal(err)
		}
		conn := nc.(*Conn)
		conn.CloseWrite()
		got, err := io.ReadAll(conn)
		if err != nil || !bytes.Equal(got, payload) {
			t.Fatalf("echo of the first bytes after a retry: %d bytes, %v", len(got), err)
		}
		if conn.Reused {
			t.Error("the connection after the server's rotation rides a link made before it")
		}
		conn.Close()
		if n := h.handshakes(); n != 2 {
			t.Errorf("%d handshakes, want 2", n)
		}
		if n := h.stats.Errors(ReasonRetired); n != 1 {
			t.Errorf("server retired %d links, want 1", n)
		}
	})
	t.Run("client dropped from the server's allow list", func(t *testing.T) {
		h, c, _ := warm(t)
		h.server.o.Credentials.SetPolicy(policy(t, "spiffe://test.local/node/b"))
		accepted := h.backend.accepted.Load()
		_, err := c.DialContext(context.Background(), "tcp", h.dst())
		if err == nil {
			t.Fatal("a client dropped from allow_identities still got a connection delivered")
		}
		if n := h.backend.accepted.Load(); n != accepted {
			t.Errorf("the backend accepted %d more connections", n-accepted)
		}
		if n := h.stats.Errors(ReasonRetired); n != 1 {
			t.Errorf("server retired %d links, want 1", n)
		}
		h.waitCount(t, ReasonIdentityNotAllowed, 1)
	})
	t.Run("server dropped from the client's allow list", func(t *testing.T) {
		h, c, creds := warm(t)
		creds.SetPolicy(policy(t, "spiffe://test.local/node/z"))
		accepted := h.backend.accepted.Load()
		if _, err := c.DialContext(context.Background(), "tcp", h.dst()); err == nil {
			t.Fatal("a pooled link to a server dropped from allow_identities was reused")
		}
		if n := h.backend.accepted.Load(); n != accepted {
			t.Errorf("the backend accepted %d more connections", n-accepted)
		}
	})
	t.Run("client certificate rotated", func(t *testing.T) {
		h, c, creds := warm(t)
		rotate(t, h, "a", creds.certFile, creds.keyFile)
		conn := h.dial(t, c, 'E')
		if conn.Reused {
			t.Error("a link made with this node's previous certificate was reused")
		}
		echo(t, conn, 1000)
		if n := h.handshakes(); n != 2 {
			t.Errorf("%d handshakes, want 2", n)
		}
	})
}

// TestShutdownDrainsQueue: connections peers made before Shutdown, still in
// the listener's queue, are accepted and served, not reset.
func TestShutdownDrainsQueue(t *testing.T) {
	release := make(chan struct{})
	var once sync.Once
	h := newHarness(t, nil)
	h.server.Close()
	// A server whose accept loop waits until released: what peers dial
	// meanwhile queues in the listener.
	o := h.server.o
	o.Listen, o.OwnPorts = netip.MustParseAddrPort("127.0.0.1:0"), nil
	s, err := Listen(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	// Released before Close waits for the accept loop, should the test
	// end early (cleanups run last first).
	t.Cleanup(func() { once.Do(func() { close(release) }) })
	s.testHookAccept = func() { <-release }
	h.server = s
	go s.Serve(context.Background())
	c := h.newClient(t, ClientOptions{Credentials: h.pki.creds(t, "a"), ProtocolV1: true})
	const n = 5
	errs := make(chan error, n)
	for i := range n {
		go func() {
			nc, err := c.DialContext(context.Background(), "tcp", h.dst())
			if err == nil {
				err = shortEcho(nc, i)
			}
			errs <- err
		}()
	}
	// The connections are in the queue once their TCP handshakes are
	// done: wait until the kernel lists them.
	waitQueued(t, s, n)
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		shut <- s.Shutdown(ctx)
	}()
	time.Sleep(10 * time.Millisecond)
	once.Do(func() { close(release) })
	for range n {
		if err := <-errs; err != nil {
			t.Errorf("connection queued before Shutdown: %v", err)
		}
	}
	if err := <-shut; err != nil {
		t.Error(err)
	}
}

func shortEcho(nc net.Conn, i int) error {
	defer nc.Close()
	data := []byte(fmt.Sprintf("E queued %d", i))
	nc.Write(data)
	nc.(*Conn).CloseWrite()
	got, err := io.ReadAll(nc)
	if err == nil && !bytes.Equal(got, data[1:]) {
		err = fmt.Errorf("echo %q, want %q", got, data[1:])
	}
	return err
}

// waitQueued waits until n connections wait in s's listen queue.
func waitQueued(t *testing.T, s *Server, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if q, err := listenQueue(s.Addr().Port()); err == nil && q >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d connections never queued", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// listenQueue reads the accept queue length of the IPv4 listener on port
// from /proc/net/tcp (rx_queue of a LISTEN socket).
func listenQueue(port uint16) (int, error) {
	data, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return 0, err
	}
	for _, line := range bytes.Split(data, []byte("\n"))[1:] {
		f := bytes.Fields(line)
		if len(f) < 5 || string(f[3]) != "0A" {
			continue
		}
		var p, tx, rx uint64
		if _, err := fmt.Sscanf(string(f[1][bytes.IndexByte(f[1], ':')+1:]), "%X", &p); err != nil || p != uint64(port) {
			continue
		}
		fmt.Sscanf(string(f[4]), "%X:%X", &tx, &rx)
		return int(rx), nil
	}
	return 0, errors.New("no such listener")
}

// TestCloseWhileAccepting: Close may come while connections are being
// accepted: Serve and Close return, and no accepted connection is left
// open. (That the WaitGroup's Add never races its Wait, the race detector
// checks: run with -race.)
func TestCloseWhileAccepting(t *testing.T) {
	h := newHarness(t, nil)
	for range 20 {
		o := h.server.o
		o.Listen, o.OwnPorts = netip.MustParseAddrPort("127.0.0.1:0"), nil
		s, err := Listen(o)
		if err != nil {
			t.Fatal(err)
		}
		served := make(chan error, 1)
		go func() { served <- s.Serve(context.Background()) }()
		var wg sync.WaitGroup
		for range 10 {
			wg.Go(func() {
				if c, err := net.Dial("tcp4", s.Addr().String()); err == nil {
					c.Close()
				}
			})
		}
		time.Sleep(time.Millisecond)
		closed := make(chan error, 1)
		go func() { closed <- s.Close() }()
		for what, ch := range map[string]chan error{"Close": closed, "Serve": served} {
			select {
			case err := <-ch:
				if what == "Close" && err != nil {
					t.Errorf("Close: %v", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatalf("%s did not return after Close", what)
			}
		}
		wg.Wait()
		s.mu.Lock()
		open := len(s.conns)
		s.mu.Unlock()
		if open != 0 {
			t.Fatalf("%d accepted connections still open after Close", open)
		}
		if err := s.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	}
}

// TestBadFrames: a v2 peer that breaks the framing is reset and counted;
// a v1 header on a v2 connection is refused as an unsupported version.
func TestBadFrames(t *testing.T) {
	h := newHarness(t, nil)
	cfg := h.pki.tlsConfig(t, "a")
	cfg.NextProtos = []string{ALPN2}
	v2hdr, _ := appendHeader(nil, onNode(h.backend.addr()), Version2)
	for _, c := range []struct {
		name  string
		frame []byte
	}{
		{"unknown type", []byte{'X', 0, 0, 1, 'E'}},
		{"empty data", []byte{'D', 0, 0, 0}},
		{"oversized data", []byte{'D', 1, 0, 1}},
		{"end with a length", []byte{'F', 0, 0, 1, 'E'}},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := h.stats.Errors(ReasonBadFrame)
			conn, err := h.rawDial(t, cfg)
			if err != nil {
				t.Fatal(err)
			}
			if conn.(*tls.Conn).ConnectionState().NegotiatedProtocol != ALPN2 {
				t.Fatal("no protocol v2")
			}
			conn.Write(append(append([]byte(nil), v2hdr...), c.frame...))
			st, err := readStatusV(t, conn, Version2)
			if err != nil || !st.OK {
				t.Fatalf("status %+v, %v", st, err)
			}
			if _, err := io.ReadAll(conn); err == nil {
				t.Error("the server ended the connection cleanly, want a reset")
			}
			h.waitCount(t, ReasonBadFrame, before+1)
		})
	}
	t.Run("v1 header", func(t *testing.T) {
		conn, err := h.rawDial(t, cfg)
		if err != nil {
			t.Fatal(err)
		}
		v1hdr, _ := AppendHeader(nil, onNode(h.backend.addr()))
		conn.Write(v1hdr)
		st, err := readStatusV(t, conn, Version2)
		if err != nil || st.OK || st.Reason != ReasonUnsupportedVersion {
			t.Errorf("status %+v, %v; want refused unsupported_version", st, err)
		}
	})
}

func readStatusV(t *testing.T, c net.Conn, version byte) (Status, error) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var st [StatusSize]byte
	if _, err := io.ReadFull(c, st[:]); err != nil {
		return Status{}, err
	}
	return parseStatus(st[:], version)
}

func TestFrameHeader(t *testing.T) {
	var h [frameHeaderSize]byte
	for _, n := range []int{1, 255, 256, 65535, 65536} {
		putFrameHeader(h[:], frameData, n)
		typ, got, err := parseFrameHeader(h[:])
		if err != nil || typ != frameData || got != n {
			t.Errorf("data frame of %d: %c %d %v", n, typ, got, err)
		}
	}
	putFrameHeader(h[:], frameFin, 0)
	if !bytes.Equal(h[:], []byte{'F', 0, 0, 0}) {
		t.Errorf("end frame % x", h)
	}
	putFrameHeader(h[:], frameData, 0x10203)
	if !bytes.Equal(h[:], []byte{'D', 1, 2, 3}) {
		t.Errorf("data frame header % x", h)
	}
}

// TestBurstWithinPeerBudget: a burst of new tunnelled connections to one
// peer, many more than its max_handshakes_per_source, all get through:
// the client keeps the handshakes under way to one peer below a bound of
// its own (maxDialsPerPeer), and the others wait for a place instead of
// being reset by the peer as a flood.
func TestBurstWithinPeerBudget(t *testing.T) {
	h := newHarness(t, func(o *ServerOptions) {
		o.MaxHandshakes = 8
		o.MaxHandshakesPerSource = 4
	})
	c := h.client(t, "a")
	c.dials = newDialSlots(3)
	const n = 60
	conns := make(chan *Conn, n)
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Held open, so that each needs a TLS connection of its own.
			nc, err := c.DialContext(context.Background(), "tcp", h.dst())
			if err == nil {
				_, err = nc.Write([]byte{'H'})
				conns <- nc.(*Conn)
			}
			if err != nil {
				errs <- fmt.Errorf("connection %d: %w", i, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	close(conns)
	for err := range errs {
		t.Error(err)
	}
	if got := h.stats.Errors(ReasonTooManyHandshakes); got != 0 {
		t.Errorf("the server reset %d connections of the burst as too many handshakes", got)
	}
	if got := h.handshakes(); got != n {
		t.Errorf("the server completed %d handshakes, want %d (one per held connection)", got, n)
	}
	if got := c.dials.underWay(nodeAddr); got != 0 {
		t.Errorf("%d handshakes still counted under way after the burst", got)
	}
	for conn := range conns {
		conn.Abort()
	}
}
