package daemon

import (
	"errors"
	"fmt"
	"reflect"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/rs/zerolog"

	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/tunnel"
)

// reloadNotifying is one reload as systemd sees it. RELOADING=1 carries
// the time the reload began (MONOTONIC_USEC, CLOCK_MONOTONIC): with
// Type=notify-reload (systemd 253+), systemd sends the SIGHUP itself and
// waits for a RELOADING=1 stamped after its signal, then for READY=1, so
// `systemctl reload` returns once the reload is done. STATUS= says how it
// went (`systemctl status smeshd`); it returns the reason of a rejection.
func (d *daemon) reloadNotifying() error {
	var now unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &now)
	d.opts.Notify(fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d", now.Nano()/1000))
	err := d.reload()
	status := "configuration reloaded"
	if err != nil {
		status = "configuration rejected, the running one stays in force: " + err.Error()
	}
	if d.problem != "" {
		status += "; " + d.problem
	}
	d.opts.Notify("STATUS=" + strings.ReplaceAll(status, "\n", "; "))
	d.opts.Notify("READY=1")
	return err
}

// reload re-reads the configuration file (SIGHUP). What can change while
// smeshd runs changes: capture rules and cgroups, tunnel allow_ports, the
// peers' identities (trust_domain, allow_identities, peers), log level
// (certificates are re-read by themselves when their files change). Open
// connections are not touched. A file that does not validate, or that
// cannot be applied in full, changes nothing, and its error is returned.
// Settings that need a restart keep their running values, and the log says
// which.
func (d *daemon) reload() error {
	log := d.log.With().Str("component", "reload").Str("file", d.opts.ConfigPath).Logger()
	if d.opts.ConfigPath == "" {
		log.Warn().Msg("SIGHUP ignored: smeshd was not started from a configuration file")
		return errors.New("smeshd was not started from a configuration file: nothing to reload")
	}
	next, err := config.Load(d.opts.ConfigPath)
	if err == nil {
		err = d.apply(next)
	}
	d.metrics.Reload(err == nil)
	if err != nil {
		log.Error().Err(err).Msg("configuration rejected; the running configuration stays in force")
		return err
	}
	log.Info().Msg("configuration reloaded")
	return nil
}

// apply puts next in force, all of it or none of it. First everything that
// can fail is prepared, with nothing in force changed (the cgroups are
// resolved and the missing ones created, the tunnel's policy checked, the
// log level parsed); then the parts are switched one after the other, and
// should one fail, those already switched are switched back.
func (d *daemon) apply(next config.Config) error {
	for _, f := range restartOnly(d.cfg, next) {
		d.log.Warn().Str("key", f).Msg("this setting changes only when smeshd restarts; keeping the running value")
	}
	static, created, err := d.enroll(next)
	if err != nil {
		return err
	}
	policy, err := d.tun.Prepare(next.Tunnel)
	if err != nil {
		removeAll(created)
		return err
	}
	level, err := zerolog.ParseLevel(next.Log.Level)
	if err != nil {
		removeAll(created)
		return fmt.Errorf("log.level: %w", err)
	}

	c := next.Capture
	// With [kubernetes] the cluster's policies are in force, not these.
	prevSet := d.pol.set.Load()
	nextSet := prevSet
	if _, ok := d.pods.(PolicySource); !ok {
		nextSet = setOf(next)
	}
	var prevPolicy *tunnel.Policy
	prevStatic, prevEnrolled := d.static, d.enrolled
	// [capture] cgroups and, with [kubernetes], this node's pods in the mesh.
	d.static = static
	enrolled := d.wanted()
	err = switchover([]change{
		{"tunnel.allow_ports and [tunnel.tls] identities",
			func() error { prevPolicy = d.tun.Apply(policy); return nil },
			func() { d.tun.Apply(prevPolicy) }},
		// The new cgroups' namespaces get their listeners before connect4
		// is attached to them.
		{"the enrolled cgroups' namespaces",
			func() error { d.setMembers(enrolled); return nil },
			func() { d.setMembers(prevEnrolled) }},
		{"[[services]]",
			func() error { return d.svcs.set(next.Services) },
			func() { d.svcs.set(d.cfg.Services) }},
		// New connections follow the new policies from the next compile
		// (runAddrIDs, at once); open ones are left alone, as Istio does.
		{"[[policy]]",
			func() error { prevSet = d.pol.set.Swap(nextSet); d.pokeAddrIDs(); return nil },
			func() { d.pol.set.Store(prevSet); d.pokeAddrIDs() }},
		// Last, for it is the one that can fail the most; it changes all
		// or nothing itself.
		{"[capture]",
			func() error { return d.attachCapture(enrolled, c) },
			nil},
	})
	if err != nil {
		d.static = prevStatic
		removeAll(created)
		return err
	}
	zerolog.SetGlobalLevel(level)
	d.keepCreated(created)

	// Keep the running values of what needs a restart, so the next reload
	// compares against what is in force.
	kept := d.cfg
	kept.Capture.Cgroups, kept.Capture.IncludeCIDRs = c.Cgroups, c.IncludeCIDRs
	kept.Capture.ExcludeCIDRs, kept.Capture.ExcludePorts = c.ExcludeCIDRs, c.ExcludePorts
	kept.Capture.Workloads = c.Workloads
	kept.Tunnel.AllowPorts = next.Tunnel.AllowPorts
	kept.Tunnel.TLS.TrustDomain, kept.Tunnel.TLS.AllowIdentities, kept.Tunnel.TLS.Peers =
		next.Tunnel.TLS.TrustDomain, next.Tunnel.TLS.AllowIdentities, next.Tunnel.TLS.Peers
	kept.Log.Level = next.Log.Level
	kept.Services = next.Services
	kept.Policies = next.Policies
	d.cfg = kept
	return nil
}

// change is one part of a reload's switch: do puts it in force, undo (nil:
// nothing to undo) puts back what was in force before do.
type change struct {
	what string
	do   func() error
	undo func()
}

// switchover does the changes in order. When one fails, it undoes those
// already done, last first, and returns the error: all or nothing.
func switchover(changes []change) error {
	for i, c := range changes {
		if err := c.do(); err != nil {
			for j := i - 1; j >= 0; j-- {
				if changes[j].undo != nil {
					changes[j].undo()
				}
			}
			return fmt.Errorf("applying %s: %w (what was switched before it is switched back)", c.what, err)
		}
	}
	return nil
}

// restartOnly names the settings that differ between cur and next but
// cannot change while smeshd runs.
func restartOnly(cur, next config.Config) []string {
	var keys []string
	for _, f := range []struct {
		key      string
		cur, new any
	}{
		{"capture.on_failure", cur.Capture.OnFailure, next.Capture.OnFailure},
		{"capture.pin_dir", cur.Capture.PinDir, next.Capture.PinDir},
		{"datapath", cur.Datapath, next.Datapath},
		{"outbound", cur.Outbound, next.Outbound},
		{"tunnel.listen", cur.Tunnel.Listen, next.Tunnel.Listen},
		{"tunnel.peer_port", cur.Tunnel.PeerPort, next.Tunnel.PeerPort},
		{"tunnel.max_connections", cur.Tunnel.MaxConnections, next.Tunnel.MaxConnections},
		{"tunnel.handshake_timeout", cur.Tunnel.HandshakeTimeout, next.Tunnel.HandshakeTimeout},
		{"tunnel.max_handshakes", cur.Tunnel.MaxHandshakes, next.Tunnel.MaxHandshakes},
		{"tunnel.max_handshakes_per_source", cur.Tunnel.MaxHandshakesPerSource, next.Tunnel.MaxHandshakesPerSource},
		{"tunnel.idle_timeout", cur.Tunnel.IdleTimeout, next.Tunnel.IdleTimeout},
		{"tunnel.tls.mode", cur.Tunnel.TLS.Mode, next.Tunnel.TLS.Mode},
		{"tunnel.tls.source", cur.Tunnel.TLS.Source, next.Tunnel.TLS.Source},
		{"tunnel.tls.workload_api_socket", cur.Tunnel.TLS.WorkloadAPISocket, next.Tunnel.TLS.WorkloadAPISocket},
		{"tunnel.tls.cert", cur.Tunnel.TLS.Cert, next.Tunnel.TLS.Cert},
		{"tunnel.tls.key", cur.Tunnel.TLS.Key, next.Tunnel.TLS.Key},
		{"tunnel.tls.ca", cur.Tunnel.TLS.CA, next.Tunnel.TLS.CA},
		{"admin", cur.Admin, next.Admin},
		{"log.format", cur.Log.Format, next.Log.Format},
		{"daemon", cur.Daemon, next.Daemon},
		{"kubernetes", cur.Kubernetes, next.Kubernetes},
	} {
		if !reflect.DeepEqual(f.cur, f.new) {
			keys = append(keys, f.key)
		}
	}
	return keys
}
