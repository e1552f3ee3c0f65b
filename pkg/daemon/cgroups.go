package daemon

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/smesh-dev/smesh/pkg/cgroups"
	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/metrics"
)

// Enrolled cgroups can go away while smeshd runs and come back: systemd
// removes a slice's cgroup when the slice stops (`systemctl stop
// smesh.slice`) and makes a new one, with a new id, when it starts again
// (or when a unit is started in it). The programs attached to the old
// cgroup went with it. smeshd follows each enrolled cgroup by its id:
// removed, it says so (log, smesh_enrolled_cgroups{state="missing"},
// /readyz 503 with the reason, systemd's STATUS=); made again, it attaches
// the capture to the new cgroup.
//
// A cgroup's creation and removal are inotify events of the directory that
// holds it, so that is what is watched; a check every cgroupCheckInterval
// covers parents that do not exist yet and events lost to an overflow.

// cgroupCheckInterval is how often the enrolled cgroups are checked without
// an event.
const cgroupCheckInterval = 5 * time.Second

// systemdRuntimeDir exists when systemd is the init system (sd_booted(3)).
const systemdRuntimeDir = "/run/systemd/system"

// SystemdOwnsCgroups reports whether systemd manages the cgroup tree. It
// then owns every cgroup outside the subtrees it delegates: smeshd must not
// create one (systemd's "single writer" rule; a slice is made by starting
// it), only wait for it to appear.
func SystemdOwnsCgroups() bool {
	_, err := os.Stat(systemdRuntimeDir)
	return err == nil
}

// cgroupWatch wakes the daemon when an enrolled cgroup may have been removed
// or made: events of the directories that hold them, and a periodic check.
type cgroupWatch struct {
	w    *fsnotify.Watcher
	kick chan struct{}
	stop chan struct{}
	done chan struct{}
	// parents are the watched directories and the inode each had when
	// watched: a directory made again needs a new watch.
	parents map[string]uint64
}

func newCgroupWatch() (*cgroupWatch, error) {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, fmt.Errorf("watching enrolled cgroups: %w", err)
	}
	cw := &cgroupWatch{
		w:       w,
		kick:    make(chan struct{}, 1),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
		parents: make(map[string]uint64),
	}
	go cw.run()
	return cw, nil
}

func (cw *cgroupWatch) run() {
	defer close(cw.done)
	tick := time.NewTicker(cgroupCheckInterval)
	defer tick.Stop()
	for {
		select {
		case <-cw.stop:
			return
		case ev, ok := <-cw.w.Events:
			if !ok {
				return
			}
			if !ev.Has(fsnotify.Create) && !ev.Has(fsnotify.Remove) {
				continue // e.g. the parent's own cgroup.events changing
			}
		case <-cw.w.Errors: // lost events: check
		case <-tick.C:
		}
		select {
		case cw.kick <- struct{}{}:
		default: // a check is pending already
		}
	}
}

// watch makes the watcher follow the directories holding cgroups, and
// re-adds the watch of any that was removed and made again. Called from
// the daemon's loop only.
func (cw *cgroupWatch) watch(cgroupPaths []string) {
	want := make(map[string]bool)
	for _, cg := range cgroupPaths {
		want[filepath.Dir(cg)] = true
	}
	for dir := range cw.parents {
		if !want[dir] {
			cw.w.Remove(dir) // fails for a directory that is gone: fine
			delete(cw.parents, dir)
		}
	}
	for dir := range want {
		ino, err := cgroups.ID(dir)
		if err != nil {
			continue // not there (yet): the periodic check covers it
		}
		if old, ok := cw.parents[dir]; ok && old == ino {
			continue
		}
		cw.w.Remove(dir)
		if err := cw.w.Add(dir); err != nil {
			continue
		}
		cw.parents[dir] = ino
	}
}

func (cw *cgroupWatch) close() {
	close(cw.stop)
	cw.w.Close()
	<-cw.done
}

// cgroupIDs returns the id of every enrolled cgroup that exists; missing
// ones are left out.
func cgroupIDs(enrolled []string) map[string]uint64 {
	ids := make(map[string]uint64, len(enrolled))
	for _, cg := range enrolled {
		if id, err := cgroups.ID(cg); err == nil {
			ids[cg] = id
		}
	}
	return ids
}

// attachCapture points the capture at the enrolled cgroups that exist, with
// the rules of c, and reports the missing ones.
//
// It changes all or nothing: on error (SetCapture's is all or nothing too)
// the capture and what the daemon knows of it stay as they were, so a
// reload can fail cleanly.
func (d *daemon) attachCapture(enrolled []string, c config.Capture) error {
	ids := cgroupIDs(enrolled)
	// A strict workload on a kernel without strict inbound: refused
	// before anything changes (fail closed).
	if err := d.checkStrict(c); err != nil {
		return err
	}
	// Identities first: a caller's first connection has its source.
	if err := d.syncIdentities(c); err != nil {
		return fmt.Errorf("workload identities: %w", err)
	}
	if err := d.dp.SetCapture(presentOf(enrolled, ids), c.IncludeCIDRs, c.ExcludeCIDRs, c.ExcludePorts); err != nil {
		return err
	}
	d.enrolled, d.cgroupIDs, d.captureErr = slices.Clone(enrolled), ids, nil
	d.cgw.watch(enrolled)
	// Strict inbound follows the capture. The first SetStrict takes a
	// predecessor's strict attachments: it failing with a strict
	// [[capture.workloads]] fails the start (fail closed); later, or for
	// strict pods only (a pod's label must not stop the node's mesh), it
	// is a problem reported (/readyz 503) and tried again.
	if err := d.applyStrict(c); err != nil {
		if configured, _ := d.strictConfigured(c); !d.strict.set && len(configured) > 0 {
			return fmt.Errorf("strict inbound: %w", err)
		}
		d.log.Error().Err(err).Msg("strict inbound: making the strict workloads strict; trying again in " + cgroupCheckInterval.String())
	}
	for _, cg := range enrolled {
		if _, ok := ids[cg]; !ok {
			d.log.Warn().Str("cgroup", cg).Msg("enrolled cgroup does not exist (yet): nothing is captured there " +
				"until it does (under systemd: start its slice, or a unit in it); smeshd attaches to it when it appears")
		}
	}
	d.reportCgroups()
	return nil
}

// checkCgroups is the daemon's answer to cgroupWatch: enrolled cgroups
// removed or made (again) since the last check get the capture re-attached,
// and the change is logged and counted.
func (d *daemon) checkCgroups() {
	// Strict workloads' cgroups (below the enrolled ones) are checked
	// each time, after the capture.
	defer d.recheckStrict()
	d.cgw.watch(d.enrolled)
	ids := cgroupIDs(d.enrolled)
	changed, appeared := false, false
	for _, cg := range d.enrolled {
		was, now := d.cgroupIDs[cg], ids[cg]
		if was == now {
			continue
		}
		changed, appeared = true, appeared || now != 0
		log := d.log.With().Str("cgroup", cg).Logger()
		if was != 0 {
			d.metrics.EnrolledCgroupEvent(metrics.EnrolledRemoved)
		}
		if now != 0 {
			d.metrics.EnrolledCgroupEvent(metrics.EnrolledCreated)
		}
		switch {
		case now == 0:
			log.Warn().Uint64("cgroup_id", was).Msg("enrolled cgroup removed: nothing is captured there until it is made again")
		case was == 0:
			log.Info().Uint64("cgroup_id", now).Msg("enrolled cgroup appeared: attaching the capture")
		default:
			log.Warn().Uint64("cgroup_id", now).Uint64("was", was).Msg("enrolled cgroup removed and made again: attaching the capture to the new one")
		}
	}
	if !changed && d.captureErr == nil {
		return
	}
	// The namespaces of processes already in a new cgroup get their
	// listeners before connect4 is attached there (enrol's rule); a scan
	// that takes too long only delays that, capture is gated per namespace.
	ctx, cancel := context.WithTimeout(context.Background(), memberScanTimeout)
	d.members.Scan(ctx)
	cancel()
	// A cgroup that changes again meanwhile is attached as it is now, and
	// reported at the next check.
	c := d.cfg.Capture
	if err := d.syncIdentities(c); err != nil {
		d.log.Error().Err(err).Msg("writing the workload identities of the enrolled cgroups")
	}
	d.captureErr = d.dp.SetCapture(presentOf(d.enrolled, ids), c.IncludeCIDRs, c.ExcludeCIDRs, c.ExcludePorts)
	d.cgroupIDs = ids
	if d.captureErr != nil {
		d.log.Error().Err(d.captureErr).Msg("attaching the capture to the enrolled cgroups; trying again at the next change or in " + cgroupCheckInterval.String())
	} else if appeared {
		d.log.Info().Strs("cgroups", presentOf(d.enrolled, ids)).Msg("capture attached")
	}
	d.reportCgroups()
}

func presentOf(enrolled []string, ids map[string]uint64) []string {
	var present []string
	for _, cg := range enrolled {
		if _, ok := ids[cg]; ok {
			present = append(present, cg)
		}
	}
	return present
}

// reportCgroups tells /metrics, /readyz and systemd what the capture
// covers.
func (d *daemon) reportCgroups() {
	var missing []string
	for _, cg := range d.enrolled {
		if _, ok := d.cgroupIDs[cg]; !ok {
			missing = append(missing, cg)
		}
	}
	attached := len(d.enrolled) - len(missing)
	if d.captureErr != nil {
		attached = 0
	}
	d.metrics.EnrolledCgroups(attached, len(missing))
	var problems []string
	if len(missing) > 0 {
		problems = append(problems, fmt.Sprintf("enrolled cgroup missing, nothing captured there: %s", strings.Join(missing, ", ")))
	}
	if d.captureErr != nil {
		problems = append(problems, fmt.Sprintf("capture not attached: %v", d.captureErr))
	}
	if p := d.strictProblem(); p != "" {
		problems = append(problems, p)
	}
	problem := strings.Join(problems, "; ")
	if problem == d.problem {
		return
	}
	d.problem = problem
	d.admin.SetProblem(problem)
	if problem == "" {
		d.opts.Notify("STATUS=capturing in every enrolled cgroup")
	} else {
		d.opts.Notify("STATUS=" + problem)
	}
}
