package datapath

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// respliceLimit is the queue limit of the stress test: small, so that a
// cycle (splice, demotion, catching up, splice again) takes little time.
const respliceLimit = 128 << 10

// respliceScenarios are respliceStress's scenarios; safe says which ones
// docs/resplice.md calls safe with the naive re-splice.
var respliceScenarios = []struct {
	name string
	safe bool
}{
	{"nonblock", true},
	{"plain", true},
	{"waitall", false},
	{"lowat", false},
	{"tworeaders", false},
	{"twowriters", false},
	{"duplex", false},
	{"duplex-waitall", false},
}

// stressResult is one "result" line of respliceStress.
type stressResult struct {
	dir                                    string
	written, read, breaks, firstBreak      int64
	stalls, maxBlockMs, elapsedMs, startNs int64
	stuck                                  bool
	eagain                                 int64
}

func parseStressResult(line string) (stressResult, error) {
	var r stressResult
	_, err := fmt.Sscanf(line, "result %s written=%d read=%d breaks=%d first_break=%d stalls=%d max_block_ms=%d stuck=%t elapsed_ms=%d start=%d eagain=%d",
		&r.dir, &r.written, &r.read, &r.breaks, &r.firstBreak, &r.stalls, &r.maxBlockMs, &r.stuck, &r.elapsedMs, &r.startNs, &r.eagain)
	return r, err
}

// TestRespliceStress is issue 27's stress test: demote/promote cycles
// under every kind of reader, every byte checked, a 1 s watchdog on reads
// blocked while bytes are owed (resplice_stress_test.go). Without
// resplice (what smeshd loads) every scenario must be clean. With the
// naive re-splice (skmsg.c, resplice) the results are evidence for
// docs/resplice.md: logged, and failures only for the scenarios it calls
// safe. SMESH_RESPLICE_SECONDS sets each scenario's duration (default 1);
// SMESH_RESPLICE the modes (default none,off; none,off,on for all),
// SMESH_RESPLICE_SCENARIO=a,b only those scenarios.
func TestRespliceStress(t *testing.T) {
	testenv.RequirePrivileged(t)
	if err := Missing(ProbeModes(), "bounded splice"); err != nil {
		// The words make-kernel-test reads as "not applicable".
		testenv.SkipOrFail(t, "this kernel cannot bound spliced queues (Linux %s): %v", KernelRelease(), err)
	}
	secs := 1
	if s := os.Getenv("SMESH_RESPLICE_SECONDS"); s != "" {
		var err error
		if secs, err = strconv.Atoi(s); err != nil {
			t.Fatal(err)
		}
	}
	only := os.Getenv("SMESH_RESPLICE_SCENARIO")
	// none: no mesh at all (the cgroup is not enrolled), the baseline.
	// on (evidence, not a check of what ships) only when asked for.
	modes := "none,off"
	if m := os.Getenv("SMESH_RESPLICE"); m != "" {
		modes = m
	}
	for _, mode := range []string{"none", "off", "on"} {
		if !slices.Contains(strings.Split(modes, ","), mode) {
			continue
		}
		t.Run("resplice="+mode, func(t *testing.T) {
			proxyCg, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
			var d *Datapath
			if mode != "none" {
				opts := handoverOpts(ModeSplice, netip.MustParseAddrPort("127.0.0.1:18000"), proxyCg)
				opts.SpliceQueueLimit = respliceLimit
				opts.resplice = mode == "on"
				d = predecessor(t, opts, app)
			}
			for _, sc := range respliceScenarios {
				if only != "" && !slices.Contains(strings.Split(only, ","), sc.name) {
					continue
				}
				t.Run(sc.name, func(t *testing.T) {
					runStress(t, d, app, sc.name, secs, mode != "on" || sc.safe)
				})
			}
		})
	}
}

// demotionSample is the demotion counter at a moment.
type demotionSample struct {
	at        int64
	demotions uint64
}

// counters reads d's counters and stats; zero without a data path.
func counters(t *testing.T, d *Datapath) (Counters, Stats) {
	if d == nil {
		return Counters{}, Stats{}
	}
	c, err := d.Counters()
	if err != nil {
		t.Fatal(err)
	}
	s, err := d.Stats()
	if err != nil {
		t.Fatal(err)
	}
	return c, s
}

func runStress(t *testing.T, d *Datapath, app, scenario string, secs int, mustBeClean bool) {
	before, statsBefore := counters(t, d)
	samples := []demotionSample{{time.Now().UnixNano(), before.Demotions}}
	h := testenv.StartHelper(t, app, "", "resplice-stress", scenario, strconv.Itoa(secs), strconv.Itoa(respliceLimit))
	var results []stressResult
	var stalls []string
	deadline := time.Now().Add(time.Duration(secs)*time.Second + 30*time.Second)
	for {
		line, err := h.ReadLine(100 * time.Millisecond)
		if errors.Is(err, io.EOF) {
			t.Fatalf("helper ended before done: %s", h.Stderr())
		}
		c, _ := counters(t, d)
		samples = append(samples, demotionSample{time.Now().UnixNano(), c.Demotions})
		if err != nil {
			if time.Now().After(deadline) {
				t.Fatalf("no result after %v", time.Until(deadline))
			}
			continue
		}
		switch {
		case strings.HasPrefix(line, "result "):
			r, err := parseStressResult(line)
			if err != nil {
				t.Fatalf("%q: %v", line, err)
			}
			results = append(results, r)
		case strings.HasPrefix(line, "stall "):
			stalls = append(stalls, line)
		case strings.HasPrefix(line, "seed "):
			t.Log(line)
		case line == "done":
		default:
			t.Errorf("helper: %s", line)
		}
		if line == "done" {
			break
		}
	}
	after, statsAfter := counters(t, d)
	// cyclesAt is how many demotions (each after the first: a promotion
	// and its demotion, one cycle) had happened by unix time ns.
	cyclesAt := func(ns int64) uint64 {
		var n uint64
		for _, s := range samples {
			if s.at <= ns {
				n = s.demotions - before.Demotions
			}
		}
		return n
	}
	demotions := after.Demotions - before.Demotions
	spliced := statsAfter.Bytes() - statsBefore.Bytes()
	demoted := statsAfter.Demoted() - statsBefore.Demoted()
	for _, line := range stalls {
		var dir string
		var reader int
		var at int64
		fmt.Sscanf(line, "stall %s reader %d at %d", &dir, &reader, &at)
		t.Logf("%s (after %d demotions)", line, cyclesAt(at-int64(time.Second)))
	}
	for _, r := range results {
		msg := fmt.Sprintf("%s: %d demotions (both directions) in %d ms, %d sockets released; %d MiB written, %d read; spliced %d MiB, by TCP %d MiB; %d breaks, %d stalls, longest blocked read %d ms, stuck %v; %d blocking reads returned EAGAIN",
			r.dir, demotions, r.elapsedMs, after.Released-before.Released, r.written>>20, r.read>>20, spliced>>20, demoted>>20, r.breaks, r.stalls, r.maxBlockMs, r.stuck, r.eagain)
		if r.breaks > 0 {
			msg += fmt.Sprintf("; first break after %d demotions", cyclesAt(r.firstBreak))
		}
		bad := r.breaks > 0 || r.stalls > 0 || r.stuck || r.read != r.written
		switch {
		case bad && mustBeClean:
			t.Errorf("%s", msg)
		case bad:
			t.Logf("UNSAFE (expected by docs/resplice.md): %s", msg)
		default:
			t.Logf("clean: %s", msg)
		}
	}
	if len(results) == 0 {
		t.Errorf("no result")
	}
}
