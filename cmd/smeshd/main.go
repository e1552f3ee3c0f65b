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
	"strings"
	"syscall"

	sdnotify "github.com/coreos/go-systemd/v22/daemon"

	"github.com/smesh-dev/smesh/pkg/bench"
	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/daemon"
	"github.com/smesh-dev/smesh/pkg/datapath"
)

// version is set at build time (-ldflags "-X main.version=...").
var version = "dev"

const usage = `smeshd: smesh node daemon

Usage:
  smeshd -c FILE          run the daemon with the configuration in FILE
  smeshd check -c FILE    validate FILE and probe the kernel; non-zero exit with the reason
  smeshd bench [flags]    measure no mesh vs copy vs splice on this machine (root; see smeshd bench -h)
  smeshd certs init --dir DIR --nodes a,b [--trust-domain smesh.local]
                          write a development CA and node certificates for the tunnel
                          (DIR/ca.crt, DIR/ca.key, DIR/a.crt, DIR/a.key, ...)
  smeshd cleanup [-c FILE] remove the capture that on_failure = "closed" left pinned
                          (capture.pin_dir of FILE, default /etc/smesh/smesh.toml)
  smeshd version          print the version
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "smeshd:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cmd := ""
	if len(args) > 0 && args[0] != "" && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "":
		return runDaemon(ctx, args, stderr)
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

func runDaemon(ctx context.Context, args []string, stderr io.Writer) error {
	fs := newFlagSet("", stderr)
	cfgPath := fs.String("c", "", "configuration file (TOML)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *cfgPath == "" {
		return errors.New("no configuration: run smeshd -c /etc/smesh/smesh.toml (see smeshd -h)")
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return err
	}
	// READY=1 tells systemd (Type=notify) and smeshd bench that capture
	// is attached; without NOTIFY_SOCKET it does nothing.
	notify := func(state string) { sdnotify.SdNotify(false, state) }
	return daemon.Run(ctx, daemon.Options{Config: cfg, ConfigPath: *cfgPath, LogOut: stderr, Notify: notify, Version: version})
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
// problem it finds.
func check(cfgPath string, out io.Writer) error {
	if cfgPath == "" {
		return errors.New("check needs -c FILE")
	}
	cfg, err := config.Load(cfgPath)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "config %s: ok\n", cfgPath)
	fmt.Fprintf(out, "kernel: Linux %s\n", datapath.KernelRelease())
	features := datapath.Probe()
	for _, f := range features {
		if f.Err == nil {
			fmt.Fprintf(out, "kernel: ok       %s\n", f.Name)
			continue
		}
		fmt.Fprintf(out, "kernel: MISSING  %s (needed for %s)\n", f.Name, f.NeededFor)
		for line := range strings.Lines(f.Err.Error()) {
			fmt.Fprintf(out, "                 %s", strings.TrimRight(line, "\n")+"\n")
		}
	}
	mode, err := daemon.ResolveMode(cfg.Datapath.Mode, features)
	if err != nil {
		return err
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
	return nil
}
