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
	"syscall"

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
	fs := flag.NewFlagSet("smeshd "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage) }
	cfgPath := fs.String("c", "", "configuration file (TOML)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q (see smeshd -h)", fs.Arg(0))
	}

	switch cmd {
	case "version":
		fmt.Fprintln(stdout, "smeshd", version)
		return nil
	case "check":
		return check(*cfgPath, stdout)
	case "":
		if *cfgPath == "" {
			return errors.New("no configuration: run smeshd -c /etc/smesh/smesh.toml (see smeshd -h)")
		}
		cfg, err := config.Load(*cfgPath)
		if err != nil {
			return err
		}
		return daemon.Run(ctx, cfg, stderr, nil)
	default:
		return fmt.Errorf("unknown command %q (see smeshd -h)", cmd)
	}
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
	features := datapath.Probe()
	for _, f := range features {
		status := "ok"
		if f.Err != nil {
			status = "MISSING: " + f.Err.Error()
		}
		fmt.Fprintf(out, "kernel: %-45s %s\n", f.Name, status)
	}
	mode, err := daemon.ResolveMode(cfg.Datapath.Mode, features)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "datapath mode: %s\n", mode)
	return nil
}
