// Command smeshd is smesh's node daemon: it captures the outbound TCP of
// enrolled cgroups and splices same-node hops in the kernel.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	sdnotify "github.com/coreos/go-systemd/v22/daemon"
	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/smesh-dev/smesh/cmd/smeshd/internal/hangup"
	"github.com/smesh-dev/smesh/pkg/bench"
	"github.com/smesh-dev/smesh/pkg/cgroups"
	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/daemon"
	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/kube"
	"github.com/smesh-dev/smesh/pkg/services"
	"github.com/smesh-dev/smesh/pkg/tunnel"
)

// version is set at build time (-ldflags "-X main.version=...").
var version = "dev"

const usage = `smeshd: smesh node daemon

Usage:
  smeshd -c FILE          run the daemon with the configuration in FILE
  smeshd check -c FILE    validate FILE as start would (cgroups, certificates) and probe
                          the kernel; non-zero exit with the reason
  smeshd bench [flags]    measure no mesh vs copy vs splice on this machine (root; see smeshd bench -h)
  smeshd certs init --dir DIR --nodes a,b [--trust-domain smesh.local]
                          write a development CA and node certificates for the tunnel
                          (DIR/ca.crt, DIR/ca.key, DIR/a.crt, DIR/a.key, ...)
  smeshd cleanup [-c FILE] remove the capture that on_failure = "closed" left pinned
                          (capture.pin_dir of FILE, default /etc/smesh/smesh.toml)
  smeshd reload           make the smeshd running under systemd reload its configuration
                          and wait: exits non-zero with the reason if it was rejected
                          (the unit's ExecReload; outside systemd send smeshd SIGHUP)
  smeshd upgrade          make the running smeshd start the binary now at its path (same
                          arguments) and hand everything over to it without a gap; waits
                          and prints the new PID, or exits non-zero with the reason (the
                          running one then goes on serving). Under the systemd unit,
                          systemctl restart is an upgrade without a gap too
  smeshd ready [-c FILE]  exit 0 if the smeshd of this process's own cgroup (its container)
                          answers ready on admin.listen; non-zero with the reason if it is
                          not ready, or another smeshd answers (a hand-over in progress or
                          done: the Kubernetes readiness probe)
  smeshd version          print the version
`

func main() {
	// SIGHUP is a reload, and its default action ends the process, so a
	// reload asked for while the daemon starts would kill it. Caught since
	// package initialisation (hangup), it waits until the daemon is ready
	// (daemon.Options.Reload).
	hup := hangup.Caught()
	if cmd, _ := command(os.Args[1:]); cmd != "" {
		// The other commands keep the default: a hangup ends them.
		hangup.Release()
	}
	if cmd, _ := command(os.Args[1:]); cmd == "" && masterMode() {
		os.Exit(runMaster(os.Args[1:]))
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr, hup)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "smeshd:", err)
		// A successor started by `smeshd upgrade` tells the running one
		// why, which tells the command.
		daemon.ReportStartFailure(err)
		os.Exit(1)
	}
}

// command splits the subcommand ("" for the daemon) from its arguments.
func command(args []string) (string, []string) {
	if len(args) > 0 && args[0] != "" && args[0][0] != '-' {
		return args[0], args[1:]
	}
	return "", args
}

// run runs the command in args. reload delivers SIGHUP to the daemon; nil
// lets daemon.Run catch it itself.
func run(ctx context.Context, args []string, stdout, stderr io.Writer, reload <-chan os.Signal) error {
	cmd, args := command(args)
	switch cmd {
	case "":
		return runDaemon(ctx, args, stderr, reload)
	case "version":
		fmt.Fprintln(stdout, "smeshd", version)
		return nil
	case "check":
		fs := newFlagSet("check", stderr)
		cfgPath := fs.String("c", "", "configuration file (TOML)")
		if err := parseFlags(fs, args); err != nil {
			return err
		}
		return check(*cfgPath, stdout)
	case "cleanup":
		fs := newFlagSet("cleanup", stderr)
		cfgPath := fs.String("c", "/etc/smesh/smesh.toml", "configuration file whose capture.pin_dir to clean")
		if err := parseFlags(fs, args); err != nil {
			return err
		}
		return cleanup(*cfgPath, stdout)
	case "reload":
		fs := newFlagSet("reload", stderr)
		socket := fs.String("socket", "", "control socket of the running smeshd (default: $RUNTIME_DIRECTORY/control, else "+
			daemon.DefaultRuntimeDir+"/"+daemon.ControlSocketName+")")
		timeout := fs.Duration("timeout", 80*time.Second, "how long to wait for the reload")
		if err := parseFlags(fs, args); err != nil {
			return err
		}
		return reloadRunning(*socket, *timeout, stdout)
	case "upgrade":
		fs := newFlagSet("upgrade", stderr)
		socket := fs.String("socket", "", "control socket of the running smeshd (default: $RUNTIME_DIRECTORY/control, else "+
			daemon.DefaultRuntimeDir+"/"+daemon.ControlSocketName+")")
		timeout := fs.Duration("timeout", daemon.UpgradeAnswerTimeout, "how long to wait for the successor to take over")
		if err := parseFlags(fs, args); err != nil {
			return err
		}
		return upgradeRunning(*socket, *timeout, stdout)
	case "ready":
		fs := newFlagSet("ready", stderr)
		cfgPath := fs.String("c", "/etc/smesh/smesh.toml", "configuration file whose admin.listen to ask")
		timeout := fs.Duration("timeout", 3*time.Second, "how long to wait for the answer")
		if err := parseFlags(fs, args); err != nil {
			return err
		}
		cfg, err := config.Load(*cfgPath)
		if err != nil {
			return err
		}
		if err := daemon.Probe(ctx, cfg.Admin.Listen, *timeout); err != nil {
			return err
		}
		fmt.Fprintln(stdout, "ready")
		return nil
	case "bench":
		return runBench(ctx, args, stdout, stderr)
	case "certs":
		return runCerts(args, stdout, stderr)
	case "bench-agent": // internal: the bench's client and server processes
		if code := bench.AgentMain(args); code != 0 {
			return fmt.Errorf("bench-agent exited with %d", code)
		}
		return nil
	default:
		return fmt.Errorf("unknown command %q (see smeshd -h)", cmd)
	}
}

func newFlagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("smeshd "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, usage)
		fmt.Fprintf(stderr, "\nFlags of smeshd %s:\n", name)
		fs.PrintDefaults()
	}
	return fs
}

func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q (see smeshd -h)", fs.Arg(0))
	}
	return nil
}

func runDaemon(ctx context.Context, args []string, stderr io.Writer, reload <-chan os.Signal) error {
	fs := newFlagSet("", stderr)
	cfgPath := fs.String("c", "", "configuration file (TOML)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *cfgPath == "" {
		return errors.New("no configuration: run smeshd -c /etc/smesh/smesh.toml (see smeshd -h)")
	}
	// Now, before it may be replaced: `smeshd upgrade` starts the binary
	// at this path, the new one after a package upgrade.
	exe, err := daemon.ExecutablePath()
	if err != nil {
		return err
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return err
	}
	// READY=1 tells systemd (Type=notify) and smeshd bench that capture
	// is attached; without NOTIFY_SOCKET it does nothing.
	notify := func(state string) { sdnotify.SdNotify(false, state) }
	return daemon.Run(ctx, daemon.Options{Config: cfg, ConfigPath: *cfgPath, Reload: reload, LogOut: stderr, Notify: notify, Version: version,
		Kubernetes: startKube, Executable: exe, Args: args})
}

// kube.Node brings the cluster's policies and pod identities along.
var _ daemon.PolicySource = (*kube.Node)(nil)

// startKube starts the enrolment of this node's pods and the cluster's
// Services ([kubernetes]), with the cluster's policies and pod identities.
func startKube(ctx context.Context, cfg config.Kubernetes, td spiffeid.TrustDomain, cgroupMount string, sink services.Sink, log zerolog.Logger) (daemon.PodSource, error) {
	return kube.Start(ctx, cfg, td, cgroupMount, sink, log)
}

// reloadRunning asks the running smeshd to reload and reports the outcome.
func reloadRunning(socket string, timeout time.Duration, out io.Writer) error {
	if socket == "" {
		socket = daemon.ControlSocket()
	}
	if socket == "" {
		socket = filepath.Join(daemon.DefaultRuntimeDir, daemon.ControlSocketName)
	}
	if err := daemon.Reload(socket, timeout); err != nil {
		return fmt.Errorf("reload: %w", err)
	}
	fmt.Fprintln(out, "smeshd: configuration reloaded")
	return nil
}

// upgradeRunning asks the running smeshd to hand over to a successor it
// starts from the binary now installed, and reports the outcome.
func upgradeRunning(socket string, timeout time.Duration, out io.Writer) error {
	if socket == "" {
		socket = daemon.ControlSocket()
	}
	if socket == "" {
		socket = filepath.Join(daemon.DefaultRuntimeDir, daemon.ControlSocketName)
	}
	pid, err := daemon.Upgrade(socket, timeout)
	if err != nil {
		return fmt.Errorf("upgrade: %w", err)
	}
	fmt.Fprintf(out, "smeshd: upgraded: PID %d serves now (the previous one drains its connections and exits)\n", pid)
	return nil
}

// cleanup removes the capture that on_failure = "closed" left pinned.
func cleanup(cfgPath string, out io.Writer) error {
	cfg, err := config.Load(cfgPath)
	if err != nil {
		return err
	}
	n, err := datapath.RemovePins(cfg.Capture.PinDir)
	if err != nil {
		return fmt.Errorf("cleaning %s: %w", cfg.Capture.PinDir, err)
	}
	fmt.Fprintf(out, "removed %d pinned objects from %s\n", n, cfg.Capture.PinDir)
	return nil
}

// check validates the configuration and probes the kernel, reporting every
// problem it finds. Beyond the file it checks what start checks on this
// host, with the same functions: the enrolled cgroups, the tunnel's
// certificates, what the kernel can do.
func check(cfgPath string, out io.Writer) error {
	if cfgPath == "" {
		return errors.New("check needs -c FILE")
	}
	cfg, err := config.Load(cfgPath)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "config %s: ok\n", cfgPath)
	var errs []error
	if mount, err := cgroups.Mount(); err != nil {
		errs = append(errs, err)
	} else if cgs, err := daemon.ResolveCgroups(cfg, mount); err != nil {
		errs = append(errs, err)
	} else {
		for _, p := range cgs.Paths {
			note := "ok"
			switch {
			case !slices.Contains(cgs.Missing, p):
			case daemon.SystemdOwnsCgroups():
				note = "missing: systemd owns the cgroup tree here, so smeshd does not create it; " +
					"nothing is captured there until it exists (start its slice, or a unit in it)"
			default:
				note = "missing: smeshd creates it at start"
			}
			fmt.Fprintf(out, "cgroup %s: %s\n", p, note)
		}
	}
	switch tls := cfg.Tunnel.TLS; {
	case tls.Mode == "mtls" && tls.Source == "workload_api":
		fmt.Fprintf(out, "tunnel certificate: from the SPIFFE Workload API at %s (not checked here)\n", tls.WorkloadAPISocket)
	case tls.Mode == "mtls":
		if creds, err := tunnel.LoadConfigured(tls, zerolog.Nop()); err != nil {
			errs = append(errs, err)
		} else {
			fmt.Fprintf(out, "tunnel certificate %s: %s, valid until %s\n", tls.Cert, creds.Identity(), creds.NotAfter().Format(time.RFC3339))
		}
	}
	if k := cfg.Kubernetes; k.Enabled {
		node := os.Getenv(k.NodeNameEnv)
		if node == "" {
			errs = append(errs, fmt.Errorf("kubernetes.node_name_env: $%s is empty (the DaemonSet sets it from spec.nodeName)", k.NodeNameEnv))
		} else {
			fmt.Fprintf(out, "kubernetes: pods of node %s labelled %s (or in a namespace labelled so)\n", node, k.Label)
		}
	}
	fmt.Fprintf(out, "kernel: Linux %s\n", datapath.KernelRelease())
	features := datapath.Probe()
	for _, f := range features {
		what := "kernel:"
		if f.Privilege {
			what = "smeshd:"
		}
		if f.Err == nil {
			fmt.Fprintf(out, "%s ok       %s\n", what, f.Name)
			continue
		}
		fmt.Fprintf(out, "%s MISSING  %s (needed for %s)\n", what, f.Name, f.NeededFor)
		for line := range strings.Lines(f.Err.Error()) {
			fmt.Fprintf(out, "                 %s\n", strings.TrimRight(line, "\n"))
		}
	}
	mode, err := daemon.ResolveMode(cfg.Datapath.Mode, features)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	bounded := datapath.Missing(features, "bounded splice") == nil
	switch {
	case mode == datapath.ModeCopy && cfg.Datapath.Mode != "copy":
		fmt.Fprintf(out, "datapath mode: copy (mode = %q: this kernel cannot bound what a spliced hop queues; "+
			"mode = \"splice\" would splice without the bound)\n", cfg.Datapath.Mode)
	case mode == datapath.ModeSplice && !bounded:
		fmt.Fprintf(out, "datapath mode: splice WITHOUT A BOUND: a reader that stalls under a fast writer "+
			"can use up the node's TCP memory (mode = \"auto\" would copy here)\n")
	case mode == datapath.ModeSplice:
		fmt.Fprintf(out, "datapath mode: splice (bounded: a hop queueing more than %s at its reader moves to TCP)\n",
			cfg.Datapath.SpliceQueueLimit)
	default:
		fmt.Fprintf(out, "datapath mode: %s\n", mode)
	}
	return errors.Join(errs...)
}
