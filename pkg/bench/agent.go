package bench

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

// The bench's server and client are smeshd itself, re-executed as
// "smeshd bench-agent ROLE ...": the same code in every mode, placed in the
// cgroup and network namespace of the mode under test.

// Workload commands, the first byte of every connection.
const (
	cmdBulk = 'B' // client streams patterned data; server checks it and answers count + ok
	cmdEcho = 'E' // request/response: server echoes fixed-size messages
	cmdConn = 'C' // connection rate: server answers one byte and closes
)

const (
	bulkWrite = 256 << 10 // bytes per write(2) in the bulk workload
	blockSize = 4096      // every block starts with its 8-byte index
	rrSize    = 64        // request/response message size
)

// AgentMain runs a bench agent; args[0] is the role. It returns the exit code.
func AgentMain(args []string) int {
	if len(args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: bench-agent server ADDR | client WORKLOAD ADDR DURATION | hold ADDR N")
		return 2
	}
	var err error
	switch args[0] {
	case "server":
		err = agentServer(args[1])
	case "client":
		err = agentClient(args[1:])
	case "hold":
		err = agentHold(args[1:])
	case "probe":
		agentProbe(args[1])
	case "pause":
		// An idle pod's only process: it waits until told to stop.
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
		<-stop
	default:
		err = fmt.Errorf("unknown role %q", args[0])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-agent:", err)
		return 1
	}
	return 0
}

func agentServer(addr string) error {
	ln, err := net.Listen("tcp4", addr)
	if err != nil {
		return err
	}
	fmt.Println("ready")
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go serveBench(c.(*net.TCPConn))
	}
}

func serveBench(c *net.TCPConn) {
	defer c.Close()
	var cmd [1]byte
	if _, err := io.ReadFull(c, cmd[:]); err != nil {
		return
	}
	switch cmd[0] {
	case cmdBulk:
		n, ok := checkPattern(c)
		var ans [9]byte
		binary.BigEndian.PutUint64(ans[:8], uint64(n))
		if ok {
			ans[8] = 1
		}
		c.Write(ans[:])
	case cmdEcho:
		buf := make([]byte, rrSize)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	case cmdConn:
		c.Write(cmd[:])
	}
}

// fillPattern stamps the index of every block of buf, which starts at
// stream offset off (a multiple of blockSize).
func fillPattern(buf []byte, off int64) {
	for i := 0; i < len(buf); i += blockSize {
		binary.LittleEndian.PutUint64(buf[i:], uint64(off+int64(i))/blockSize)
	}
}

// checkPattern reads until EOF and checks every block index: a lost,
// duplicated or reordered block shows. It costs one comparison per 4 KiB, so
// checking does not limit the throughput it measures.
func checkPattern(r io.Reader) (int64, bool) {
	buf := make([]byte, bulkWrite)
	var off int64
	var word [8]byte // a block index split across reads
	ok := true
	for {
		n, err := r.Read(buf)
		for i := 0; i < n; {
			pos := off % blockSize
			if pos < 8 {
				k := copy(word[pos:], buf[i:n])
				if pos+int64(k) == 8 && binary.LittleEndian.Uint64(word[:]) != uint64(off/blockSize) {
					ok = false
				}
				i += k
				off += int64(k)
				continue
			}
			skip := min(int64(n-i), blockSize-pos)
			i += int(skip)
			off += skip
		}
		if err != nil {
			return off, ok && errors.Is(err, io.EOF) && off%blockSize == 0
		}
	}
}

// Sample is what one client run measured.
type Sample struct {
	Bytes     int64   `json:"bytes,omitempty"`
	Seconds   float64 `json:"seconds"`
	Verified  bool    `json:"verified"`
	Count     int64   `json:"count,omitempty"`
	Histogram []int64 `json:"histogram,omitempty"` // round trips per bucket (see histogram)
}

func agentClient(args []string) error {
	if len(args) != 3 {
		return errors.New("client WORKLOAD ADDR DURATION")
	}
	d, err := time.ParseDuration(args[2])
	if err != nil {
		return err
	}
	var s Sample
	switch args[0] {
	case "bulk":
		s, err = runBulk(args[1], d)
	case "rr":
		s, err = runRR(args[1], d)
	case "conn":
		s, err = runConnRate(args[1], d)
	default:
		err = fmt.Errorf("unknown workload %q", args[0])
	}
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(s)
}

func dialBench(addr string, cmd byte) (*net.TCPConn, error) {
	c, err := net.DialTimeout("tcp4", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	tc := c.(*net.TCPConn)
	if _, err := tc.Write([]byte{cmd}); err != nil {
		tc.Close()
		return nil, err
	}
	return tc, nil
}

func runBulk(addr string, d time.Duration) (Sample, error) {
	c, err := dialBench(addr, cmdBulk)
	if err != nil {
		return Sample{}, err
	}
	defer c.Close()
	buf := make([]byte, bulkWrite)
	var sent int64
	start := time.Now()
	for end := start.Add(d); time.Now().Before(end); {
		fillPattern(buf, sent)
		n, err := c.Write(buf)
		sent += int64(n)
		if err != nil {
			return Sample{}, err
		}
	}
	if err := c.CloseWrite(); err != nil {
		return Sample{}, err
	}
	var ans [9]byte
	if _, err := io.ReadFull(c, ans[:]); err != nil {
		return Sample{}, fmt.Errorf("reading the server's count: %w", err)
	}
	got := int64(binary.BigEndian.Uint64(ans[:8]))
	return Sample{
		Bytes:    got,
		Seconds:  time.Since(start).Seconds(),
		Verified: got == sent && ans[8] == 1,
	}, nil
}

func runRR(addr string, d time.Duration) (Sample, error) {
	c, err := dialBench(addr, cmdEcho)
	if err != nil {
		return Sample{}, err
	}
	defer c.Close()
	var h histogram
	req := make([]byte, rrSize)
	resp := make([]byte, rrSize)
	verified := true
	var count int64
	start := time.Now()
	for end := start.Add(d); time.Now().Before(end); count++ {
		binary.LittleEndian.PutUint64(req, uint64(count))
		t0 := time.Now()
		if _, err := c.Write(req); err != nil {
			return Sample{}, err
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			return Sample{}, err
		}
		h.add(time.Since(t0))
		if !bytes.Equal(req, resp) {
			verified = false
		}
	}
	return Sample{Seconds: time.Since(start).Seconds(), Count: count, Verified: verified, Histogram: h.counts[:]}, nil
}

func runConnRate(addr string, d time.Duration) (Sample, error) {
	var count int64
	verified := true
	start := time.Now()
	var b [1]byte
	for end := start.Add(d); time.Now().Before(end); count++ {
		c, err := dialBench(addr, cmdConn)
		if err != nil {
			return Sample{}, fmt.Errorf("connection %d: %w", count, err)
		}
		if _, err := io.ReadFull(c, b[:]); err != nil || b[0] != cmdConn {
			verified = false
		}
		c.Close()
	}
	return Sample{Seconds: time.Since(start).Seconds(), Count: count, Verified: verified}, nil
}

// agentProbe connects to addr, asks for one byte and prints "allowed" when
// it comes, else "refused: " and what happened instead: a same-node connect
// that policy denies fails (ECONNREFUSED); a tunnelled one is accepted by
// the local smeshd and closed when the receiving node refuses it.
func agentProbe(addr string) {
	c, err := dialBench(addr, cmdConn)
	if err != nil {
		fmt.Println("refused:", err)
		return
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		fmt.Println("refused:", err)
		return
	}
	fmt.Println("allowed")
}

// agentHold opens N connections, says "held", and keeps them until its
// stdin closes.
func agentHold(args []string) error {
	if len(args) != 2 {
		return errors.New("hold ADDR N")
	}
	n, err := strconv.Atoi(args[1])
	if err != nil {
		return err
	}
	conns := make([]net.Conn, 0, n)
	for i := range n {
		c, err := dialBench(args[0], cmdEcho)
		if err != nil {
			return fmt.Errorf("connection %d of %d: %w", i+1, n, err)
		}
		conns = append(conns, c)
	}
	// One round trip on each proves every connection is live end to end.
	req := make([]byte, rrSize)
	for i, c := range conns {
		if _, err := c.Write(req); err != nil {
			return fmt.Errorf("connection %d: %w", i, err)
		}
		if _, err := io.ReadFull(c, req); err != nil {
			return fmt.Errorf("connection %d: %w", i, err)
		}
	}
	fmt.Println("held")
	io.Copy(io.Discard, os.Stdin)
	for _, c := range conns {
		c.Close()
	}
	return nil
}
