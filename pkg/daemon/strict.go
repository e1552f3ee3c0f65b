package daemon

import (
	"fmt"
	"maps"
	"slices"
	"sync"

	"github.com/smesh-dev/smesh/pkg/cgroups"
	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/metrics"
)

// Strict inbound (docs/identity.md 5.3): a [[capture.workloads]] with
// strict = true accepts TCP only through the mesh, but for its
// strict_exempt_ports. The daemon hands the strict workloads that exist to
// datapath.SetStrict after every SetCapture (start, reload, pods changed)
// and whenever a strict workload's cgroup appears, goes or is made again
// (checkCgroups, at most cgroupCheckInterval late).
//
// Fail closed: strict is a security setting. With a strict workload
// configured on a kernel that cannot load bpf/strict, smeshd does not start
// (and a reload that adds one is rejected), nor when the first SetStrict
// fails with one configured. A SetStrict that fails later, or for strict
// pods only (whoever may label a pod must not be able to stop the node's
// mesh), is logged, reported as a problem (/readyz 503, systemd STATUS=,
// /debug/strict) and tried again at the next check.

// strictState is what the daemon put in force with SetStrict.
type strictState struct {
	// mu guards what /debug/strict reads; the daemon's loop writes.
	mu sync.Mutex
	// set: SetStrict was called (the first call takes a predecessor's
	// strict attachments, so it is made at start even with none strict).
	set bool
	// applied are the strict cgroups in force, with the id each had.
	applied map[string]strictCgroup
	// configured are the strict workloads' cgroups, existing or not.
	configured []string
	// err is why the last SetStrict failed, nil if it did not.
	err error
}

// strictCgroup is one strict cgroup in force (/debug/strict).
type strictCgroup struct {
	Cgroup      string   `json:"cgroup"`
	CgroupID    uint64   `json:"cgroupID"`
	ExemptPorts []uint16 `json:"exemptPorts"`
}

// strictPods is a PodSource that also knows strict pods (pkg/kube's
// Watcher): their cgroups with their exempt ports (the probes' ports).
type strictPods interface {
	Strict() map[string][]uint16
}

// startStrict registers strict inbound's /debug/strict and metrics.
func (d *daemon) startStrict() {
	d.admin.HandleJSON("/debug/strict", d.debugStrict)
	d.metrics.Registry().MustRegister(metrics.StrictCollector(d.strictCounts))
}

// strictConfigured are the cgroups of the workloads of c with strict = true.
func (d *daemon) strictConfigured(c config.Capture) ([]config.ResolvedWorkload, error) {
	cfg := d.cfg
	cfg.Capture = c
	workloads, err := cfg.Workloads(d.mount, d.idents.node)
	if err != nil {
		return nil, err
	}
	var out []config.ResolvedWorkload
	for _, w := range workloads {
		if w.Strict {
			out = append(out, w)
		}
	}
	return out, nil
}

// checkStrict refuses capture settings c with a strict workload on a kernel
// without strict inbound: smeshd would leave the workload open. (Strict
// pods come and go while smeshd runs: on such a kernel applyStrict fails,
// which fails the start, or later is reported as a problem, /readyz 503.)
func (d *daemon) checkStrict(c config.Capture) error {
	strict, err := d.strictConfigured(c)
	if err != nil || len(strict) == 0 {
		return err
	}
	return strictRefusal(strict, d.dp.StrictAvailable())
}

// strictRefusal is why strict workloads cannot be put in force where strict
// inbound is unavailable (available: StrictAvailable's error), nil when
// they can or there are none.
func strictRefusal(strict []config.ResolvedWorkload, available error) error {
	if len(strict) == 0 || available == nil {
		return nil
	}
	return fmt.Errorf("capture.workloads: %s is strict = true, but %w; smeshd does not run with a strict workload left open "+
		"(remove strict = true, or run a kernel that loads bpf/strict; see docs/identity.md 5.3)", strict[0].Cgroup, available)
}

// wantedStrict are the strict workloads of c that exist, at or below an
// enrolled cgroup that exists (ids), with their options and ids.
func (d *daemon) wantedStrict(c config.Capture, enrolled []string, ids map[string]uint64) (map[string]strictCgroup, []string, error) {
	strict, err := d.strictConfigured(c)
	if err != nil {
		return nil, nil, err
	}
	want := make(map[string]strictCgroup)
	var configured []string
	for _, w := range strict {
		configured = append(configured, w.Cgroup)
		if !slices.ContainsFunc(enrolled, func(e string) bool { return ids[e] != 0 && cgroups.Within(w.Cgroup, e) }) {
			continue // its enrolled cgroup is missing: nothing captured, nothing accepted there either
		}
		id, err := cgroups.ID(w.Cgroup)
		if err != nil {
			continue // missing (yet): strict once it appears (checkCgroups)
		}
		ports := slices.Clone(w.ExemptPorts)
		slices.Sort(ports)
		want[w.Cgroup] = strictCgroup{Cgroup: w.Cgroup, CgroupID: id, ExemptPorts: ports}
	}
	// Strict pods ([kubernetes] strict_label), each enrolled itself or
	// inside an enrolled [capture] cgroup. A [[capture.workloads]] entry
	// for the same cgroup wins.
	if sp, ok := d.pods.(strictPods); ok {
		pods := sp.Strict()
		for _, cg := range slices.Sorted(maps.Keys(pods)) {
			configured = append(configured, cg)
			if _, dup := want[cg]; dup {
				continue
			}
			if !slices.ContainsFunc(enrolled, func(e string) bool { return ids[e] != 0 && cgroups.Within(cg, e) }) {
				continue
			}
			id, err := cgroups.ID(cg)
			if err != nil {
				continue
			}
			want[cg] = strictCgroup{Cgroup: cg, CgroupID: id, ExemptPorts: slices.Clone(pods[cg])}
		}
	}
	return want, configured, nil
}

// applyStrict puts the strict workloads of c in force (SetStrict) when they
// differ from those in force, or after a failure.
func (d *daemon) applyStrict(c config.Capture) error {
	want, configured, err := d.wantedStrict(c, d.enrolled, d.cgroupIDs)
	if err == nil && d.strict.set && d.strict.err == nil &&
		maps.EqualFunc(want, d.strict.applied, func(a, b strictCgroup) bool {
			return a.CgroupID == b.CgroupID && slices.Equal(a.ExemptPorts, b.ExemptPorts)
		}) {
		d.strict.mu.Lock()
		d.strict.configured = configured
		d.strict.mu.Unlock()
		return nil
	}
	if err == nil {
		opts := make(map[string]datapath.StrictOptions, len(want))
		for p, s := range want {
			opts[p] = datapath.StrictOptions{ExemptPorts: s.ExemptPorts}
		}
		err = d.dp.SetStrict(opts)
	}
	d.strict.mu.Lock()
	defer d.strict.mu.Unlock()
	if err != nil {
		d.strict.err = err
		return err
	}
	for _, cg := range configured {
		if _, ok := want[cg]; !ok {
			d.log.Warn().Str("cgroup", cg).Msg("strict workload's cgroup does not exist (yet): made strict when it appears")
		}
	}
	if !d.strict.set || !maps.EqualFunc(want, d.strict.applied, func(a, b strictCgroup) bool { return a.CgroupID == b.CgroupID }) {
		d.log.Info().Strs("cgroups", slices.Sorted(maps.Keys(want))).Msg("strict inbound in force")
	}
	d.strict.set, d.strict.applied, d.strict.configured, d.strict.err = true, want, configured, nil
	return nil
}

// recheckStrict is checkCgroups' part: a strict workload's cgroup that
// appeared, went or was made again since the last SetStrict.
func (d *daemon) recheckStrict() {
	had := d.strict.err
	if err := d.applyStrict(d.cfg.Capture); err != nil {
		d.log.Error().Err(err).Msg("strict inbound: making the strict workloads strict; trying again in " + cgroupCheckInterval.String())
	}
	if (had == nil) != (d.strict.err == nil) {
		d.reportCgroups()
	}
}

// strictProblem is what /readyz and systemd say of strict inbound, "" when
// all is well.
func (d *daemon) strictProblem() string {
	if d.strict.err == nil {
		return ""
	}
	return fmt.Sprintf("strict inbound not in force: %v", d.strict.err)
}

// debugStrict is /debug/strict.
func (d *daemon) debugStrict() any {
	out := struct {
		Available string         `json:"available"`
		Strict    []strictCgroup `json:"strict"`
		Missing   []string       `json:"missing,omitempty"`
		Error     string         `json:"error,omitempty"`
	}{Available: "yes", Strict: []strictCgroup{}}
	if err := d.dp.StrictAvailable(); err != nil {
		out.Available = err.Error()
	}
	func() {
		d.strict.mu.Lock()
		defer d.strict.mu.Unlock()
		for _, p := range slices.Sorted(maps.Keys(d.strict.applied)) {
			out.Strict = append(out.Strict, d.strict.applied[p])
		}
		for _, cg := range d.strict.configured {
			if _, ok := d.strict.applied[cg]; !ok {
				out.Missing = append(out.Missing, cg)
			}
		}
		if d.strict.err != nil {
			out.Error = d.strict.err.Error()
		}
	}()
	return out
}

// strictCounts reads the strict counters for /metrics; none where strict
// inbound is unavailable.
func (d *daemon) strictCounts() (metrics.StrictCounts, bool, error) {
	if d.dp.StrictAvailable() != nil {
		return metrics.StrictCounts{}, false, nil
	}
	c, err := d.dp.StrictCounters()
	return metrics.StrictCounts{Dropped: c.Dropped, Mesh: c.Mesh, Exempt: c.Exempt, Loopback: c.Loopback}, true, err
}
