package e2e

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/certs"
	"github.com/smesh-dev/smesh/pkg/sandbox"
	"github.com/smesh-dev/smesh/pkg/testenv"
	"github.com/smesh-dev/smesh/pkg/tunnel"
)

// meshPair links two nodes, each with its own smeshd in mode and enrolled
// workloads, and returns them with their addresses.
func meshPair(t *testing.T, mode, extraA, extraB string) (a, b *node, addrA, addrB netip.Addr) {
	a, b = newNode(t), newNode(t)
	addrA, addrB = testenv.Link(t, a.ns, b.ns)
	a.start(mode, extraA)
	b.start(mode, extraB)
	return a, b, addrA, addrB
}

// TestTunnel sends known bytes between enrolled workloads on two nodes, in
// both directions and both data path modes, in every way the issue lists.
// Each connection is captured on the client's node, crosses the mTLS tunnel
// and is delivered by the server node's smeshd (the server sees it come from
// its own node's address); in splice mode the hops at both ends are spliced.
func TestTunnel(t *testing.T) {
	for _, mode := range []string{"splice", "copy"} {
		t.Run(mode, func(t *testing.T) {
			a, b, addrA, addrB := meshPair(t, mode, "", "")
			for _, dir := range []struct {
				name           string
				client, server *node
				serverAddr     netip.Addr
			}{
				{"a to b", a, b, addrB},
				{"b to a", b, a, addrA},
			} {
				t.Run(dir.name, func(t *testing.T) {
					cl, sv := dir.client, dir.server
					addr := netip.AddrPortFrom(dir.serverAddr, 9000).String()
					sv.server(sv.enrolled, addr)

					saw, local, remote := peerOf(cl, cl.enrolled, addr)
					if remote.String() != addr || saw == local {
						t.Fatalf("client's peer %s, server saw %s, client %s: want captured (the server sees smeshd), the client seeing %s", remote, saw, local, addr)
					}
					if saw.Addr() != dir.serverAddr {
						t.Fatalf("server saw the connection from %s, want its own node's smeshd at %s", saw, dir.serverAddr)
					}

					concArgs, concBytes := concurrentArgs(addr, scaled(1000000))
					cases := []struct {
						name string
						args []string
						// in splice mode, the bytes each node's hop
						// must splice; bulk: the hop may be demoted
						// (see checkSpliced)
						spliced uint64
						bulk    bool
					}{
						{"128MiB one way", []string{"oneway", addr, scaledArg(128 << 20)}, uint64(scaled(128 << 20)), true},
						{"128MiB both ways at once", []string{"echo", addr, scaledArg(128 << 20)}, 2 * uint64(scaled(128<<20)), true},
						{"one byte", []string{"oneway", addr, "1"}, 1, false},
						{"nothing, then half-close", []string{"oneway", addr, "0"}, 0, false},
						{"2000 one-byte exchanges", []string{"rr", addr, scaledArg(2000)}, 2 * uint64(scaled(2000)), false},
						{"server closes first", []string{"serverfirst", addr, scaledArg(10000000)}, uint64(scaled(10000000)), true},
						// Each within splice_queue_limit: none may demote.
						{"200 concurrent connections", concArgs, concBytes, false},
						// The command and one more byte, in one send.
						{"reset by server", []string{"reset-server", addr}, 2, false},
						{"stalled reader, 64MiB writer", []string{"stall", addr, scaledArg(64 << 20)}, uint64(scaled(64 << 20)), true},
					}
					for _, c := range cases {
						t.Run(c.name, func(t *testing.T) {
							beforeC, beforeS := cl.stats(), sv.stats()
							cl.client(cl.enrolled, c.args...)
							afterC, afterS := cl.stats(), sv.stats()
							if mode == "splice" {
								checkSpliced(t, "client's node", beforeC, afterC, c.spliced, c.bulk)
								checkSpliced(t, "server's node", beforeS, afterS, c.spliced, c.bulk)
							}
							movedC, movedS := afterC.carried()-beforeC.carried(), afterS.carried()-beforeS.carried()
							if mode == "copy" && (movedC != 0 || movedS != 0) {
								t.Errorf("copy mode spliced %d and %d bytes", movedC, movedS)
							}
						})
					}
				})
			}

			t.Run("reset by client", func(t *testing.T) {
				addr := netip.AddrPortFrom(addrB, 9001).String()
				srv := b.server(b.enrolled, addr)
				a.client(a.enrolled, "reset-client", addr)
				line, err := srv.ReadLine(10 * time.Second)
				if err != nil {
					t.Fatalf("server reported nothing: %v", err)
				}
				if !strings.HasPrefix(line, "result sink error:") {
					t.Errorf("client reset; server saw %q, want an error", line)
				}
			})
		})
	}
}

// TestTunnelParked: a tunnelled connection idle between its exchanges parks
// on both nodes (its relays wait in smeshd's own epoll set, without a
// goroutine: smesh_relay_parked), and every exchange after a park still
// gets its byte back, in order, to a clean end of stream.
func TestTunnelParked(t *testing.T) {
	a, b, _, addrB := meshPair(t, "splice", "", "")
	addr := netip.AddrPortFrom(addrB, 9002).String()
	b.server(b.enrolled, addr)
	parked := func(n *node, side string) float64 {
		_, text := n.admin("/metrics")
		return testenv.Metric(t, text, "smesh_relay_parked", map[string]string{"side": side})
	}
	if pa, pb := parked(a, "outbound"), parked(b, "tunnel_in"); pa != 0 || pb != 0 {
		t.Fatalf("parked before any connection: %v on node a, %v on node b", pa, pb)
	}
	// 4 one-byte exchanges 1.5 s apart: parked between each (after 250 ms
	// idle); the client checks every byte and the end of stream.
	h := testenv.StartHelper(t, a.enrolled, a.ns.Name, "client", "paced", addr, "4", "1500")
	var sawA, sawB bool
	for !sawA || !sawB {
		select {
		case <-h.Exited():
			t.Fatalf("the connection was never seen parked (node a outbound: %v, node b tunnel_in: %v)", sawA, sawB)
		case <-time.After(50 * time.Millisecond):
		}
		// Both directions of the one connection, on each node.
		sawA = sawA || parked(a, "outbound") == 2
		sawB = sawB || parked(b, "tunnel_in") == 2
	}
	if err := h.Wait(); err != nil || !strings.Contains(h.Stdout(), "ok paced") {
		t.Fatalf("client: %v\n%s%s", err, h.Stdout(), h.Stderr())
	}
	deadline := time.Now().Add(5 * time.Second)
	for parked(a, "outbound") != 0 || parked(b, "tunnel_in") != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("still parked after the connection ended: %v, %v", parked(a, "outbound"), parked(b, "tunnel_in"))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestTunnelCurlNginx: curl on node a downloads a random file from nginx on
// node b, both in the mesh, through the tunnel, and gets exactly its bytes.
func TestTunnelCurlNginx(t *testing.T) {
	testenv.RequirePrivileged(t)
	nginx := testenv.RequireCommand(t, "nginx")
	a, b, _, addrB := meshPair(t, "splice", "", "")
	dir := t.TempDir()
	blob := make([]byte, 32<<20)
	rand.Read(blob)
	if err := os.WriteFile(filepath.Join(dir, "blob"), blob, 0o644); err != nil {
		t.Fatal(err)
	}
	listen := netip.AddrPortFrom(addrB, 8080)
	conf, err := sandbox.WriteNginxConfig(dir, listen.String())
	if err != nil {
		t.Fatal(err)
	}
	testenv.StartProcess(t, b.enrolled, b.ns.Name, nginx, "-p", dir, "-c", conf)
	curlFile(t, a, a.enrolled, "http://"+listen.String()+"/blob", blob)
	_, text := b.admin("/metrics")
	if v := testenv.Metric(t, text, "smesh_connections_total", map[string]string{"path": "tunnel_in"}); v < 1 {
		t.Errorf("node b counted %v incoming tunnel connections, want at least 1", v)
	}
}

// sniffer reads every frame on one interface of a node through an
// AF_PACKET socket and counts the frames that contain a marker.
type sniffer struct {
	fd      int
	marker  []byte
	frames  atomic.Int64
	bytes   atomic.Int64
	matches atomic.Int64
	done    chan struct{}
}

func sniff(t *testing.T, n *testenv.Node, ifname string, marker string) *sniffer {
	t.Helper()
	s := &sniffer{marker: []byte(marker), done: make(chan struct{})}
	proto := int(htons(unix.ETH_P_ALL))
	err := n.Do(func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		if s.fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto); err != nil {
			return err
		}
		return unix.Bind(s.fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index})
	})
	if err != nil {
		t.Fatalf("opening a packet socket on %s: %v", ifname, err)
	}
	unix.SetsockoptInt(s.fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 64<<20)
	unix.SetsockoptTimeval(s.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000})
	go func() {
		defer close(s.done)
		buf := make([]byte, 256<<10)
		for {
			n, _, err := unix.Recvfrom(s.fd, buf, 0)
			if err == unix.EAGAIN || err == unix.EINTR {
				continue
			}
			if err != nil {
				return
			}
			s.frames.Add(1)
			s.bytes.Add(int64(n))
			if bytes.Contains(buf[:n], s.marker) {
				s.matches.Add(1)
			}
		}
	}()
	t.Cleanup(s.stop)
	return s
}

func (s *sniffer) stop() {
	select {
	case <-s.done:
		return
	default:
	}
	unix.Shutdown(s.fd, unix.SHUT_RDWR)
	unix.Close(s.fd)
	<-s.done
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// TestTunnelNoClearText: a capture of the wire between two nodes never
// shows a marker that crosses the tunnel, in either mode; the same marker
// sent by a process outside the mesh does show (the capture works).
func TestTunnelNoClearText(t *testing.T) {
	for _, mode := range []string{"splice", "copy"} {
		t.Run(mode, func(t *testing.T) {
			a, b, _, addrB := meshPair(t, mode, "", "")
			addr := netip.AddrPortFrom(addrB, 9000).String()
			b.server(b.enrolled, addr)

			s := sniff(t, a.ns, "eth0", Marker)
			a.client(a.enrolled, "marker", addr, "8388608")
			time.Sleep(200 * time.Millisecond)
			s.stop()
			if s.bytes.Load() < 8<<20 {
				t.Fatalf("the capture saw %d bytes in %d frames, less than the transfer", s.bytes.Load(), s.frames.Load())
			}
			if m := s.matches.Load(); m != 0 {
				t.Errorf("%d of %d frames on the wire carry the marker in clear text", m, s.frames.Load())
			}

			control := sniff(t, a.ns, "eth0", Marker)
			a.client(testenv.NewCgroup(t), "marker", addr, "65536")
			time.Sleep(200 * time.Millisecond)
			control.stop()
			if control.matches.Load() == 0 {
				t.Errorf("the capture did not see the marker sent outside the mesh either (%d frames): it proves nothing", control.frames.Load())
			}
		})
	}
}

// badClient talks to a node's tunnel port directly, from another node.
type badClient struct {
	t    *testing.T
	from *node
	to   netip.AddrPort
}

// dial opens a TCP connection, and with cfg a TLS session on it.
func (c badClient) dial(cfg *tls.Config) (net.Conn, error) {
	var nc net.Conn
	err := c.from.ns.Do(func() (err error) {
		nc, err = net.DialTimeout("tcp4", c.to.String(), 5*time.Second)
		return err
	})
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	if cfg == nil {
		return nc, nil
	}
	tc := tls.Client(nc, cfg)
	return tc, tc.Handshake()
}

func clientTLS(t *testing.T, dir, name string) *tls.Config {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key"))
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}
}

func header(t *testing.T, dst netip.AddrPort) []byte {
	h, err := tunnel.AppendHeader(nil, dst)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// waitLog waits until smeshd's log has n lines with the refusal reason.
func waitLog(t *testing.T, n *node, reason string, want int) {
	t.Helper()
	needle := fmt.Sprintf(`"reason":%q`, reason)
	deadline := time.Now().Add(10 * time.Second)
	for strings.Count(n.smeshd.Stderr(), needle) < want {
		if time.Now().After(deadline) {
			t.Fatalf("smeshd logged %d refusals for %s, want %d", strings.Count(n.smeshd.Stderr(), needle), reason, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestTunnelBadInput: every kind of bad input to a real smeshd's tunnel
// port is refused, with a status where the protocol allows one and a log
// line naming the reason; then a flood of them while real traffic flows
// through the same smeshd without losing a byte.
func TestTunnelBadInput(t *testing.T) {
	a, b := newNode(t), newNode(t)
	addrA, addrB := testenv.Link(t, a.ns, b.ns)
	// A certificate of the same CA whose identity b does not allow, one
	// that expired, and one of another CA.
	if _, err := certs.Init(a.pki, []string{"intruder"}, "test.local"); err != nil {
		t.Fatal(err)
	}
	ca, err := certs.LoadCA(filepath.Join(a.pki, "ca.crt"), filepath.Join(a.pki, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	c, k, err := ca.Issue("expired", time.Now().Add(-48*time.Hour), time.Now().Add(-24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(a.pki, "expired.crt"), c, 0o644)
	os.WriteFile(filepath.Join(a.pki, "expired.key"), k, 0o600)
	otherCA := t.TempDir()
	if _, err := certs.Init(otherCA, []string{a.name}, "test.local"); err != nil {
		t.Fatal(err)
	}

	a.start("splice", "")
	b.start("splice", fmt.Sprintf("[tunnel]\nallow_ports = [9000]\nhandshake_timeout = \"5s\"\n%s",
		b.tlsConf(fmt.Sprintf("allow_identities = [%q, %q]", a.id(), b.id()))))
	server := netip.AddrPortFrom(addrB, 9000)
	b.server(b.enrolled, server.String())
	b.server("", "127.0.0.1:9000")

	bad := badClient{t: t, from: a, to: netip.AddrPortFrom(addrB, 18001)}
	good := clientTLS(t, a.pki, a.name)
	cases := []struct {
		name   string
		cfg    *tls.Config // nil: plain TCP
		send   []byte
		status bool // a status is answered
		reason string
	}{
		{"plaintext HTTP", nil, []byte("GET / HTTP/1.1\r\nHost: b\r\n\r\n"), false, "not_tls"},
		{"garbage", nil, bytes.Repeat([]byte{0xde, 0xad, 0xbe, 0xef}, 64), false, "not_tls"},
		{"connects and sends nothing", nil, nil, false, "handshake_timeout"},
		{"handshakes and sends nothing", good, nil, false, "header_timeout"},
		{"truncated header", good, header(t, server)[:7], false, "truncated_header"},
		{"oversized header", good, append(header(t, server), "early payload"...), true, "oversized_header"},
		{"unknown version", good, func() []byte { h := header(t, server); h[4] = 7; return h }(), true, "unsupported_version"},
		{"relay attempt to another node", good, header(t, netip.AddrPortFrom(addrA, 9000)), true, "not_local"},
		{"relay attempt to an outside address", good, header(t, netip.MustParseAddrPort("198.19.255.1:9000")), true, "not_local"},
		{"port not allowed", good, header(t, netip.AddrPortFrom(addrB, 9001)), true, "port_not_allowed"},
		{"smeshd's own port", good, header(t, netip.AddrPortFrom(addrB, 18001)), true, "own_port"},
		// A server that listens on loopback only (allowed port, even):
		// a captured connection never goes to another node's loopback.
		{"loopback", good, header(t, netip.MustParseAddrPort("127.0.0.1:9000")), true, "loopback"},
		{"loopback IPv6", good, header(t, netip.MustParseAddrPort("[::1]:9000")), true, "loopback"},
		{"loopback, smeshd's admin", good, header(t, netip.MustParseAddrPort("127.0.0.1:15000")), true, "loopback"},
		{"certificate of another CA", clientTLS(t, otherCA, a.name), nil, false, "unknown_ca"},
		{"expired certificate", clientTLS(t, a.pki, "expired"), nil, false, "cert_expired"},
		{"identity not allowed", clientTLS(t, a.pki, "intruder"), nil, false, "identity_not_allowed"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			bad.t = t
			before := strings.Count(b.smeshd.Stderr(), fmt.Sprintf(`"reason":%q`, c.reason))
			conn, err := bad.dial(c.cfg)
			if err == nil && c.send != nil {
				_, err = conn.Write(c.send)
				if tc, ok := conn.(*tls.Conn); ok && err == nil && c.reason == "truncated_header" {
					err = tc.CloseWrite()
				}
			}
			if c.status {
				if err != nil {
					t.Fatal(err)
				}
				var st [tunnel.StatusSize]byte
				if _, err := io.ReadFull(conn, st[:]); err != nil {
					t.Fatalf("reading the status: %v", err)
				}
				s, err := tunnel.ParseStatus(st[:])
				if err != nil || s.OK || s.Reason.String() != c.reason {
					t.Errorf("status %+v, %v; want refused %s", s, err, c.reason)
				}
			} else if err == nil {
				var buf [64]byte
				if n, err := conn.Read(buf[:]); n != 0 || err == nil {
					t.Errorf("smeshd answered %d bytes (%v) instead of closing", n, err)
				}
			}
			waitLog(t, b, c.reason, before+1)
		})
	}

	t.Run("a refusal reaches the app as a reset", func(t *testing.T) {
		// Port 9001 is not in node b's allow_ports: node a's smeshd
		// gets a refusal and resets the app's connection, which may
		// be before the app's connect(2) has returned ("reset", not
		// "reset-server", which takes a reset at connect for an error).
		before := strings.Count(b.smeshd.Stderr(), `"reason":"port_not_allowed"`)
		a.client(a.enrolled, "reset", netip.AddrPortFrom(addrB, 9001).String())
		waitLog(t, b, "port_not_allowed", before+1)
	})

	t.Run("a flood of bad input while real traffic flows", func(t *testing.T) {
		bad.t = t
		transfer := testenv.StartHelper(t, a.enrolled, a.ns.Name, "client", "concurrent", server.String(), scaledArg(4000000))
		var wg sync.WaitGroup
		for i := range 200 {
			wg.Go(func() {
				switch i % 4 {
				case 0: // plaintext
					if conn, err := bad.dial(nil); err == nil {
						conn.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
						io.Copy(io.Discard, conn)
					}
				case 1: // relay attempt
					if conn, err := bad.dial(good); err == nil {
						conn.Write(header(t, netip.AddrPortFrom(addrA, 9000)))
						io.Copy(io.Discard, conn)
					}
				case 2: // silent
					if conn, err := bad.dial(nil); err == nil {
						io.Copy(io.Discard, conn)
					}
				case 3: // foreign certificate
					bad.dial(clientTLS(t, otherCA, a.name))
				}
			})
		}
		wg.Wait()
		if err := transfer.Wait(); err != nil {
			t.Fatalf("traffic during the flood: %v\n%s", err, transfer.Stderr())
		}
		if !strings.Contains(transfer.Stdout(), "ok concurrent") {
			t.Fatalf("traffic during the flood did not complete: %q", transfer.Stdout())
		}
		a.client(a.enrolled, "oneway", server.String(), scaledArg(10000000))
		select {
		case <-b.smeshd.Exited():
			t.Fatal("smeshd on node b exited")
		default:
		}
		if !strings.Contains(b.smeshd.Stderr(), `"suppressed"`) {
			t.Error("the flood's log lines were not rate-limited")
		}
	})
}
