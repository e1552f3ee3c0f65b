package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"
)

// The fetch steps: curl in one pod fetches the file of nginx in another,
// and the step shows what curl, nginx and smeshd on the nodes involved said
// about it, and how smeshd's counters moved.

// fetcher is the step that fetches with curl in pod *from the file of
// nginx in pod *to, n times at once; from and to point to the demo's pods,
// made by an earlier step.
func (d *demo) fetcher(from, to **pod, n int) func(context.Context) error {
	return func(ctx context.Context) error { return d.fetch(ctx, *from, *to, n) }
}

// snapshot is where a node's smeshd stood before a fetch: its log, its
// splice counters and its client handshakes.
type snapshot struct {
	mark   int
	splice spliceCounters
	shakes handshakes
}

func (s *smeshd) snapshot(ctx context.Context) (snapshot, error) {
	var sn snapshot
	var err error
	sn.mark = s.mark()
	if sn.splice, err = s.counters(); err != nil {
		return sn, err
	}
	sn.shakes, err = s.handshakes(ctx)
	return sn, err
}

func (d *demo) fetch(ctx context.Context, from, to *pod, n int) error {
	nodes := []*node{from.node}
	if to.node != from.node {
		nodes = append(nodes, to.node)
	}
	before := make(map[*node]snapshot)
	for _, nd := range nodes {
		sn, err := nd.smeshd.snapshot(ctx)
		if err != nil {
			return err
		}
		before[nd] = sn
	}
	if err := d.curl(ctx, from, to, n); err != nil {
		return err
	}
	var err error
	if from.node != to.node {
		err = d.showTunnel(ctx, from, to, n, before)
	} else {
		err = d.showNotCaptured(ctx, from, to, before[from.node].mark)
	}
	if err != nil {
		return err
	}
	if err := d.showNginx(ctx, from, to, n); err != nil {
		return err
	}
	return d.showSplice(from, to, nodes, before)
}

// curl runs curl in pod from for the file of nginx in pod to, n times at
// once, and checks what it got.
func (d *demo) curl(ctx context.Context, from, to *pod, n int) error {
	x := d.nginx[to]
	if n == 1 {
		say("   in pod %s: curl %s", from.short, x.url)
	} else {
		say("   in pod %s: curl --parallel --parallel-immediate, the URL %d times: %s\n"+
			"           (%d transfers at once, a connection each)", from.short, n, x.url, n)
	}
	res, sums, err := d.w.curl(ctx, from, x.url, n)
	if err != nil {
		return err
	}
	for i := range res {
		if sums[i] != d.sum {
			say("   curl: %s; sha256 DIFFERS from the file nginx serves", res[i])
			return errors.New("curl got another file than nginx serves")
		}
		say("   curl: %s; sha256 matches the file nginx serves", res[i])
	}
	return nil
}

// showTunnel shows the n tunnelled connections from pod from to pod to on
// another node: smeshd's outbound and tunnel-in lines, which link each
// rode, and how the client node's handshake counters moved.
func (d *demo) showTunnel(ctx context.Context, from, to *pod, n int, before map[*node]snapshot) error {
	dst := netip.AddrPortFrom(to.Addr4, nginxPort).String()
	outs, err := from.node.smeshd.waitLines(ctx, before[from.node].mark, n, 10*time.Second, `outbound "connection done" for `+dst,
		func(l logLine) bool { return message("connection done", "outbound")(l) && l.str("dst") == dst })
	if err != nil {
		return err
	}
	ins, err := to.node.smeshd.waitLines(ctx, before[to.node].mark, n, 10*time.Second, `tunnel-in "tunnel connection done" for `+dst,
		func(l logLine) bool { return message("tunnel connection done", "tunnel-in")(l) && l.str("dst") == dst })
	if err != nil {
		return err
	}
	for _, out := range outs {
		say("   node %s, smeshd: outbound \"connection done\": src %s, dst %s, path %s, tx %s, rx %s",
			from.node.name, out.str("src"), out.str("dst"), out.str("path"), bytesOf(out.num("tx")), bytesOf(out.num("rx")))
	}
	calls, each := "curl's connect() was", "the connection"
	if n > 1 {
		calls, each = "curl's connect() calls were", "each connection"
	}
	say("           (%s captured by cgroup/connect4 and sent to smeshd's listener in pod %s;\n"+
		"           smeshd learnt the original destination and carried %s through the tunnel)", calls, from.short, each)
	for _, in := range ins {
		say("   node %s, smeshd: tunnel-in \"tunnel connection done\": peer %s, peer_id %s, resumed %s, dst %s, rx %s, tx %s",
			to.node.name, in.str("peer"), in.str("peer_id"), in.str("resumed"), in.str("dst"), bytesOf(in.num("rx")), bytesOf(in.num("tx")))
		say("           (node %s's smeshd, identified by its certificate, reached the tunnel listener smeshd keeps inside\n"+
			"           pod %s, which delivered it to nginx there.\n"+
			"           %s", from.node.name, to.short, d.explainLink(from.node, in))
	}
	after, err := from.node.smeshd.handshakes(ctx)
	if err != nil {
		return err
	}
	d.showHandshakes(from.node, before[from.node].shakes, after, ins)
	d.record(ins)
	return nil
}

// showNotCaptured shows that curl's connection from pod from to pod to on
// the same node was not captured: smeshd logged no connection for it.
func (d *demo) showNotCaptured(ctx context.Context, from, to *pod, mark int) error {
	dst := netip.AddrPortFrom(to.Addr4, nginxPort).String()
	// A captured connection would be logged when it ends: give that line a
	// moment before saying there is none.
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(500 * time.Millisecond):
	}
	lines := from.node.smeshd.since(mark, func(l logLine) bool {
		return message("connection done", "outbound")(l) && l.str("dst") == dst
	})
	for _, l := range lines {
		say("   node %s, smeshd: outbound \"connection done\": src %s, dst %s, path %s (captured)",
			from.node.name, l.str("src"), l.str("dst"), l.str("path"))
	}
	if len(lines) == 0 {
		say("   node %s, smeshd: no \"connection done\" for %s: curl's connect() to a pod of its own node was not\n"+
			"           captured (no proxy hop)", from.node.name, dst)
	}
	return nil
}

// showNginx shows nginx's access log lines for the n requests, and whose
// address each came from.
func (d *demo) showNginx(ctx context.Context, from, to *pod, n int) error {
	for range n {
		acc, err := d.nginx[to].nextRequest(ctx)
		if err != nil {
			return err
		}
		who := ""
		switch acc.from.Addr() {
		case to.Addr4:
			who = " (its own pod's address: smeshd connected from inside the pod)"
		case from.Addr4:
			who = fmt.Sprintf(" (pod %s's address: curl's own connection)", from.short)
		}
		say("   nginx in pod %s: %q %d, %s, from %s%s", to.short, acc.request, acc.status, bytesOf(uint64(acc.bytes)), acc.from, who)
	}
	return nil
}

// showSplice shows how the splice counters of the nodes' smeshd moved.
func (d *demo) showSplice(from, to *pod, nodes []*node, before map[*node]snapshot) error {
	for _, n := range nodes {
		after, err := n.smeshd.counters()
		if err != nil {
			return err
		}
		c := after.sub(before[n].splice)
		hop := "between the two pods' namespaces"
		switch {
		case from.node == to.node:
		case n == from.node:
			hop = "the hop curl <-> smeshd in pod " + from.short
		default:
			hop = "the hop smeshd <-> nginx in pod " + to.short
		}
		if c.demoted == 0 {
			say("   node %s, BPF counters, %s: %s spliced by sk_msg, nothing demoted to TCP",
				n.name, hop, bytesOf(c.spliced))
			continue
		}
		say("   node %s, BPF counters, %s: %s spliced by sk_msg, then %s sent by TCP\n"+
			"           (a bounded-splice demotion: the reader's queue reached datapath.splice_queue_limit)",
			n.name, hop, bytesOf(c.spliced), bytesOf(c.demoted))
	}
	return nil
}
