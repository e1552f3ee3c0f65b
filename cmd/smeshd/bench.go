package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/smesh-dev/smesh/pkg/bench"
)

func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("bench", stderr)
	duration := fs.Duration("duration", time.Second, "length of each workload run")
	rounds := fs.Int("rounds", 3, "measured rounds (after one discarded warm-up round)")
	modes := fs.String("modes", "direct,copy,splice", "modes to compare, comma-separated")
	tunnel := fs.Bool("tunnel", false, "also measure across two namespace nodes: bare veth and the smesh mTLS tunnel")
	pods := fs.Bool("pods", false, fmt.Sprintf("also measure pod to pod on one node's bridge: no mesh, and spliced with %d more idle pods enrolled", bench.IdlePods))
	svcs := fs.Bool("services", false, "also measure pod to a ClusterIP on one node: kube-proxy's nftables DNAT, and translated by smesh in connect4 and spliced")
	kubeProxy := fs.Bool("kube-proxy", false, "with --pods or --services: kube-proxy's nftables rules for the ClusterIP on the node of every pod mode, as where smesh runs beside kube-proxy (conntrack sees every bridged packet)")
	policyRules := fs.Int("policy-rules", 0, "also measure pod to pod on one node (pods) and across two nodes through the tunnel (tunnel-pods) a second time with this many [[policy]] rules in force, selecting the server and allowing the client (pods-policy, tunnel-pods-policy), and report the ratios with rules / without; every workload then has an identity")
	policyDeny := fs.Bool("policy-deny-client", false, "with --policy-rules: the first rule denies the client instead; only check that its connections are refused in every policy mode, measure nothing")
	conns := fs.Int("conns", 0, "also hold this many concurrent connections per mode and report memory")
	jsonPath := fs.String("json", "", "write the report as JSON to this file")
	svgPath := fs.String("svg", "", "write a chart (SVG) to this file")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	if *policyRules < 0 || (*policyDeny && *policyRules == 0) {
		return fmt.Errorf("--policy-rules must be positive (and given with --policy-deny-client)")
	}
	rep, err := bench.Run(ctx, bench.Options{
		Duration:         *duration,
		Rounds:           *rounds,
		Modes:            benchModes(*modes, *tunnel, *pods, *svcs, *policyRules > 0),
		Conns:            *conns,
		KubeProxy:        *kubeProxy,
		PolicyRules:      *policyRules,
		PolicyDenyClient: *policyDeny,
		Exe:              exe,
		Progress:         stderr,
	}, stdout)
	if rep != nil {
		if *jsonPath != "" {
			if werr := rep.WriteJSONFile(*jsonPath); werr != nil {
				return fmt.Errorf("writing %s: %w", *jsonPath, werr)
			}
		}
		if *svgPath != "" {
			if werr := rep.WriteSVGFile(*svgPath); werr != nil {
				return fmt.Errorf("writing %s: %w", *svgPath, werr)
			}
		}
	}
	return err
}

func benchModes(modes string, tunnel, pods, svcs, policy bool) []string {
	out := strings.Split(modes, ",")
	if tunnel {
		out = append(out, "veth", "tunnel")
	}
	if pods {
		out = append(out, "bridge", "pods")
	}
	if svcs {
		out = append(out, "bridge-svc", "pods-svc")
	}
	if policy {
		out = append(out, "pods", "pods-policy", "tunnel-pods", "tunnel-pods-policy")
	}
	return out
}
