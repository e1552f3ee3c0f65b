package bench

import (
	"encoding/json"
	"fmt"
	"html"
	"io"
	"math"
	"os"
	"strings"
	"text/tabwriter"
)

// Report is the outcome of a bench run; its JSON form is the contract in
// the design document.
type Report struct {
	Machine  Machine  `json:"machine"`
	Duration string   `json:"duration"`
	Rounds   int      `json:"rounds"`
	Results  []Result `json:"results"`
	Held     []Held   `json:"held,omitempty"`
	// Policy is what N [[policy]] rules cost (smeshd bench --policy-rules).
	Policy *PolicyReport `json:"policy,omitempty"`
}

// Machine says where the numbers come from.
type Machine struct {
	Kernel string `json:"kernel"`
	CPU    string `json:"cpu"`
	Cores  int    `json:"cores"`
	Go     string `json:"go"`
}

// Result is one mode's medians over the measured rounds.
type Result struct {
	Mode             string  `json:"mode"`
	ThroughputGbps   float64 `json:"throughput_gbps"`
	RRP50us          float64 `json:"rr_p50_us"`
	RRP99us          float64 `json:"rr_p99_us"`
	RRP999us         float64 `json:"rr_p999_us"`
	ConnPerSec       float64 `json:"conn_per_s"`
	CPUSeconds       float64 `json:"cpu_seconds"`
	CPUSecondsPerGB  float64 `json:"cpu_seconds_per_gb"`
	SmeshdPeakRSSMiB float64 `json:"smeshd_peak_rss_mib,omitempty"`
	// BulkSplicedShare is the part of the bulk stream's bytes that stayed
	// spliced (the rest went by TCP after the direction was demoted,
	// datapath.splice_queue_limit); -1 where nothing is spliced.
	BulkSplicedShare float64 `json:"bulk_spliced_share"`
	DataVerified     bool    `json:"data_verified"`
}

// Held is what holding many connections at once cost in one mode.
type Held struct {
	Mode               string  `json:"mode"`
	Conns              int     `json:"conns"`
	SmeshdRSSMiB       float64 `json:"smeshd_rss_mib"`
	KernelBytesPerConn float64 `json:"kernel_bytes_per_conn"`
	// Smeshds is each smeshd of the mode (cross-node: the sending node's,
	// then the receiving node's): resident before and while holding the
	// connections, and the difference per connection. SmeshdRSSMiB is the
	// first's.
	Smeshds []HeldSmeshd `json:"smeshds,omitempty"`
	// Skipped says why the mode was not measured.
	Skipped string `json:"skipped,omitempty"`
}

// HeldSmeshd is one smeshd's resident memory around holding connections.
type HeldSmeshd struct {
	Node       string  `json:"node"` // "node", or "sending" / "receiving" across nodes
	IdleRSSMiB float64 `json:"idle_rss_mib"`
	RSSMiB     float64 `json:"rss_mib"`
	KiBPerConn float64 `json:"kib_per_conn"` // (RSSMiB - IdleRSSMiB) / Conns
}

func (r *Report) result(mode string) (Result, bool) {
	for _, x := range r.Results {
		if x.Mode == mode {
			return x, true
		}
	}
	return Result{}, false
}

// ratio formats v/base as "1.23x", or "" without a base.
func ratio(v, base float64) string {
	if base == 0 || math.IsNaN(base) || math.IsNaN(v) {
		return ""
	}
	return fmt.Sprintf(" (%.2fx)", v/base)
}

// roundsPerWorkload says how the table's numbers were measured: "3 rounds
// of 1s per workload, medians". A single round has no median to speak of.
func (r *Report) roundsPerWorkload() string {
	if r.Rounds == 1 {
		return fmt.Sprintf("1 round of %s per workload", r.Duration)
	}
	return fmt.Sprintf("%d rounds of %s per workload, medians", r.Rounds, r.Duration)
}

// roundsMeasured is the chart's shorter form: "medians of 3 rounds".
func (r *Report) roundsMeasured() string {
	if r.Rounds == 1 {
		return "1 round"
	}
	return fmt.Sprintf("medians of %d rounds", r.Rounds)
}

// WriteTable prints the results, each with its ratio to its baseline
// (direct for same-node modes, veth for cross-node ones).
func (r *Report) WriteTable(w io.Writer) {
	fmt.Fprintf(w, "smeshd bench: kernel %s, %s, %d cores; %s\n",
		r.Machine.Kernel, r.Machine.CPU, r.Machine.Cores, r.roundsPerWorkload())
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "mode\tthroughput Gbit/s\trr p50 us\trr p99 us\trr p99.9 us\tconn/s\tCPU s/GB\tbulk spliced\tsmeshd peak RSS MiB\tbytes\t")
	for _, x := range r.Results {
		base, haveBase := r.result(baseline(x.Mode))
		rt := func(v, b float64) string {
			if !haveBase || x.Mode == base.Mode {
				return ""
			}
			return ratio(v, b)
		}
		verified := "verified"
		if !x.DataVerified {
			verified = "MISMATCH"
		}
		rss := "-"
		if x.SmeshdPeakRSSMiB > 0 {
			rss = fmt.Sprintf("%.1f", x.SmeshdPeakRSSMiB)
		}
		share := "-"
		if x.BulkSplicedShare >= 0 {
			share = fmt.Sprintf("%.1f%%", 100*x.BulkSplicedShare)
		}
		fmt.Fprintf(tw, "%s\t%.2f%s\t%.1f%s\t%.1f%s\t%.1f\t%.0f%s\t%.2f%s\t%s\t%s\t%s\t\n", x.Mode,
			x.ThroughputGbps, rt(x.ThroughputGbps, base.ThroughputGbps),
			x.RRP50us, rt(x.RRP50us, base.RRP50us),
			x.RRP99us, rt(x.RRP99us, base.RRP99us),
			x.RRP999us,
			x.ConnPerSec, rt(x.ConnPerSec, base.ConnPerSec),
			x.CPUSecondsPerGB, rt(x.CPUSecondsPerGB, base.CPUSecondsPerGB),
			share, rss, verified)
	}
	tw.Flush()
	if len(r.Held) > 0 {
		fmt.Fprintln(w)
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "mode\tconnections held\tsmeshd\tidle RSS MiB\tRSS MiB\tKiB/conn\tkernel bytes/conn\t")
		for _, h := range r.Held {
			if h.Skipped != "" {
				fmt.Fprintf(tw, "%s\t%d\tskipped: %s\t\t\t\t\t\n", h.Mode, h.Conns, h.Skipped)
				continue
			}
			if h.Mode == baseline(h.Mode) || len(h.Smeshds) == 0 {
				fmt.Fprintf(tw, "%s\t%d\t-\t-\t-\t-\t%.0f\t\n", h.Mode, h.Conns, h.KernelBytesPerConn)
				continue
			}
			for i, s := range h.Smeshds {
				kernel := ""
				if i == 0 {
					kernel = fmt.Sprintf("%.0f", h.KernelBytesPerConn)
				}
				fmt.Fprintf(tw, "%s\t%d\t%s\t%.1f\t%.1f\t%.1f\t%s\t\n", h.Mode, h.Conns, s.Node, s.IdleRSSMiB, s.RSSMiB, s.KiBPerConn, kernel)
			}
		}
		tw.Flush()
	}
	if r.Policy != nil && len(r.Policy.Pairs) > 0 {
		r.writePolicy(w)
	}
}

// policyRatios fills the policy pairs' ratios from the results.
func (r *Report) policyRatios() {
	if r.Policy == nil {
		return
	}
	for i := range r.Policy.Pairs {
		p := &r.Policy.Pairs[i]
		x, ok1 := r.result(p.Mode)
		b, ok2 := r.result(p.Base)
		if !ok1 || !ok2 {
			continue
		}
		div := func(v, base float64) float64 {
			if base == 0 {
				return 0
			}
			return v / base
		}
		p.ThroughputRatio = div(x.ThroughputGbps, b.ThroughputGbps)
		p.RRP50Ratio = div(x.RRP50us, b.RRP50us)
		p.RRP99Ratio = div(x.RRP99us, b.RRP99us)
		p.ConnRatio = div(x.ConnPerSec, b.ConnPerSec)
		if x.ConnPerSec > 0 && b.ConnPerSec > 0 {
			p.ConnAddedUs = 1e6/x.ConnPerSec - 1e6/b.ConnPerSec
		}
	}
}

// writePolicy prints the policy section: each policy mode's ratios to its
// base (policy/none), the probes, and the decision's cost in this process.
func (r *Report) writePolicy(w io.Writer) {
	p := r.Policy
	fmt.Fprintf(w, "\npolicy: %d [[policy]] rules in force, selecting the server, the first allowing the client; ratios with rules / without, same run\n", p.Rules)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "mode\tvs\tthroughput\trr p50\trr p99\tconn/s\tadded per conn us\tintruder probe rules/none\t")
	for _, x := range p.Pairs {
		fmt.Fprintf(tw, "%s\t%s\t%.3fx\t%.3fx\t%.3fx\t%.3fx\t%+.1f\t%s\t\n", x.Mode, x.Base,
			x.ThroughputRatio, x.RRP50Ratio, x.RRP99Ratio, x.ConnRatio, x.ConnAddedUs, probeWord(x.IntruderProbe)+"/"+probeWord(x.BaseIntruderProbe))
	}
	tw.Flush()
	fmt.Fprintf(w, "Set.Decide p50 (in the bench process): %d rules %.0f ns, none %.0f ns\n", p.Rules, p.DecideP50ns, p.DecideNoneP50ns)
}

// writePolicyProbes prints the probes of a --policy-deny-client run.
func (r *Report) writePolicyProbes(w io.Writer) {
	fmt.Fprintf(w, "policy: %d [[policy]] rules in force, the first denying the client: probes only, nothing measured\n", r.Policy.Rules)
	for _, x := range r.Policy.Pairs {
		fmt.Fprintf(w, "%s: client %s\n", x.Mode, x.ClientProbe)
	}
}

// probeWord is a probe's result without the error's detail.
func probeWord(s string) string {
	if s == "" {
		return "-"
	}
	if w, _, ok := strings.Cut(s, ":"); ok {
		return w
	}
	return s
}

// WriteJSONFile writes the report as JSON.
func (r *Report) WriteJSONFile(path string) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(data, '\n'), 0o644)
}

// WriteSVGFile draws throughput and round-trip latency (p50 and p99) per
// mode: two bar charts side by side.
func (r *Report) WriteSVGFile(path string) error {
	var b strings.Builder
	const w, h, panelW, top, barH = 760, 320, 340, 60, 180
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", w, h)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="20" y="22" font-size="15" font-weight="bold">smesh: same-node TCP, no mesh vs copy vs splice</text>`+"\n")
	fmt.Fprintf(&b, `<text x="20" y="40" fill="#555">%s, kernel %s, %d cores; %s</text>`+"\n",
		html.EscapeString(r.Machine.CPU), html.EscapeString(r.Machine.Kernel), r.Machine.Cores, html.EscapeString(r.roundsMeasured()))
	colors := map[string]string{"direct": "#888888", "copy": "#e69f00", "splice": "#0072b2"}

	panel := func(x0 int, title string, series [][2]any, unit string) {
		maxV := 0.0
		for _, s := range series {
			maxV = math.Max(maxV, s[1].(float64))
		}
		if maxV == 0 || math.IsNaN(maxV) {
			maxV = 1
		}
		fmt.Fprintf(&b, `<text x="%d" y="%d" font-weight="bold">%s</text>`+"\n", x0, top, html.EscapeString(title))
		bw := (panelW - 20) / max(len(series), 1)
		for i, s := range series {
			label, v := s[0].(string), s[1].(float64)
			if math.IsNaN(v) {
				v = 0
			}
			bh := int(float64(barH) * v / maxV)
			x := x0 + i*bw
			mode := strings.Fields(label)[0]
			fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="%d" fill="%s"/>`+"\n", x+4, top+15+barH-bh, bw-8, bh, colors[mode])
			fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle">%.1f</text>`+"\n", x+bw/2, top+10+barH-bh, v)
			// "copy p99" is written on two lines: mode, then percentile.
			for j, word := range strings.Fields(label) {
				fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle">%s</text>`+"\n", x+bw/2, top+30+barH+14*j, html.EscapeString(word))
			}
		}
		fmt.Fprintf(&b, `<text x="%d" y="%d" fill="#555">%s</text>`+"\n", x0, top+62+barH, html.EscapeString(unit))
	}
	var tput, lat [][2]any
	for _, x := range r.Results {
		tput = append(tput, [2]any{x.Mode, x.ThroughputGbps})
		lat = append(lat, [2]any{x.Mode + " p50", x.RRP50us}, [2]any{x.Mode + " p99", x.RRP99us})
	}
	panel(20, "Throughput (higher is better)", tput, "Gbit/s, one bulk TCP stream")
	panel(20+panelW+40, "Round trip (lower is better)", lat, "microseconds, 64-byte request/response")
	b.WriteString("</svg>\n")
	return os.WriteFile(path, []byte(b.String()), 0o644)
}
