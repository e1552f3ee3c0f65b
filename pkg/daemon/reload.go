package daemon

import (
	"reflect"

	"github.com/smesh-dev/smesh/pkg/config"
)

// reload re-reads the configuration file (SIGHUP). What can change while
// smeshd runs changes: capture rules and cgroups, tunnel allow lists, log
// level (certificates are re-read by themselves when their files change).
// Open connections are not touched. A file that does not validate changes
// nothing. Settings that need a restart keep their running values, and the
// log says which.
func (d *daemon) reload() {
	log := d.log.With().Str("component", "reload").Str("file", d.opts.ConfigPath).Logger()
	if d.opts.ConfigPath == "" {
		log.Warn().Msg("SIGHUP ignored: smeshd was not started from a configuration file")
		return
	}
	next, err := config.Load(d.opts.ConfigPath)
	if err == nil {
		err = d.apply(next)
	}
	d.metrics.Reload(err == nil)
	if err != nil {
		log.Error().Err(err).Msg("configuration rejected; the running configuration stays in force")
		return
	}
	log.Info().Msg("configuration reloaded")
}

func (d *daemon) apply(next config.Config) error {
	for _, f := range restartOnly(d.cfg, next) {
		d.log.Warn().Str("key", f).Msg("this setting changes only when smeshd restarts; keeping the running value")
	}
	static, err := d.enroll(next)
	if err != nil {
		return err
	}
	if err := d.tun.Reconfigure(next.Tunnel); err != nil {
		return err
	}
	d.static = static
	c := next.Capture
	if err := d.applyEnrolment(c); err != nil {
		return err
	}
	if err := setLogLevel(next.Log.Level); err != nil {
		return err
	}
	// Keep the running values of what needs a restart, so the next reload
	// compares against what is in force.
	kept := d.cfg
	kept.Capture.Cgroups, kept.Capture.IncludeCIDRs = c.Cgroups, c.IncludeCIDRs
	kept.Capture.ExcludeCIDRs, kept.Capture.ExcludePorts = c.ExcludeCIDRs, c.ExcludePorts
	kept.Tunnel.AllowPorts, kept.Tunnel.TLS.AllowIdentities = next.Tunnel.AllowPorts, next.Tunnel.TLS.AllowIdentities
	kept.Log.Level = next.Log.Level
	d.cfg = kept
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
