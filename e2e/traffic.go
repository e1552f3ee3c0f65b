package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The test server speaks a tiny protocol so that one server process can play
// every part the tests need. A connection starts with a one-byte command:
const (
	cmdEcho     = 'E' // echo everything back until EOF, then close
	cmdSink     = 'S' // read until EOF, answer count (8 bytes) + sha256, close
	cmdStall    = 'W' // like cmdSink, but stall 3 s before reading anything
	cmdGenerate = 'G' // + count + seed (8 bytes each): send that stream, then close first
	cmdReset    = 'R' // read 1 byte, then reset the connection
	cmdPeer     = 'P' // answer "remote-addr\n" as the server sees it, then echo
	cmdWho      = 'I' // answer "local-addr\n", the server's own (which backend), then echo
	cmdHold     = 'H' // like cmdSink, but keep the socket open afterwards and report bytes that still arrive
)

// stream is the deterministic data both ends can produce from a seed.
func stream(seed uint64) io.Reader {
	var s [32]byte
	binary.LittleEndian.PutUint64(s[:], seed)
	return rand.NewChaCha8(s)
}

// digestOf returns the sha256 of the first n bytes of stream(seed).
func digestOf(n int64, seed uint64) []byte {
	h := sha256.New()
	io.CopyN(h, stream(seed), n)
	return h.Sum(nil)
}

// plainWriter and plainReader hide ReaderFrom/WriterTo so that no copy in
// the tests turns into splice(2) or sendfile(2): the data path under test
// must see ordinary sends and receives.
type plainWriter struct{ io.Writer }
type plainReader struct{ io.Reader }

func copyPlain(dst io.Writer, src io.Reader) (int64, error) {
	return io.CopyBuffer(plainWriter{dst}, plainReader{src}, make([]byte, 64<<10))
}

// serve is the "server" helper: args[0] is the listen address; args[1],
// if "deferred", sets TCP_DEFER_ACCEPT on the listener (nginx's `listen
// ... deferred`): the kernel then makes a connection's socket only when its
// first bytes arrive. It prints "ready ADDR" once listening and "result KIND
// OUTCOME" for every connection whose outcome the tests read (sink and echo
// ends).
func serve(args []string) int {
	var lc net.ListenConfig
	if len(args) > 1 && args[1] == "deferred" {
		lc.Control = func(_, _ string, rc syscall.RawConn) error {
			var serr error
			err := rc.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 5)
			})
			return errors.Join(err, serr)
		}
	}
	ln, err := lc.Listen(context.Background(), network(args[0]), args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		return 1
	}
	var mu sync.Mutex
	say := func(format string, a ...any) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Printf(format+"\n", a...)
	}
	say("ready %s", ln.Addr())
	for {
		c, err := ln.Accept()
		if err != nil {
			return 1
		}
		go serveConn(c.(*net.TCPConn), say)
	}
}

func serveConn(c *net.TCPConn, say func(string, ...any)) {
	defer c.Close()
	var cmd [1]byte
	if _, err := io.ReadFull(c, cmd[:]); err != nil {
		return
	}
	switch cmd[0] {
	case cmdEcho:
		_, err := copyPlain(c, c)
		if err == nil {
			err = c.CloseWrite()
		}
		say("result echo %s", outcome(err))
	case cmdSink, cmdStall:
		if cmd[0] == cmdStall {
			time.Sleep(3 * time.Second)
		}
		h := sha256.New()
		n, err := copyPlain(h, c)
		say("result sink %s", outcome(err))
		if err != nil {
			return
		}
		var out [8]byte
		binary.BigEndian.PutUint64(out[:], uint64(n))
		c.Write(append(out[:], h.Sum(nil)...))
	case cmdGenerate:
		var p [16]byte
		if _, err := io.ReadFull(c, p[:]); err != nil {
			return
		}
		n, seed := int64(binary.BigEndian.Uint64(p[:8])), binary.BigEndian.Uint64(p[8:])
		io.CopyN(plainWriter{c}, stream(seed), n)
	case cmdHold:
		h := sha256.New()
		n, err := copyPlain(h, c)
		if err != nil {
			say("result hold %s", outcome(err))
			return
		}
		var out [8]byte
		binary.BigEndian.PutUint64(out[:], uint64(n))
		c.Write(append(out[:], h.Sum(nil)...))
		say("result hold eof %s %d", c.RemoteAddr(), n)
		// The client is gone, this end stays: no byte may reach it any
		// more. Polled, since a read at end of stream does not block.
		buf := make([]byte, 64<<10)
		for {
			m, err := c.Read(buf)
			if m > 0 {
				say("late %s %d", c.RemoteAddr(), m)
			}
			if err != nil && err != io.EOF {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	case cmdSlow:
		serveSlow(c, say)
	case cmdReset:
		c.SetLinger(0)
	case cmdPeer, cmdWho:
		if cmd[0] == cmdPeer {
			fmt.Fprintf(c, "%s\n", c.RemoteAddr())
		} else {
			fmt.Fprintf(c, "%s\n", c.LocalAddr())
		}
		_, err := copyPlain(c, c)
		if err == nil {
			c.CloseWrite()
		}
	}
}

func outcome(err error) string {
	if err == nil {
		return "eof"
	}
	return "error:" + err.Error()
}

// Client side: each function dials, runs one exchange and returns an error
// unless every byte came back as expected.

// network is the Go network for an address: "tcp6" for IPv6 ones, "tcp4"
// for IPv4 ones.
func network(addr string) string {
	if ap, err := netip.ParseAddrPort(addr); err == nil && ap.Addr().Is6() {
		return "tcp6"
	}
	return "tcp4"
}

func dial(addr string) (*net.TCPConn, error) {
	if ap, err := netip.ParseAddrPort(addr); err == nil && ap.Addr().Is4In6() {
		return dialMapped(ap)
	}
	c, err := net.DialTimeout(network(addr), addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// dialMapped connects a dual-stack AF_INET6 socket to a v4-mapped address
// (::ffff:a.b.c.d), as the JVM and many dual-stack programs do; Go's dialer
// would use an AF_INET socket for it instead.
func dialMapped(dst netip.AddrPort) (*net.TCPConn, error) {
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "v4-mapped")
	defer f.Close()
	sa := &unix.SockaddrInet6{Port: int(dst.Port()), Addr: dst.Addr().As16()}
	if err := unix.Connect(fd, sa); err != nil {
		return nil, &net.OpError{Op: "dial", Net: "tcp6", Addr: net.TCPAddrFromAddrPort(dst), Err: os.NewSyscallError("connect", err)}
	}
	c, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// command dials addr and sends req, the command and its parameters.
func command(addr string, req []byte) (*net.TCPConn, error) {
	c, err := dial(addr)
	if err != nil {
		return nil, err
	}
	if _, err := c.Write(req); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// oneWay sends n bytes of stream(seed), half-closes, and checks the
// server's count and digest.
func oneWay(addr string, n int64, seed uint64, cmd byte) error {
	return sendChecked(addr, n, cmd, func() io.Reader { return stream(seed) })
}

// sendChecked sends n bytes from data() (a fresh reader per call, the same
// bytes each time) after the command byte, half-closes, and checks the
// server's count and digest.
func sendChecked(addr string, n int64, cmd byte, data func() io.Reader) error {
	c, err := command(addr, []byte{cmd})
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := io.CopyN(plainWriter{c}, data(), n); err != nil {
		return fmt.Errorf("sending: %w", err)
	}
	h := sha256.New()
	io.CopyN(h, data(), n)
	return checkSink(c, n, h.Sum(nil))
}

// checkSink half-closes c, on which n bytes with the sha256 digest went to
// a cmdSink server, and checks the server's count and digest.
func checkSink(c *net.TCPConn, n int64, digest []byte) error {
	if err := c.CloseWrite(); err != nil {
		return err
	}
	c.SetReadDeadline(time.Now().Add(60 * time.Second))
	var ans [8 + sha256.Size]byte
	if _, err := io.ReadFull(c, ans[:]); err != nil {
		return fmt.Errorf("reading the server's digest: %w", err)
	}
	if got := int64(binary.BigEndian.Uint64(ans[:8])); got != n {
		return fmt.Errorf("server received %d bytes, sent %d", got, n)
	}
	if !bytes.Equal(ans[8:], digest) {
		return errors.New("server received different bytes than sent")
	}
	return expectEOF(c)
}

// bulkLimit bounds a "bulk" transfer nobody stops.
const bulkLimit = 5 * time.Minute

// bulk sends stream(seed) to a cmdSink server until a line (or the end) on
// stdin says stop, then checks the server's count and digest. It prints
// "started" once its first MiB is sent and "sent N" at the end, so a test
// can run other traffic beside it for exactly as long as it wants,
// whatever the speed of either.
func bulk(addr string, seed uint64) error {
	stop := make(chan struct{})
	go func() {
		bufio.NewReader(os.Stdin).ReadString('\n')
		close(stop)
	}()
	c, err := command(addr, []byte{cmdSink})
	if err != nil {
		return err
	}
	defer c.Close()
	h := sha256.New()
	src := io.TeeReader(stream(seed), h)
	buf := make([]byte, 64<<10)
	limit := time.After(bulkLimit)
	var n int64
	for sending := true; sending; {
		select {
		case <-stop:
			sending = false
			continue
		case <-limit:
			return fmt.Errorf("not stopped within %s", bulkLimit)
		default:
		}
		io.ReadFull(src, buf)
		if _, err := c.Write(buf); err != nil {
			return fmt.Errorf("sending at offset %d: %w", n, err)
		}
		if n += int64(len(buf)); n == 1<<20 {
			fmt.Println("started")
		}
	}
	fmt.Printf("sent %d\n", n)
	return checkSink(c, n, h.Sum(nil))
}

func expectEOF(c *net.TCPConn) error {
	var b [1]byte
	if n, err := c.Read(b[:]); n != 0 || err != io.EOF {
		return fmt.Errorf("want EOF after the answer, got %d bytes, %v", n, err)
	}
	return nil
}

// echo sends n bytes while reading them back at the same time.
func echo(addr string, n int64, seed uint64) error {
	c, err := command(addr, []byte{cmdEcho})
	if err != nil {
		return err
	}
	defer c.Close()
	errc := make(chan error, 1)
	go func() {
		_, err := io.CopyN(plainWriter{c}, stream(seed), n)
		if err == nil {
			err = c.CloseWrite()
		}
		errc <- err
	}()
	h := sha256.New()
	got, err := copyPlain(h, c)
	if werr := <-errc; werr != nil {
		return fmt.Errorf("sending: %w", werr)
	}
	if err != nil {
		return fmt.Errorf("receiving: %w", err)
	}
	return compare(got, n, h, seed)
}

func compare(got, n int64, h hash.Hash, seed uint64) error {
	if got != n {
		return fmt.Errorf("received %d bytes, want %d", got, n)
	}
	if !bytes.Equal(h.Sum(nil), digestOf(n, seed)) {
		return errors.New("received different bytes than sent")
	}
	return nil
}

// requestResponse does count one-byte exchanges, each under a read deadline,
// so a reader woken late by the netpoller fails instead of hanging.
func requestResponse(addr string, count int) error {
	return paced(addr, count, 0)
}

// paced is requestResponse with a pause between exchanges, so a connection
// can stay open across events such as smeshd starting or stopping. It prints
// "connected" once the connection is up, then "local ADDR", its own address.
func paced(addr string, count int, pause time.Duration) error {
	c, err := command(addr, []byte{cmdEcho})
	if err != nil {
		return err
	}
	defer c.Close()
	fmt.Println("connected")
	fmt.Println("local", c.LocalAddr())
	var b [1]byte
	for i := range count {
		time.Sleep(pause)
		want := byte(i)
		if _, err := c.Write([]byte{want}); err != nil {
			return fmt.Errorf("exchange %d: %w", i, err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, b[:]); err != nil {
			return fmt.Errorf("exchange %d: %w", i, err)
		}
		if b[0] != want {
			return fmt.Errorf("exchange %d: got %d, want %d", i, b[0], want)
		}
	}
	c.CloseWrite()
	return expectEOF(c)
}

// serverFirst asks the server for n bytes and checks them; the server closes.
func serverFirst(addr string, n int64, seed uint64) error {
	c, err := dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	var req [17]byte
	req[0] = cmdGenerate
	binary.BigEndian.PutUint64(req[1:], uint64(n))
	binary.BigEndian.PutUint64(req[9:], seed)
	if _, err := c.Write(req[:]); err != nil {
		return err
	}
	h := sha256.New()
	got, err := copyPlain(h, c)
	if err != nil {
		return err
	}
	return compare(got, n, h, seed)
}

// resetByServer expects the server's reset to arrive as an error, not EOF.
func resetByServer(addr string) error {
	c, err := command(addr, []byte{cmdReset, 0})
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var b [1]byte
	_, err = c.Read(b[:])
	var ne net.Error
	switch {
	case err == nil || err == io.EOF:
		return fmt.Errorf("server reset the connection, client saw %v", err)
	case errors.As(err, &ne) && ne.Timeout():
		return errors.New("server reset the connection, client hung")
	}
	return nil
}

// endsWith dials addr, sends what, then sends nothing more and waits up to
// wait for the connection to end: it returns nil when it ends by a reset
// (and, with eofToo, by an end of stream), an error when bytes arrive or it
// stays open.
func endsWith(addr string, what []byte, wait time.Duration, eofToo bool) error {
	c, err := dial(addr)
	if err != nil {
		if eofToo && errors.Is(err, syscall.ECONNRESET) {
			return nil // reset before connect(2) returned
		}
		return err
	}
	defer c.Close()
	if _, err := c.Write(what); err != nil {
		return nil // reset already
	}
	c.SetReadDeadline(time.Now().Add(wait))
	var b [64]byte
	n, err := c.Read(b[:])
	var ne net.Error
	switch {
	case n > 0:
		return fmt.Errorf("%d bytes arrived, want the connection ended", n)
	case errors.As(err, &ne) && ne.Timeout():
		return fmt.Errorf("still open after %s", wait)
	case err == io.EOF && !eofToo:
		return errors.New("ended by an end of stream, want a reset")
	}
	return nil
}

// resetByClient sends some bytes, then resets. The server reports what it saw.
func resetByClient(addr string) error {
	c, err := dial(addr)
	if err != nil {
		return err
	}
	if _, err := c.Write([]byte{cmdSink, 1, 2, 3}); err != nil {
		return err
	}
	time.Sleep(100 * time.Millisecond)
	c.SetLinger(0)
	return c.Close()
}

// Marker is what the "marker" scenario sends, over and over: a capture of
// the wire between two nodes must never show it.
const Marker = "smesh-e2e-cleartext-marker-4f1d8a"

// markerReader repeats Marker.
type markerReader struct{ off int }

func (m *markerReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = Marker[m.off]
		m.off = (m.off + 1) % len(Marker)
	}
	return len(p), nil
}

// sendMarker sends n bytes of repeated Marker, half-closes, and checks the
// server's count and digest.
func sendMarker(addr string, n int64) error {
	return sendChecked(addr, n, cmdSink, func() io.Reader { return &markerReader{} })
}

// concurrentSize is the size of connection i of a "concurrent" exchange:
// random, up to maxSize, the same for the test that checks the counters.
func concurrentSize(i int, maxSize int64) int64 {
	return rand.New(rand.NewPCG(uint64(i), uint64(maxSize))).Int64N(maxSize) + 1
}

// concurrent runs conns transfers at once, sizes by concurrentSize.
func concurrent(addr string, conns int, maxSize int64) error {
	errs := make(chan error, conns)
	for i := range conns {
		go func() {
			n := concurrentSize(i, maxSize)
			if i%2 == 0 {
				errs <- oneWay(addr, n, uint64(i), cmdSink)
			} else {
				errs <- echo(addr, n, uint64(i))
			}
		}()
	}
	var first error
	for range conns {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// peer returns how the server saw this connection and how the client did.
func peer(addr string) (serverSaw, local, remote string, err error) {
	c, err := command(addr, []byte{cmdPeer})
	if err != nil {
		return "", "", "", err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", "", "", err
	}
	return line[:len(line)-1], c.LocalAddr().String(), c.RemoteAddr().String(), nil
}

// client is the "client" helper: args are a scenario and its parameters. It
// prints "ok ..." and exits 0 when every byte matched.
func client(args []string) int {
	if err := runScenario(args); err != nil {
		fmt.Fprintln(os.Stderr, "client:", err)
		return 1
	}
	return 0
}

func runScenario(args []string) error {
	if len(args) < 2 {
		return errors.New("usage: SCENARIO ADDR [N]")
	}
	scenario, addr := args[0], args[1]
	n := int64(0)
	if len(args) > 2 && scenario != "reconnect" {
		var err error
		if n, err = strconv.ParseInt(args[2], 10, 64); err != nil {
			return err
		}
	}
	var err error
	switch scenario {
	case "oneway":
		err = oneWay(addr, n, 1, cmdSink)
	case "bulk": // until told to stop on stdin
		err = bulk(addr, 5)
	case "stall":
		err = oneWay(addr, n, 2, cmdStall)
	case "echo":
		err = echo(addr, n, 3)
	case "rr":
		err = requestResponse(addr, int(n))
	case "paced": // N exchanges, 10 ms apart, or args[3] ms apart
		pause := 10 * time.Millisecond
		if len(args) > 3 {
			ms, perr := strconv.Atoi(args[3])
			if perr != nil {
				return perr
			}
			pause = time.Duration(ms) * time.Millisecond
		}
		err = paced(addr, int(n), pause)
	case "serverfirst":
		err = serverFirst(addr, n, 4)
	case "refused": // the connection must be refused
		var c *net.TCPConn
		if c, err = dial(addr); err == nil {
			c.Close()
			err = errors.New("connected, want refused")
		} else if errors.Is(err, syscall.ECONNREFUSED) {
			err = nil
		}
	case "queued": // connected, and no answer within a second: waiting in a listener's queue
		var c *net.TCPConn
		if c, err = dial(addr); err == nil {
			c.Write([]byte{cmdPeer})
			c.SetReadDeadline(time.Now().Add(time.Second))
			var b [1]byte
			_, err = c.Read(b[:])
			c.Close()
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				err = nil
			} else if err == nil {
				err = errors.New("answered, want no answer (queued)")
			}
		}
	case "dropped": // the SYN must go unanswered: connect times out (1.5 s), no reset
		var c net.Conn
		if c, err = net.DialTimeout(network(addr), addr, 1500*time.Millisecond); err == nil {
			c.Close()
			err = errors.New("connected, want the SYN dropped (connect timing out)")
		} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
			err = nil
		}
	case "eperm": // connect(2) must fail with EPERM (connect4 refused)
		var c *net.TCPConn
		if c, err = dial(addr); err == nil {
			c.Close()
			err = errors.New("connected, want EPERM")
		} else if errors.Is(err, syscall.EPERM) {
			err = nil
		}
	case "reset-server":
		err = resetByServer(addr)
	case "reset-client":
		err = resetByClient(addr)
	case "direct": // straight to a port that must end the connection at once
		err = endsWith(addr, []byte("x"), 10*time.Second, true)
	case "idle": // a few bytes, then nothing: the connection must be reset (not delivered, or cut)
		err = endsWith(addr, []byte{cmdHold, 1, 2, 3}, 30*time.Second, false)
	case "reset": // as idle, but refused at once: a reset before connect(2) returned counts too
		err = endsWith(addr, []byte{cmdHold, 1, 2, 3}, 30*time.Second, false)
		if errors.Is(err, syscall.ECONNRESET) {
			err = nil
		}
	case "concurrent": // N: largest size; then the number of connections, 200 by default
		conns := 200
		if len(args) > 3 {
			if conns, err = strconv.Atoi(args[3]); err != nil {
				return err
			}
		}
		err = concurrent(addr, conns, n)
	case "marker":
		err = sendMarker(addr, n)
	case "reconnect": // ADDR refuses; one socket connects there, then to args[2]
		err = reconnect(addr, args[2])
	case "spread": // N connections one after another: which backend served each
		var got map[string]int
		if got, err = spread(addr, int(n)); err == nil {
			var out []byte
			out, err = json.Marshal(got)
			fmt.Printf("spread %s\n", out)
		}
	case "steady": // 200 connections a second (or one per args[3] ms) for N seconds, none may fail
		interval := 5 * time.Millisecond
		if len(args) > 3 {
			var ms int
			if ms, err = strconv.Atoi(args[3]); err != nil {
				return err
			}
			interval = time.Duration(ms) * time.Millisecond
		}
		err = steady(addr, time.Duration(n)*time.Second, interval)
	case "short":
		for i := range n {
			if err = oneWay(addr, 16, uint64(i), cmdSink); err != nil {
				break
			}
		}
	case "slow", "slow-waitall", "slow-lowat", "stalled", "fast", "fast-waitall", "signalled", "greeted", "writers", "held", "held-greeted":
		// A writer as fast as it can be into a reader that sleeps
		// 1 ms per 64 KiB read, or that stalls 10 s first; or one
		// that reads as fast as it can after a second's stall ("fast",
		// "fast-waitall": the writer gets splice_queue_limit ahead
		// first, which a reader that keeps pace from the start may
		// never let it, and then the reader waits in the kernel for
		// most reads); after a byte the
		// server sent first ("greeted"); from several writer
		// threads at once ("writers"); "signalled": "fast-waitall"
		// with the reader's thread signalled every millisecond;
		// "held": slow, then open until a line on stdin, once every
		// byte is acknowledged.
		mode, stall, pause := byte('p'), byte(0), time.Millisecond
		hold := strings.HasPrefix(scenario, "held")
		switch strings.TrimPrefix(scenario, "held-") {
		case "slow-waitall":
			mode = 'w'
		case "slow-lowat":
			mode = 'l'
		case "stalled":
			stall, pause = 10, 0
		case "fast":
			stall, pause = 1, 0
		case "fast-waitall":
			mode, stall, pause = 'w', 1, 0
		case "signalled":
			mode, stall, pause = 's', 1, 0
		case "greeted":
			mode = 'g'
		case "writers":
			mode = 'm'
		}
		var mem slowMemory
		mem, err = slowWrite(addr, n, mode, stall, pause, hold)
		if err == nil {
			fmt.Printf("memory max_rmem=%d max_wqueued=%d max_over_rcvbuf=%d\n", mem.rmem, mem.wqueued, mem.overRcvbuf)
		}
	case "peer":
		var s, l, r string
		s, l, r, err = peer(addr)
		if err == nil {
			fmt.Printf("peer server-saw=%s local=%s remote=%s\n", s, l, r)
		}
	default:
		return fmt.Errorf("unknown scenario %q", scenario)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", scenario, err)
	}
	fmt.Println("ok", scenario)
	return nil
}

// who makes one connection to addr (a Service address): it asks the
// server which address it is (the backend connect4 chose), checks that the
// socket's peer is addr itself (getpeername shows what the app dialled) and
// that 16 bytes come back as sent.
func who(addr string, seed uint64) (string, error) {
	c, err := command(addr, []byte{cmdWho})
	if err != nil {
		return "", err
	}
	defer c.Close()
	want := netip.MustParseAddrPort(addr)
	if got := netip.MustParseAddrPort(c.RemoteAddr().String()); got.Addr().Unmap() != want.Addr().Unmap() || got.Port() != want.Port() {
		return "", fmt.Errorf("getpeername says %s, want %s (the address dialled)", got, addr)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	line, err := r.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("reading which backend: %w", err)
	}
	msg := make([]byte, 16)
	io.ReadFull(stream(seed), msg)
	if _, err := c.Write(msg); err != nil {
		return "", err
	}
	back := make([]byte, len(msg))
	if _, err := io.ReadFull(r, back); err != nil {
		return "", fmt.Errorf("reading the echo: %w", err)
	}
	if !bytes.Equal(back, msg) {
		return "", fmt.Errorf("echo %x, sent %x", back, msg)
	}
	return strings.TrimSpace(line), nil
}

// spread makes n connections to addr one after another and counts them by
// the backend that served each.
func spread(addr string, n int) (map[string]int, error) {
	got := map[string]int{}
	for i := range n {
		b, err := who(addr, uint64(i))
		if err != nil {
			return got, fmt.Errorf("connection %d: %w", i, err)
		}
		got[b]++
	}
	return got, nil
}

// steady opens a connection to addr every interval for d, each one a who
// exchange on its own goroutine (a slow one does not delay the next), and
// fails with the first errors if any connection failed. It prints
// "steady N connections" and the backends' counts.
func steady(addr string, d, interval time.Duration) error {
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
		got  = map[string]int{}
	)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	end := time.Now().Add(d)
	n := 0
	for time.Now().Before(end) {
		<-tick.C
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			b, err := who(addr, seed)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, fmt.Errorf("%v: %w", time.Now().Format("15:04:05.000"), err))
				return
			}
			got[b]++
		}(uint64(n))
		n++
	}
	wg.Wait()
	out, _ := json.Marshal(got)
	fmt.Printf("steady %d connections %s\n", n, out)
	if len(errs) > 0 {
		return fmt.Errorf("%d of %d connections failed, first: %w", len(errs), n, errors.Join(errs[:min(len(errs), 5)]...))
	}
	return nil
}

// reconnect connects one IPv4 socket to refused, which must refuse it, and
// then to addr (connect(2) may be called again after a failure): the
// socket's peer must then be addr, not what it dialled first.
func reconnect(refused, addr string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	sockaddr := func(s string) *unix.SockaddrInet4 {
		ap := netip.MustParseAddrPort(s)
		return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	}
	if err := unix.Connect(fd, sockaddr(refused)); !errors.Is(err, unix.ECONNREFUSED) {
		return fmt.Errorf("connect to %s: %v, want ECONNREFUSED", refused, err)
	}
	if err := unix.Connect(fd, sockaddr(addr)); err != nil {
		return fmt.Errorf("connect to %s after %s refused: %w", addr, refused, err)
	}
	sa, err := unix.Getpeername(fd)
	if err != nil {
		return err
	}
	in4, ok := sa.(*unix.SockaddrInet4)
	if got := netip.AddrPortFrom(netip.AddrFrom4(in4.Addr), uint16(in4.Port)); !ok || got != netip.MustParseAddrPort(addr) {
		return fmt.Errorf("getpeername says %v after connecting to %s (a Service %s refused first)", sa, addr, refused)
	}
	return nil
}
