// Package daemon wires smeshd's parts together: configuration, logging, the
// kernel data path and the listeners, for as long as the daemon runs.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"github.com/vishvananda/netlink"

	"github.com/smesh-dev/smesh/pkg/cgroups"
	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/proxy"
	"github.com/smesh-dev/smesh/pkg/tunnel"
)

// NewLogger builds the logger [log] asks for.
func NewLogger(c config.Log, w io.Writer) (zerolog.Logger, error) {
	level, err := zerolog.ParseLevel(c.Level)
	if err != nil {
		return zerolog.Logger{}, fmt.Errorf("log.level: %w", err)
	}
	if c.Format == "console" {
		w = zerolog.ConsoleWriter{Out: w, TimeFormat: time.RFC3339}
	}
	return zerolog.New(w).Level(level).With().Timestamp().Logger(), nil
}

// ResolveMode turns [datapath] mode into the mode this kernel can run.
// "auto" falls back to copy when splicing is unavailable; an explicit
// "splice" on such a kernel is an error naming what is missing.
func ResolveMode(mode string, features []datapath.Feature) (datapath.Mode, error) {
	if err := datapath.Missing(features, "capture"); err != nil {
		return "", fmt.Errorf("this kernel cannot run smesh's capture: %w", err)
	}
	spliceErr := datapath.Missing(features, "splice")
	switch mode {
	case "copy":
		return datapath.ModeCopy, nil
	case "splice":
		if spliceErr != nil {
			return "", fmt.Errorf("datapath.mode = \"splice\" but this kernel cannot splice (use \"auto\" or \"copy\"): %w", spliceErr)
		}
		return datapath.ModeSplice, nil
	case "auto", "":
		if spliceErr != nil {
			return datapath.ModeCopy, nil
		}
		return datapath.ModeSplice, nil
	}
	return "", fmt.Errorf("datapath.mode %q: want auto, splice or copy", mode)
}

// Run runs smeshd until ctx is done. ready, if not nil, is called once the
// data path is attached and the listeners are up.
func Run(ctx context.Context, cfg config.Config, logOut io.Writer, ready func()) error {
	log, err := NewLogger(cfg.Log, logOut)
	if err != nil {
		return err
	}
	features := datapath.Probe()
	mode, err := ResolveMode(cfg.Datapath.Mode, features)
	if err != nil {
		return err
	}
	if mode == datapath.ModeCopy && cfg.Datapath.Mode == "auto" {
		log.Warn().AnErr("missing", datapath.Missing(features, "splice")).
			Msg("this kernel cannot splice; using the copy data path")
	}

	// The tunnel first: in mtls mode missing certificates stop smeshd
	// before anything is created or attached.
	tun, err := tunnel.New(cfg.Tunnel, []uint16{cfg.Outbound.Listen.Port(), cfg.Admin.Listen.Port()}, log)
	if err != nil {
		return err
	}
	defer tun.Close()

	mount, err := cgroups.Mount()
	if err != nil {
		return err
	}
	enrolled, err := cfg.CgroupPaths(mount)
	if err != nil {
		return err
	}
	for _, cg := range enrolled {
		if _, err := os.Stat(cg); errors.Is(err, os.ErrNotExist) {
			if err := os.Mkdir(cg, 0o755); err != nil {
				return fmt.Errorf("creating enrolled cgroup %s: %w", cg, err)
			}
			log.Info().Str("cgroup", cg).Msg("created enrolled cgroup")
			// Removed again on exit if nothing runs in it any more
			// (rmdir fails on a populated cgroup).
			defer os.Remove(cg)
		}
	}
	own, restore, err := ownCgroup(mount, enrolled, log)
	if err != nil {
		return err
	}
	defer restore()

	out, err := proxy.Listen(cfg.Outbound.Listen, tun.Dialer(), log)
	if err != nil {
		return err
	}
	defer out.Close()
	go out.Serve(ctx)

	// on_failure = "closed" pins the capture so that it outlives smeshd.
	// "open" must leave nothing behind, including pins of an earlier
	// "closed" run, which would refuse connections once smeshd stops.
	pinDir := ""
	if cfg.Capture.OnFailure == "closed" {
		pinDir = cfg.Capture.PinDir
	} else if n, err := datapath.RemovePins(cfg.Capture.PinDir); err != nil {
		log.Warn().Err(err).Str("pin_dir", cfg.Capture.PinDir).Msg("cannot remove the pinned capture of an earlier on_failure = \"closed\" run")
	} else if n > 0 {
		log.Warn().Str("pin_dir", cfg.Capture.PinDir).Msg("removed the pinned capture of an earlier on_failure = \"closed\" run")
	}
	dp, err := datapath.New(datapath.Options{
		Mode:         mode,
		ProxyAddr:    cfg.Outbound.Listen,
		ProxyCgroup:  own,
		Cgroups:      enrolled,
		IncludeCIDRs: cfg.Capture.IncludeCIDRs,
		ExcludeCIDRs: cfg.Capture.ExcludeCIDRs,
		ExcludePorts: cfg.Capture.ExcludePorts,
		MapSize:      cfg.Datapath.MapSize,
		PinDir:       pinDir,
		Logger:       log,
	})
	if err != nil {
		return err
	}
	defer dp.Close()
	if err := watchLocalAddrs(ctx, dp, tun.Local, log); err != nil {
		return err
	}
	go tun.Server.Serve(ctx)

	log.Info().Str("mode", string(mode)).Str("outbound", out.Addr().String()).
		Str("tunnel", tun.Server.Addr().String()).Bool("mtls", tun.Credentials != nil).Msg("smeshd ready")
	if ready != nil {
		ready()
	}
	<-ctx.Done()
	ts := tun.Stats
	ev := log.Info().Uint64("tunnel_out", ts.Out.Connections.Load()).Uint64("tunnel_in", ts.In.Connections.Load()).
		Uint64("tunnel_in_bytes_rx", ts.In.BytesRx.Load()).Uint64("tunnel_in_bytes_tx", ts.In.BytesTx.Load()).
		Any("tunnel_errors", ts.ErrorCounts())
	if st, err := dp.Stats(); err == nil {
		ev = ev.Uint64("spliced_bytes", st.ClientToServer.Bytes+st.ServerToClient.Bytes)
	}
	ev.Msg("stopping: detaching capture, closing relayed connections")
	return nil
}

// ownCgroup makes sure smeshd sits in a cgroup of its own: sock_ops must see
// its sockets (they are hop ends) and connect4 must tell them apart, both by
// cgroup. Under systemd the unit's cgroup is already its own. Otherwise (run
// from a shell, or in the cgroup v2 root, where nothing may be attached)
// smeshd moves into a new "smeshd-PID" cgroup and moves back on exit.
func ownCgroup(mount string, enrolled []string, log zerolog.Logger) (string, func(), error) {
	cur, err := cgroups.Of(mount, 0)
	if err != nil {
		return "", nil, err
	}
	for _, e := range enrolled {
		if cgroups.Within(cur, e) {
			return "", nil, fmt.Errorf("smeshd runs in cgroup %s, inside the enrolled cgroup %s: it would capture itself; run it outside the mesh", cur, e)
		}
	}
	procs, err := cgroups.Procs(cur)
	if err != nil {
		return "", nil, err
	}
	if cur != mount && len(procs) == 1 && procs[0] == os.Getpid() {
		return cur, func() {}, nil
	}
	dir := filepath.Join(mount, fmt.Sprintf("smeshd-%d", os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", nil, fmt.Errorf("creating a cgroup of smeshd's own: %w", err)
	}
	if err := cgroups.Join(dir, 0); err != nil {
		os.Remove(dir)
		return "", nil, err
	}
	log.Info().Str("cgroup", dir).Str("was", cur).Msg("moved smeshd into a cgroup of its own")
	return dir, func() {
		if err := cgroups.Join(cur, 0); err == nil {
			os.Remove(dir)
		}
	}, nil
}

// watchLocalAddrs keeps the data path's set of this node's addresses
// current, so same-node traffic is recognised as addresses come and go.
func watchLocalAddrs(ctx context.Context, dp *datapath.Datapath, tunLocal *tunnel.LocalAddrs, log zerolog.Logger) error {
	update := func() error {
		addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
		if err != nil {
			return fmt.Errorf("listing local addresses: %w", err)
		}
		var ips []netip.Addr
		var names []string
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok {
				ips = append(ips, ip)
				names = append(names, ip.String())
			}
		}
		log.Debug().Str("addrs", strings.Join(names, ",")).Msg("local addresses")
		tunLocal.Set(ips)
		return dp.SetLocalAddrs(ips)
	}
	if err := update(); err != nil {
		return err
	}
	updates := make(chan netlink.AddrUpdate, 16)
	done := make(chan struct{})
	if err := netlink.AddrSubscribe(updates, done); err != nil {
		return fmt.Errorf("watching local addresses: %w", err)
	}
	go func() {
		<-ctx.Done()
		close(done)
	}()
	go func() {
		for range updates {
			if err := update(); err != nil {
				log.Error().Err(err).Msg("updating local addresses")
			}
		}
	}()
	return nil
}
