package datapath

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// pattern fills b with the bytes of stream seed from offset off on: byte
// i is (seed*131 + i) mod 251, so that a byte out of place, lost or
// repeated shows at once.
func pattern(b []byte, seed, off uint64) {
	for i := range b {
		b[i] = byte((seed*131 + off + uint64(i)) % 251)
	}
}

// readChecked reads n bytes of stream seed from r, paused by pause every
// 64 KiB, and fails at the first byte out of place.
func readChecked(r io.Reader, n int, seed uint64, pause time.Duration, progress func(int)) error {
	buf, want := make([]byte, 64<<10), make([]byte, 64<<10)
	for got := 0; got < n; {
		m, err := r.Read(buf[:min(len(buf), n-got)])
		pattern(want[:m], seed, uint64(got))
		if i := mismatch(buf[:m], want[:m]); i >= 0 {
			return fmt.Errorf("stream %d: byte %d is %d, want %d", seed, got+i, buf[i], want[i])
		}
		got += m
		if progress != nil {
			progress(got)
		}
		if err != nil {
			return fmt.Errorf("stream %d: %d of %d bytes: %w", seed, got, n, err)
		}
		if pause > 0 {
			time.Sleep(pause)
		}
	}
	return nil
}

func mismatch(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// writePattern writes n bytes of stream seed to w.
func writePattern(w io.Writer, n int, seed uint64) error {
	buf := make([]byte, 128<<10)
	for sent := 0; sent < n; {
		m := min(len(buf), n-sent)
		pattern(buf[:m], seed, uint64(sent))
		if _, err := w.Write(buf[:m]); err != nil {
			return err
		}
		sent += m
	}
	return nil
}

// keepAlive is the helper of TestReleaseKeepAlive: one loopback connection
// (spliced: the cgroup is enrolled) between Go (non-blocking) ends, as
// between curl and nginx. Its server answers every 16-byte request with
// args[1] bytes; the client makes args[0] rounds and prints "round I NS"
// for each, then "done". Scenario args[2]:
//   - "download": one request, then its answer, per round.
//   - "pipelined": per round, the client sends a request, a second one
//     at once, a third and a fourth once 40 % and 55 % of the first
//     answer are in, while it reads the answers slowly (200 us per
//     64 KiB): the second request waits unread at the server while the
//     server's answer is demoted and its direction closes, and the third
//     and fourth come then, through both places where the client's
//     direction closes (the spliced send that gives up splicing, and
//     close_own on a send by TCP).
func keepAlive(args []string) int {
	rounds, _ := strconv.Atoi(args[0])
	size, _ := strconv.Atoi(args[1])
	scenario := args[2]
	client, server, err := goLoopbackPair()
	if err != nil {
		fmt.Println(err)
		return 1
	}
	serverErr := make(chan error, 1)
	go func() {
		req, want := make([]byte, 16), make([]byte, 16)
		for n := uint64(0); ; n++ {
			if _, err := io.ReadFull(server, req); err != nil {
				if errors.Is(err, io.EOF) {
					err = nil
				}
				serverErr <- err
				return
			}
			pattern(want, 1000+n, 0)
			if !bytes.Equal(req, want) {
				serverErr <- fmt.Errorf("request %d is %x, want %x", n, req, want)
				return
			}
			if err := writePattern(server, size, n); err != nil {
				serverErr <- err
				return
			}
		}
	}()
	request := func(n uint64) error {
		req := make([]byte, 16)
		pattern(req, 1000+n, 0)
		_, err := client.Write(req)
		return err
	}
	fail := func(err error) int {
		fmt.Println("error:", err)
		return 1
	}
	var n uint64
	for round := range rounds {
		start := time.Now()
		switch scenario {
		case "download":
			if err := request(n); err != nil {
				return fail(err)
			}
			if err := readChecked(client, size, n, 0, nil); err != nil {
				return fail(err)
			}
			n++
		case "pipelined":
			if err := request(n); err != nil {
				return fail(err)
			}
			if err := request(n + 1); err != nil {
				return fail(err)
			}
			// The third and fourth requests go while the server
			// still writes the first answer (the socket buffers
			// hold less than 40 % of it), the second one unread.
			next := n + 2
			err := readChecked(client, size, n, 200*time.Microsecond, func(got int) {
				if next == n+2 && got >= size*4/10 || next == n+3 && got >= size*55/100 {
					if err := request(next); err != nil {
						fmt.Println("error: request:", err)
					}
					next++
				}
			})
			if err != nil {
				return fail(err)
			}
			for i := uint64(1); i < 4; i++ {
				if err := readChecked(client, size, n+i, 0, nil); err != nil {
					return fail(err)
				}
			}
			n += 4
		default:
			return fail(fmt.Errorf("unknown scenario %q", scenario))
		}
		fmt.Printf("round %d %d\n", round, time.Since(start).Nanoseconds())
	}
	client.Close()
	if err := <-serverErr; err != nil {
		return fail(fmt.Errorf("server: %w", err))
	}
	fmt.Println("done")
	return 0
}

// TestReleaseKeepAlive: a keep-alive connection whose small requests are
// spliced and whose large answers are demoted (the reader falls
// splice_queue_limit behind) goes back to plain TCP at both ends: the
// server's direction closes once the client has read what it spliced, the
// client's gives up splicing at its next request, and sockops releases
// both sockets (release() in sockops.c, close_own() in skmsg.c). Every
// byte of every request and answer is checked, also when a request waits
// unread at the server while its direction closes ("pipelined": the
// server's socket must not leave the sockhash before it has read that
// request, which would be lost with its psock). SMESH_RELEASE_BENCH=1
// prints how long each round took, with and without the mesh.
func TestReleaseKeepAlive(t *testing.T) {
	testenv.RequirePrivileged(t)
	if err := Missing(ProbeModes(), "bounded splice"); err != nil {
		testenv.SkipOrFail(t, "this kernel cannot bound spliced queues (Linux %s): %v", KernelRelease(), err)
	}
	bench := os.Getenv("SMESH_RELEASE_BENCH") == "1"
	proxyCg, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
	opts := handoverOpts(ModeSplice, netip.MustParseAddrPort("127.0.0.1:18000"), proxyCg)
	opts.SpliceQueueLimit = 2 << 20
	d := predecessor(t, opts, app)
	run := func(t *testing.T, cgroup, scenario string, rounds, size int) []time.Duration {
		h := testenv.StartHelper(t, cgroup, "", "keepalive", strconv.Itoa(rounds), strconv.Itoa(size), scenario)
		var took []time.Duration
		for {
			line, err := h.ReadLine(30 * time.Second)
			if err != nil {
				t.Fatalf("%v (after %d rounds)", err, len(took))
			}
			if line == "done" {
				break
			}
			var round int
			var ns int64
			if _, err := fmt.Sscanf(line, "round %d %d", &round, &ns); err != nil {
				t.Fatalf("helper: %s", line)
			}
			took = append(took, time.Duration(ns))
		}
		if err := h.Wait(); err != nil {
			t.Fatal(err)
		}
		return took
	}
	for _, c := range []struct {
		scenario string
		rounds   int
		size     int
	}{
		{"download", 10, 64 << 20},
		{"pipelined", 3, 32 << 20},
	} {
		t.Run(c.scenario, func(t *testing.T) {
			c0, s0 := counters(t, d)
			took := run(t, app, c.scenario, c.rounds, c.size)
			c1, s1 := counters(t, d)
			t.Logf("%d demotions, %d sockets released; %d MiB spliced, %d MiB by TCP",
				c1.Demotions-c0.Demotions, c1.Released-c0.Released,
				(s1.Bytes()-s0.Bytes())>>20, (s1.Demoted()-s0.Demoted())>>20)
			if c1.Demotions == c0.Demotions {
				t.Fatalf("no demotion: the server never got splice_queue_limit ahead?")
			}
			if got := c1.Released - c0.Released; got != 2 {
				t.Errorf("%d sockets released, want both ends of the connection", got)
			}
			if bench {
				var none []time.Duration
				if c.scenario == "download" {
					none = run(t, testenv.NewCgroup(t), c.scenario, c.rounds, c.size)
				}
				for i, d := range took {
					line := fmt.Sprintf("round %d: %6.2f Gbit/s", i, float64(c.size)*8/d.Seconds()/1e9)
					if i < len(none) {
						line += fmt.Sprintf(", no mesh %6.2f Gbit/s", float64(c.size)*8/none[i].Seconds()/1e9)
					}
					t.Log(line)
				}
			}
		})
	}
}
