package main

import (
	"bytes"
	"context"
	"fmt"
	"strings"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// What the demo shows of the tunnel's links (pkg/tunnel, protocol v2): a
// link is one TLS connection from a node's smeshd to a peer listener; a
// tunnelled connection takes an idle one from the client's pool, or makes a
// new one (a TLS handshake, resumed when the client holds a session ticket
// from that listener), and gives it back when it ends cleanly.

// handshakes are a smeshd's successful TLS handshakes as the client of
// tunnel links, from smesh_tls_handshakes_total{role="client",result="ok"}
// on its admin endpoint.
type handshakes struct {
	full, resumed uint64
}

func (h handshakes) sub(o handshakes) handshakes {
	return handshakes{h.full - o.full, h.resumed - o.resumed}
}

// String is how the demo prints a change of the counters.
func (h handshakes) String() string {
	var parts []string
	if h.full > 0 {
		parts = append(parts, fmt.Sprintf("%d full", h.full))
	}
	if h.resumed > 0 {
		parts = append(parts, fmt.Sprintf("%d resumed", h.resumed))
	}
	switch {
	case len(parts) == 0:
		return "no new TLS handshake"
	case h.full+h.resumed == 1:
		return parts[0] + " TLS handshake"
	}
	return strings.Join(parts, " and ") + " TLS handshakes"
}

// handshakes GETs /metrics from smeshd's admin endpoint and returns its
// client handshake counters.
func (s *smeshd) handshakes(ctx context.Context) (handshakes, error) {
	url := "http://" + adminAddr + "/metrics"
	code, body, err := request(ctx, s.node.cn.Netns(), "GET", url)
	if err != nil {
		return handshakes{}, fmt.Errorf("node %s: %w", s.node.name, err)
	}
	if code != 200 {
		return handshakes{}, fmt.Errorf("node %s: GET %s: %d %s", s.node.name, url, code, body)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		return handshakes{}, fmt.Errorf("node %s: GET %s: %w", s.node.name, url, err)
	}
	f, ok := families["smesh_tls_handshakes_total"]
	if !ok {
		return handshakes{}, fmt.Errorf("node %s: GET %s: no smesh_tls_handshakes_total", s.node.name, url)
	}
	var h handshakes
	for _, m := range f.GetMetric() {
		labels := make(map[string]string)
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		if labels["role"] != "client" || labels["result"] != "ok" {
			continue
		}
		n := uint64(m.GetCounter().GetValue())
		if labels["resumed"] == "true" {
			h.resumed += n
		} else {
			h.full += n
		}
	}
	return h, nil
}

// linkUse is where the demo saw a link: the steps whose tunnelled
// connections rode it.
type linkUse struct {
	steps []int
}

// explainLink says which link the tunnelled connection of a tunnel-in
// "tunnel connection done" line rode, from node from: the line's peer is
// the link's address on that node, so a peer an earlier step's line named
// is the same link, taken from the pool. The demo learns links from these
// lines only (record).
func (d *demo) explainLink(from *node, in logLine) string {
	peer := in.str("peer")
	if use, ok := d.links[peer]; ok {
		last, first := use.steps[len(use.steps)-1], use.steps[0]
		return fmt.Sprintf("It came on the tunnel link step %d left idle in node %s's pool (peer %s again, the link\n"+
			"           made in step %d): no TCP or TLS handshake; resumed %s is of the link's handshake in step %d)",
			last, from.name, peer, first, in.str("resumed"), first)
	}
	if in["resumed"] == true {
		return fmt.Sprintf("It came on a new tunnel link (peer %s, node %s's end of it), whose TLS handshake resumed\n"+
			"           a session: node %s's smeshd held a ticket from an earlier handshake with this listener, so no\n"+
			"           certificates were sent)", peer, from.name, from.name)
	}
	return fmt.Sprintf("It came on a new tunnel link (peer %s, node %s's end of it): a full TLS 1.3 handshake,\n"+
		"           certificates both ways)", peer, from.name)
}

// record notes the links the step's tunnel-in lines name.
func (d *demo) record(lines []logLine) {
	for _, l := range lines {
		peer := l.str("peer")
		use := d.links[peer]
		if use == nil {
			use = &linkUse{}
			d.links[peer] = use
		}
		use.steps = append(use.steps, d.step)
	}
}

// newLinks counts the links of lines (before record) the demo has not seen
// before, by their handshake.
func (d *demo) newLinks(lines []logLine) handshakes {
	var h handshakes
	for _, l := range lines {
		switch _, seen := d.links[l.str("peer")]; {
		case seen:
		case l["resumed"] == true:
			h.resumed++
		default:
			h.full++
		}
	}
	return h
}

// showHandshakes prints how node n's client handshake counters moved in
// this step, and whether that agrees with the new links of the tunnel-in
// lines in (before record).
func (d *demo) showHandshakes(n *node, before, after handshakes, in []logLine) {
	say("   node %s, smeshd, GET /metrics: smesh_tls_handshakes_total{role=\"client\",result=\"ok\"}: resumed=\"false\" %d, resumed=\"true\" %d",
		n.name, after.full, after.resumed)
	made, logged := after.sub(before), d.newLinks(in)
	agree := "as the tunnel-in lines above say"
	if made != logged {
		agree = fmt.Sprintf("but the tunnel-in lines above show new links with %s", logged)
	}
	say("           (in this step node %s's smeshd made %s, %s)", n.name, made, agree)
}
