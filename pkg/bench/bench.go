// Package bench is "smeshd bench": it builds its own environment (network
// namespaces, cgroups, a smeshd per mode, server and client processes),
// measures the same workloads with no mesh, with smesh's copy data path and
// with its kernel splice, in interleaved rounds, and removes everything it
// made, also when interrupted.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/proxy"
)

// Modes the bench knows, in report order: same-node (direct is the
// baseline), cross-node (veth is the baseline), pod to pod on one node
// (bridge is the baseline) and pod to a ClusterIP backed by the other pod
// (bridge-svc, kube-proxy's DNAT, is the baseline).
// A policy mode follows its base: the same world with PolicyRules rules in
// force.
var allModes = []string{"direct", "copy", "splice", "veth", "tunnel", "bridge", "pods", "pods-policy", "bridge-svc", "pods-svc", "tunnel-pods", "tunnel-pods-policy"}

// baseline is the mode a mode's ratios are relative to.
func baseline(mode string) string {
	switch {
	case podsAcross(mode):
		return "tunnel-pods" // no bare baseline of its own
	case crossNode(mode):
		return "veth"
	case serviceMode(mode):
		return "bridge-svc"
	case podMode(mode):
		return "bridge"
	}
	return "direct"
}

// Options of a bench run.
type Options struct {
	Duration time.Duration // per workload, per mode, per round
	Rounds   int           // measured rounds; one warm-up round comes first and is discarded
	Modes    []string
	Conns    int // hold this many connections per mode and report memory; 0: skip
	// KubeProxy puts kube-proxy's rules for the ClusterIP on the node of
	// every pod mode, not only bridge-svc's, as on a cluster where smesh
	// runs beside kube-proxy: conntrack then sees every bridged packet.
	KubeProxy bool
	// PolicyRules > 0 adds the policy modes (pods-policy,
	// tunnel-pods-policy) and their bases (pods, tunnel-pods: pod to pod
	// across two nodes through the tunnel): the same worlds, every workload
	// with an identity, the policy modes with PolicyRules [[policy]]
	// rules selecting the server (PolicyRules), the first allowing the
	// client. The report then also says what the rules cost.
	PolicyRules int
	// PolicyDenyClient makes the first rule deny the client: the run
	// only checks that the client's own connections are refused in every
	// policy mode, and measures nothing.
	PolicyDenyClient bool
	JSON             string // write the report here too
	SVG              string // and a chart here
	// Exe is the smeshd binary whose agents and daemon are measured.
	Exe string
	// Progress hears what the bench is doing: on a terminal one line,
	// rewritten in place; anywhere else (a file, a pipe, a CI log) a plain
	// line whenever a new phase starts. nil: silence.
	Progress io.Writer
}

// Run runs the bench and writes the table to out.
func Run(ctx context.Context, opts Options, out io.Writer) (*Report, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("smeshd bench needs root: it creates network namespaces and cgroups and loads BPF programs (run it with sudo)")
	}
	for _, m := range opts.Modes {
		if !slices.Contains(allModes, m) {
			return nil, fmt.Errorf("unknown mode %q (want some of %s)", m, strings.Join(allModes, ","))
		}
	}
	if opts.Rounds < 1 || opts.Duration <= 0 {
		return nil, errors.New("--rounds must be at least 1 and --duration positive")
	}
	// Holding many connections needs many descriptors in the client, the
	// server and (copy mode) smeshd; they inherit this process's limit.
	fdLimit, err := raiseFileLimit()
	if err != nil {
		return nil, err
	}

	envs := make(map[string]*modeEnv)
	defer func() {
		for _, e := range envs {
			if err := e.close(); err != nil {
				fmt.Fprintln(os.Stderr, "bench cleanup:", err)
			}
		}
	}()
	modes := orderedModes(opts.Modes)
	prog := newProgress(opts.Progress)
	defer prog.done() // also when a step fails: the error starts a clean line
	for _, m := range modes {
		prog.update("setting up namespaces, cgroups and smeshd", m)
		e, err := newModeEnv(ctx, opts.Exe, m, opts)
		if err != nil {
			return nil, err
		}
		envs[m] = e
	}

	rep := &Report{Machine: machineInfo(), Duration: opts.Duration.String(), Rounds: opts.Rounds}
	if opts.PolicyRules > 0 {
		prog.update("checking the rules are in force", "probes")
		if rep.Policy, err = checkPolicy(ctx, opts, envs); err != nil {
			return rep, err
		}
		if opts.PolicyDenyClient {
			prog.done()
			rep.writePolicyProbes(out)
			return rep, nil
		}
	}
	acc := make(map[string]*modeSamples)
	for _, m := range modes {
		acc[m] = &modeSamples{}
	}
	for round := 0; round <= opts.Rounds; round++ {
		for _, w := range []string{"bulk", "rr", "conn"} {
			// Rotate the order each round so no mode always runs first.
			for i := range modes {
				m := modes[(i+round)%len(modes)]
				phase := fmt.Sprintf("round %d/%d", round, opts.Rounds)
				if round == 0 {
					phase = "warm-up round (discarded)"
				}
				prog.update(phase, m+" "+w)
				if err := measure(ctx, envs[m], opts, w, acc[m], round == 0); err != nil {
					return nil, err
				}
			}
		}
	}
	for _, m := range modes {
		r := acc[m].result(m)
		if _, peak, err := envs[m].smeshdMemory(); err == nil && peak > 0 {
			r.SmeshdPeakRSSMiB = float64(peak) / (1 << 20)
		}
		rep.Results = append(rep.Results, r)
	}
	rep.policyRatios()
	if opts.Conns > 0 {
		for _, m := range modes {
			prog.update(fmt.Sprintf("holding %d connections per mode", opts.Conns), m)
			// Every held connection is a descriptor in the client and the
			// server, and two in a smeshd that relays it (copy, tunnel).
			need := uint64(opts.Conns) + 64
			if m == "copy" || m == "tunnel" || podsAcross(m) {
				need = 2*uint64(opts.Conns) + 64
			}
			if need > fdLimit {
				rep.Held = append(rep.Held, Held{Mode: m, Conns: opts.Conns,
					Skipped: fmt.Sprintf("needs %d open files per process, the limit is %d", need, fdLimit)})
				continue
			}
			h, err := holdConns(envs[m], opts.Exe, opts.Conns)
			if err != nil {
				// The other results stand; say why this one is missing.
				h = Held{Mode: m, Conns: opts.Conns, Skipped: strings.Join(strings.Fields(err.Error()), " ")}
			}
			rep.Held = append(rep.Held, h)
		}
	}
	prog.done()
	for _, r := range rep.Results {
		if !r.DataVerified {
			rep.WriteTable(out)
			return rep, fmt.Errorf("mode %s: the bytes received differ from the bytes sent", r.Mode)
		}
	}
	rep.WriteTable(out)
	return rep, nil
}

// raiseFileLimit lifts the open file limit as far as this process may and
// returns it.
func raiseFileLimit() (uint64, error) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return 0, err
	}
	want := unix.Rlimit{Cur: 1 << 20, Max: max(lim.Max, 1<<20)}
	if unix.Setrlimit(unix.RLIMIT_NOFILE, &want) == nil {
		return want.Cur, nil
	}
	// Without CAP_SYS_RESOURCE the hard limit is the ceiling.
	lim.Cur = lim.Max
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("raising the open file limit: %w", err)
	}
	return lim.Cur, nil
}

func orderedModes(want []string) []string {
	var out []string
	for _, m := range allModes {
		if slices.Contains(want, m) {
			out = append(out, m)
		}
	}
	return out
}

// modeSamples collects one mode's measured rounds.
type modeSamples struct {
	gbps, cpuSec, cpuPerGB, connPerSec []float64
	p50, p99, p999                     []float64
	splicedShare                       []float64 // of the bulk stream's bytes, where smeshd splices
	failed                             bool
}

func measure(ctx context.Context, e *modeEnv, opts Options, workload string, acc *modeSamples, warmup bool) error {
	cpu0, err := e.cpuUsage()
	if err != nil {
		return err
	}
	splice0, spliceErr := e.spliceStats()
	s, err := e.run(ctx, opts.Exe, workload, opts.Duration)
	if err != nil {
		return err
	}
	cpu1, err := e.cpuUsage()
	if err != nil {
		return err
	}
	splice1, spliceErr1 := e.spliceStats()
	if !s.Verified {
		acc.failed = true
	}
	if warmup {
		return nil
	}
	switch workload {
	case "bulk":
		acc.gbps = append(acc.gbps, float64(s.Bytes)*8/s.Seconds/1e9)
		cpu := (cpu1 - cpu0).Seconds()
		acc.cpuSec = append(acc.cpuSec, cpu)
		acc.cpuPerGB = append(acc.cpuPerGB, cpu/(float64(s.Bytes)/1e9))
		// How much of the stream stayed spliced; the rest went by TCP
		// once the direction was demoted (splice_queue_limit). Of the
		// stream's bytes, not of spliced+demoted: a demoted socket that
		// sockops released from the sockhash sends by plain TCP, which
		// no program counts.
		spliced, demoted := splice1.Bytes()-splice0.Bytes(), splice1.Demoted()-splice0.Demoted()
		if spliceErr == nil && spliceErr1 == nil && spliced+demoted > 0 && s.Bytes > 0 {
			acc.splicedShare = append(acc.splicedShare, min(1, float64(spliced)/float64(s.Bytes)))
		}
	case "rr":
		var h histogram
		h.merge(s.Histogram)
		acc.p50 = append(acc.p50, h.percentile(0.5))
		acc.p99 = append(acc.p99, h.percentile(0.99))
		acc.p999 = append(acc.p999, h.percentile(0.999))
	case "conn":
		acc.connPerSec = append(acc.connPerSec, float64(s.Count)/s.Seconds)
	}
	return nil
}

func (a *modeSamples) result(mode string) Result {
	// A metric without samples is 0 (JSON has no NaN).
	med := func(v []float64) float64 {
		if m := median(v); !math.IsNaN(m) {
			return m
		}
		return 0
	}
	share := -1.0 // no spliced hop in this mode
	if len(a.splicedShare) > 0 {
		share = med(a.splicedShare)
	}
	return Result{
		Mode:             mode,
		BulkSplicedShare: share,
		ThroughputGbps:   med(a.gbps),
		RRP50us:          med(a.p50),
		RRP99us:          med(a.p99),
		RRP999us:         med(a.p999),
		ConnPerSec:       med(a.connPerSec),
		CPUSeconds:       med(a.cpuSec),
		CPUSecondsPerGB:  med(a.cpuPerGB),
		DataVerified:     !a.failed,
	}
}

// holdConns holds n connections through the mode's data path and measures
// what they cost: the resident memory of every smeshd of the mode (before
// and while holding them) and the kernel's slab memory.
func holdConns(e *modeEnv, exe string, n int) (Held, error) {
	idle, err := e.smeshdsMemory()
	if err != nil {
		return Held{}, err
	}
	slab0, err := slabBytes()
	if err != nil {
		return Held{}, err
	}
	release, err := e.hold(exe, n)
	if err != nil {
		return Held{}, err
	}
	// Held idle connections park (proxy.Parker) once idle for ParkAfter:
	// measure them as they are held from then on.
	time.Sleep(proxy.DefaultParkAfter + time.Second)
	slab1, serr := slabBytes()
	held, merr := e.smeshdsMemory()
	if err := release(); err != nil {
		return Held{}, err
	}
	if err := errors.Join(serr, merr); err != nil {
		return Held{}, err
	}
	h := Held{
		Mode:               e.mode,
		Conns:              n,
		KernelBytesPerConn: math.Max(0, float64(slab1-slab0)/float64(n)),
	}
	for i, m := range held {
		node := HeldSmeshd{
			Node:       smeshdRole(e.mode, i),
			IdleRSSMiB: float64(idle[i].RSS) / (1 << 20),
			RSSMiB:     float64(m.RSS) / (1 << 20),
			KiBPerConn: float64(m.RSS-idle[i].RSS) / 1024 / float64(n),
		}
		h.Smeshds = append(h.Smeshds, node)
	}
	if len(h.Smeshds) > 0 {
		h.SmeshdRSSMiB = h.Smeshds[0].RSSMiB
	}
	return h, nil
}

// smeshdRole names the i-th smeshd of a mode: in the cross-node modes the
// client's node sends and the server's receives.
func smeshdRole(mode string, i int) string {
	if crossNode(mode) {
		return [...]string{"sending", "receiving"}[min(i, 1)]
	}
	return "node"
}

func slabBytes() (int64, error) {
	data, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(data)) {
		if v, ok := strings.CutPrefix(line, "Slab:"); ok {
			var kb int64
			fmt.Sscanf(strings.TrimSpace(v), "%d", &kb)
			return kb << 10, nil
		}
	}
	return 0, errors.New("no Slab line in /proc/meminfo")
}

func machineInfo() Machine {
	var uts unix.Utsname
	unix.Uname(&uts)
	m := Machine{
		Kernel: unix.ByteSliceToString(uts.Release[:]),
		Cores:  runtime.NumCPU(),
		Go:     runtime.Version(),
	}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(data)) {
			if v, ok := strings.CutPrefix(line, "model name"); ok {
				m.CPU = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	return m
}
