package datapath

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/smesh-dev/smesh/bpf/connect"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// TestSmeshdAlive runs connect4's heartbeat check (smeshd_alive in
// capture.h) in the kernel through BPF_PROG_TEST_RUN: fresh and stale
// beats, a hold of 0 (no bound), an entry never written, and a beat written
// by WriteHeartbeat read on bpf_ktime_get_ns's clock.
func TestSmeshdAlive(t *testing.T) {
	testenv.RequirePrivileged(t)
	objs := loadHarness(t, Options{ProxyAddr: netip.MustParseAddrPort("127.0.0.1:18000")}, nil)
	alive := func(now uint64) bool {
		t.Helper()
		ret, err := objs.RunSmeshdAlive.Run(&ebpf.RunOptions{Context: []uint64{now}})
		if err != nil {
			t.Fatalf("running the harness: %v", err)
		}
		return ret == 1
	}
	const s = uint64(time.Second)
	const base = 1000 * s
	if !alive(base) {
		t.Error("an entry never written (all zero) counts as stale; want no bound, as before the heartbeat")
	}
	cases := []struct {
		name      string
		beat, now uint64
		hold      time.Duration
		wantAlive bool
	}{
		{"fresh", base, base + 1*s, 10 * time.Second, true},
		{"at the hold", base, base + 10*s, 10 * time.Second, true},
		{"just past the hold", base, base + 10*s + 1, 10 * time.Second, false},
		{"stale", base, base + 60*s, 10 * time.Second, false},
		{"beat after now (another CPU)", base + 5, base, 10 * time.Second, true},
		{"hold 0: no bound", base, base + 3600*s, 0, true},
		{"short hold", base, base + 3*s, 2 * time.Second, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if err := writeHeartbeat(objs.SmeshHeartbeat, c.beat, c.hold); err != nil {
				t.Fatal(err)
			}
			if got := alive(c.now); got != c.wantAlive {
				t.Errorf("beat %d, hold %v, now %d: alive = %v, want %v", c.beat, c.hold, c.now, got, c.wantAlive)
			}
		})
	}
	t.Run("WriteHeartbeat on the kernel's clock", func(t *testing.T) {
		if err := WriteHeartbeat(objs.SmeshHeartbeat, 2*time.Second); err != nil {
			t.Fatal(err)
		}
		if !alive(0) {
			t.Fatal("a beat just written reads as stale: CLOCK_MONOTONIC is not bpf_ktime_get_ns's clock?")
		}
		time.Sleep(2500 * time.Millisecond)
		if alive(0) {
			t.Fatal("a beat 2.5s old with a hold of 2s reads as fresh")
		}
	})
}

// dialReport dials args[0] for every line on stdin and prints what came of
// it: "read TEXT" (the server answered), "queued" (connected, nothing came
// within 700ms: the connection waits in a listener's queue), "eperm"
// (connect4 refused), or "error ERR".
func dialReport(args []string) int {
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		c, err := net.DialTimeout("tcp", args[0], 3*time.Second)
		switch {
		case errors.Is(err, syscall.EPERM):
			fmt.Println("eperm")
			continue
		case err != nil:
			fmt.Println("error", err)
			continue
		}
		c.SetReadDeadline(time.Now().Add(700 * time.Millisecond))
		buf := make([]byte, 64)
		n, err := c.Read(buf)
		var ne net.Error
		switch {
		case n > 0:
			fmt.Println("read", strings.TrimSpace(string(buf[:n])))
		case errors.As(err, &ne) && ne.Timeout():
			fmt.Println("queued")
		default:
			fmt.Println("error", err)
		}
		c.Close()
	}
	return 0
}

// TestHeartbeatBoundsHeldListener: a captured connect() goes to smeshd's
// listener while the heartbeat is fresh, also when nobody accepts (it waits
// in the queue: what a restart relies on); once the heartbeat is older than
// restart_hold, on_failure decides as if there were no listener: "open"
// sends it to its destination (the capture still held, as a successor or
// systemd's store would hold it), "closed" refuses it at once (the capture
// pinned, the Datapath gone as with SIGKILL); a successor's beat captures
// again.
func TestHeartbeatBoundsHeldListener(t *testing.T) {
	testenv.RequirePrivileged(t)
	for _, onFailure := range []string{"open", "closed"} {
		t.Run(onFailure, func(t *testing.T) {
			proxyCg, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
			// smeshd's listener, held by nobody accepting.
			held, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { held.Close() })
			// The destination: answers "direct".
			srv, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { srv.Close() })
			go func() {
				for {
					c, err := srv.Accept()
					if err != nil {
						return
					}
					c.Write([]byte("direct\n"))
					c.Close()
				}
			}()
			opts := handoverOpts(ModeCopy, held.Addr().(*net.TCPAddr).AddrPort(), proxyCg)
			if onFailure == "closed" {
				opts.PinDir, opts.FailClosed = testBPFFS(t), true
				t.Cleanup(func() { RemovePins(opts.PinDir) })
			}
			const hold = 2 * time.Second
			start := func() (*Datapath, *Heartbeat) {
				d, err := Load(opts)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { d.Close() })
				hb, err := d.StartHeartbeat(hold)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(hb.Stop)
				if err := d.SetNamespace(ownNetnsCookie(t), nil, true, true); err != nil {
					t.Fatal(err)
				}
				if err := d.SetCapture([]string{app}, opts.IncludeCIDRs, nil, nil); err != nil {
					t.Fatal(err)
				}
				d.Commit()
				return d, hb
			}
			h := testenv.StartHelper(t, app, "", "dial-report", srv.Addr().String())
			dial := func() (string, time.Duration) {
				t.Helper()
				began := time.Now()
				if err := h.Send("dial"); err != nil {
					t.Fatal(err)
				}
				line, err := h.ReadLine(10 * time.Second)
				if err != nil {
					t.Fatalf("dial-report: %v (stderr %s)", err, h.Stderr())
				}
				return line, time.Since(began)
			}
			expect := func(when, want string) {
				t.Helper()
				if got, took := dial(); got != want {
					t.Errorf("%s: %q after %v, want %q", when, got, took.Round(time.Millisecond), want)
				}
			}

			d, hb := start()
			expect("heartbeat fresh", "queued")
			hb.Stop()
			stopped := time.Now()
			if onFailure == "closed" {
				// As a SIGKILL leaves it: the pins hold the capture.
				d.Close()
			}
			expect("heartbeat stopped, within restart_hold", "queued")
			time.Sleep(time.Until(stopped.Add(hold + 300*time.Millisecond)))
			want := "read direct"
			if onFailure == "closed" {
				want = "eperm"
			}
			got, took := dial()
			if got != want {
				t.Errorf("restart_hold after the last beat: %q, want %q", got, want)
			}
			if took > time.Second {
				t.Errorf("restart_hold after the last beat: the connect took %v, want an answer at once", took)
			}

			// A successor beats: captured again.
			if onFailure == "closed" {
				d, _ = start()
			} else if _, err := d.StartHeartbeat(hold); err != nil {
				t.Fatal(err)
			}
			expect("a successor's heartbeat", "queued")
			c, err := d.Counters()
			if err != nil {
				t.Fatal(err)
			}
			if unready := map[string]uint64{"open": c.UnreadyOpen, "closed": c.UnreadyClosed}[onFailure]; unready != 1 {
				t.Errorf("smesh_capture_unready_total{action=%q} = %d, want 1 (the stale connect)", onFailure, unready)
			}
		})
	}
}

// TestHeartbeatFromPredecessorWithout: a predecessor of a version without
// smesh_heartbeat (here: the map left out of its hand-over) hands over; the
// successor makes the map new, its heartbeat bounds the held capture, and
// everything else is adopted as before (a connect loop across the swap all
// captured).
func TestHeartbeatFromPredecessorWithout(t *testing.T) {
	testenv.RequirePrivileged(t)
	proxyCg, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
	proxy, direct := listenCounting(t), listenCounting(t)
	opts := handoverOpts(ModeCopy, proxy.addr, proxyCg)
	a := predecessor(t, opts, app)
	if err := a.SetNamespace(ownNetnsCookie(t), nil, true, true); err != nil {
		t.Fatal(err)
	}
	loop := testenv.StartHelper(t, app, "", "connect-loop", direct.addr.String())
	waitFor(t, "connects captured by the predecessor", func() bool { return proxy.n.Load() >= 100 })
	files, err := a.Handover()
	if err != nil {
		t.Fatal(err)
	}
	old, _ := mapID(a.connect.SmeshHeartbeat)
	name := mapHandoverName("smesh_heartbeat")
	if f, ok := files[name]; !ok {
		t.Fatalf("the hand-over has no %s", name)
	} else {
		f.Close()
		delete(files, name)
	}
	b := successor(t, opts, files)
	hb, err := b.StartHeartbeat(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(hb.Stop)
	err = b.SetCapture([]string{app}, opts.IncludeCIDRs, nil, nil)
	closeFiles(files)
	if err != nil {
		t.Fatal(err)
	}
	b.Commit()
	if err := a.Release(); err != nil {
		t.Fatal(err)
	}
	if id, _ := mapID(b.connect.SmeshHeartbeat); id == old {
		t.Error("the successor uses the predecessor's heartbeat map, which was not handed over")
	}
	var v connect.ConnectHeartbeat
	if err := b.connect.SmeshHeartbeat.Lookup(uint32(0), &v); err != nil || v.BeatNs == 0 || v.HoldNs != uint64(10*time.Second) {
		t.Errorf("the successor's heartbeat: %+v, %v", v, err)
	}
	atSwap := proxy.n.Load()
	waitFor(t, "connects after the swap", func() bool { return proxy.n.Load()+direct.n.Load() >= atSwap+100 })
	if err := loop.Send("stop"); err != nil {
		t.Fatal(err)
	}
	if _, err := loop.ReadLine(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	if n := direct.n.Load(); n != 0 {
		t.Errorf("%d connects uncaptured across the hand-over", n)
	}
}
