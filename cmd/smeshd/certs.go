package main

import (
	"fmt"
	"io"
	"path/filepath"
	"strings"

	"github.com/smesh-dev/smesh/pkg/certs"
)

// runCerts is `smeshd certs init --dir DIR --nodes a,b [--trust-domain D]`.
func runCerts(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] != "init" {
		return fmt.Errorf("usage: smeshd certs init --dir DIR --nodes a,b [--trust-domain %s]", certs.DefaultTrustDomain)
	}
	fs := newFlagSet("certs init", stderr)
	dir := fs.String("dir", "", "directory for ca.crt, ca.key and NODE.crt, NODE.key (created if missing)")
	nodes := fs.String("nodes", "", "node names, comma-separated, e.g. a,b")
	domain := fs.String("trust-domain", certs.DefaultTrustDomain, "SPIFFE trust domain of the node identities")
	if err := parseFlags(fs, args[1:]); err != nil {
		return err
	}
	if *dir == "" || *nodes == "" {
		return fmt.Errorf("certs init needs --dir and --nodes (e.g. smeshd certs init --dir /etc/smesh/tls --nodes %s)", "node")
	}
	names := strings.Split(*nodes, ",")
	ca, err := certs.Init(*dir, names, *domain)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "CA (trust domain %s): %s, key %s\n", ca.TrustDomain, filepath.Join(*dir, "ca.crt"), filepath.Join(*dir, "ca.key"))
	for _, n := range names {
		fmt.Fprintf(stdout, "node %s: %s, key %s, identity %s\n", n, filepath.Join(*dir, n+".crt"), filepath.Join(*dir, n+".key"), ca.ID(n))
	}
	fmt.Fprintln(stdout, "development certificates: keep ca.key off the nodes in anything but a demo")
	return nil
}
