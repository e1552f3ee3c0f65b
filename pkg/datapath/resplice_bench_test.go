package datapath

import (
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// bulkPair is the helper of TestRespliceBulk: one loopback connection
// (spliced when the cgroup is enrolled), a Go writer sending 128 KiB
// writes for args[0] seconds and a Go (non-blocking) reader reading as
// fast as it can, as iperf3 does; prints "bulk BYTES NS".
func bulkPair(args []string) int {
	secs, _ := strconv.ParseFloat(args[0], 64)
	w, r, err := goLoopbackPair()
	if err != nil {
		fmt.Println(err)
		return 1
	}
	// A request first, as a client would send: the other direction
	// splices and never sends again, so it never closes and the bulk
	// direction is never released to plain TCP (close_own in skmsg.c).
	if _, err := r.Write([]byte("GET")); err != nil {
		fmt.Println(err)
		return 1
	}
	if _, err := io.ReadFull(w, make([]byte, 3)); err != nil {
		fmt.Println(err)
		return 1
	}
	done := make(chan int64)
	go func() {
		n, _ := io.CopyBuffer(io.Discard, r, make([]byte, 128<<10))
		done <- n
	}()
	buf := make([]byte, 128<<10)
	start := time.Now()
	for time.Since(start) < time.Duration(secs*float64(time.Second)) {
		if _, err := w.Write(buf); err != nil {
			fmt.Println(err)
			return 1
		}
	}
	w.Close()
	n := <-done
	fmt.Printf("bulk %d %d\n", n, time.Since(start).Nanoseconds())
	return 0
}

// cgroupCPU is the CPU time used in cgroup so far (cpu.stat).
func cgroupCPU(t *testing.T, cgroup string) time.Duration {
	data, err := os.ReadFile(filepath.Join(cgroup, "cpu.stat"))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "usage_usec "); ok {
			us, _ := strconv.ParseInt(v, 10, 64)
			return time.Duration(us) * time.Microsecond
		}
	}
	t.Fatalf("no usage_usec in %s/cpu.stat", cgroup)
	return 0
}

// TestRespliceBulk measures issue 27's goals for the naive re-splice
// with a non-blocking reader: bulk throughput, CPU per GB and the share
// of bytes spliced, with no mesh, bounded splice (resplice off) and
// resplice on, at the default queue limit, rounds interleaved. A
// benchmark, not a timed test: figures only with SMESH_RESPLICE_BENCH=1
// (SMESH_RESPLICE_SECONDS per round, default 2; 3 rounds), otherwise one
// 0.2 s round that checks only that bytes move. SMESH_RESPLICE_LIMIT sets
// the queue limit in bytes (default 2 MiB, smeshd's).
func TestRespliceBulk(t *testing.T) {
	testenv.RequirePrivileged(t)
	if err := Missing(ProbeModes(), "bounded splice"); err != nil {
		testenv.SkipOrFail(t, "this kernel cannot bound spliced queues (Linux %s): %v", KernelRelease(), err)
	}
	// Without SMESH_RESPLICE_BENCH=1 a smoke run: one short round, bytes
	// must move (a skip would fail make kernel-test).
	secs, rounds := "0.2", 1
	if os.Getenv("SMESH_RESPLICE_BENCH") == "1" {
		secs, rounds = "2", 3
		if s := os.Getenv("SMESH_RESPLICE_SECONDS"); s != "" {
			secs = s
		}
	}
	limit := uint32(2 << 20)
	if s := os.Getenv("SMESH_RESPLICE_LIMIT"); s != "" {
		v, err := strconv.ParseUint(s, 10, 32)
		if err != nil {
			t.Fatal(err)
		}
		limit = uint32(v)
	}
	modes := []string{"none", "off", "on"}
	apps := map[string]string{}
	dps := map[string]*Datapath{}
	for _, mode := range modes {
		proxyCg, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
		apps[mode] = app
		if mode == "none" {
			continue
		}
		opts := handoverOpts(ModeSplice, netip.MustParseAddrPort("127.0.0.1:18000"), proxyCg)
		opts.SpliceQueueLimit = limit
		opts.resplice = mode == "on"
		dps[mode] = predecessor(t, opts, app)
	}
	for round := range rounds {
		for _, mode := range modes {
			d := dps[mode]
			c0, s0 := counters(t, d)
			cpu0 := cgroupCPU(t, apps[mode])
			h := testenv.StartHelper(t, apps[mode], "", "bulk-pair", secs)
			line, err := h.ReadLine(60 * time.Second)
			if err != nil {
				t.Fatal(err)
			}
			h.Wait()
			cpu := cgroupCPU(t, apps[mode]) - cpu0
			c1, s1 := counters(t, d)
			var n, ns int64
			if _, err := fmt.Sscanf(line, "bulk %d %d", &n, &ns); err != nil {
				t.Fatalf("%q: %v", line, err)
			}
			if n == 0 {
				t.Errorf("%s: no byte moved", mode)
				continue
			}
			gb := float64(n) / 1e9
			share := 0.0
			if spl, dem := s1.Bytes()-s0.Bytes(), s1.Demoted()-s0.Demoted(); spl+dem > 0 {
				share = float64(spl) / float64(spl+dem)
			}
			t.Logf("round %d %-4s %6.2f Gbit/s  CPU %5.3f s/GB  spliced %3.0f%%  demotions %d",
				round, mode, gb*8/(float64(ns)/1e9), cpu.Seconds()/gb, share*100, c1.Demotions-c0.Demotions)
		}
	}
}
