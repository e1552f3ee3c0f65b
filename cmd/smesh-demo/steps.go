package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/smesh-dev/smesh/pkg/certs"
)

// The steps, in the order main lists them. Each prints what it did and what
// smeshd, curl or nginx said about it, indented below its title.

func (d *demo) certificates(ctx context.Context) error {
	d.tlsDir = filepath.Join(d.w.dir, "tls")
	ca, err := certs.Init(d.tlsDir, []string{"a", "b"}, certs.DefaultTrustDomain)
	if err != nil {
		return err
	}
	say("   smeshd certs init --dir %s --nodes a,b", d.tlsDir)
	say("   a CA for trust domain %s; node a is %s, node b is %s", ca.TrustDomain, ca.ID("a"), ca.ID("b"))
	return nil
}

func (d *demo) nodes(ctx context.Context) error {
	var err error
	if d.a, err = d.w.addNode("a", podNetA4, podNetA6); err != nil {
		return err
	}
	if d.b, err = d.w.addNode("b", podNetB4, podNetB6); err != nil {
		return err
	}
	if err := join(d.a, d.b, wire4, wire6); err != nil {
		return err
	}
	for _, n := range []*node{d.a, d.b} {
		say("   node %s: network namespace %s, br0 %v (pod subnets %v, %v), wire end %v",
			n.name, n.cn.Name, n.cn.Gateway4(), n.cn.PodNet4, n.cn.PodNet6, n.wire)
	}
	say("   each node routes the other's pod subnets over the wire")
	return nil
}

func (d *demo) smeshds(ctx context.Context) error {
	for _, n := range []*node{d.a, d.b} {
		s, err := d.w.startSmeshd(ctx, n, d.tlsDir)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(d.w.mount, n.smeshdCg)
		say("   node %s: smeshd (pid %d) in cgroup %s", n.name, s.proc.cmd.Process.Pid, rel)
		for _, l := range s.since(0, message("data path attached")) {
			say("           \"data path attached\": mode %s, enrolled cgroups %s", l.str("mode"), l.str("cgroups"))
		}
		for _, l := range s.since(0, message("smeshd ready")) {
			say("           \"smeshd ready\": captured connections arrive at %s, tunnel on %s, admin on %s, mTLS %s",
				l.str("outbound"), l.str("tunnel"), l.str("admin"), l.str("mtls"))
		}
	}
	return nil
}

func (d *demo) pods(ctx context.Context, blob []byte) error {
	start := time.Now()
	for _, p := range []struct {
		n     *node
		short string
		pod   **pod
	}{
		{d.a, "client-a", &d.clientA}, {d.a, "web-a", &d.webA},
		{d.b, "web-b", &d.webB}, {d.b, "client-b", &d.clientB},
	} {
		var err error
		if *p.pod, err = d.w.addPod(p.n, p.short); err != nil {
			return err
		}
	}
	for _, n := range []*node{d.a, d.b} {
		for _, p := range n.pods {
			rel, _ := filepath.Rel(d.w.mount, p.Cgroup)
			say("   node %s: pod %-8s %v, network namespace %s, cgroup %s", n.name, p.short, p.Addr4, p.Name, rel)
		}
	}
	// smeshd finds a pod by its first process (inotify on the enrolled
	// cgroup tree) and opens its listeners in the pod's namespace: wait
	// until /debug/namespaces says they are up.
	for _, n := range []*node{d.a, d.b} {
		if _, err := n.smeshd.waitServed(ctx, n.pods, 10*time.Second); err != nil {
			return err
		}
		for _, p := range n.pods {
			l, err := n.smeshd.waitLine(ctx, 0, 5*time.Second, fmt.Sprintf(`"serving network namespace" for pod %s`, p.short),
				func(l logLine) bool {
					return message("serving network namespace")(l) && l.num("inode") == p.inode
				})
			if err != nil {
				return err
			}
			say("   node %s, smeshd: \"serving network namespace\": inode %d (pod %s), ready %s",
				n.name, p.inode, p.short, l.str("ready"))
		}
	}
	say("   /debug/namespaces on both nodes: all four pods ready (listeners up) %d ms after the first was made",
		time.Since(start).Milliseconds())
	for _, p := range []*pod{d.webA, d.webB} {
		x, err := d.w.startNginx(ctx, p, blob)
		if err != nil {
			return err
		}
		d.nginx[p] = x
	}
	say("   nginx in pods web-a and web-b serves a %d-byte random file: %s, %s", d.size, d.nginx[d.webA].url, d.nginx[d.webB].url)
	return nil
}

// fetch runs curl in pod from for the file of nginx in pod to, and shows
// what curl, nginx and smeshd on the nodes involved said about it, and how
// smeshd's splice counters moved.
func (d *demo) fetch(ctx context.Context, from, to *pod) error {
	x := d.nginx[to]
	nodes := []*node{from.node}
	if to.node != from.node {
		nodes = append(nodes, to.node)
	}
	marks := make(map[*node]int)
	before := make(map[*node]spliceCounters)
	for _, n := range nodes {
		marks[n] = n.smeshd.mark()
		c, err := n.smeshd.counters()
		if err != nil {
			return err
		}
		before[n] = c
	}

	say("   in pod %s: curl %s", from.short, x.url)
	res, sum, err := d.w.curl(ctx, from, x.url)
	if err != nil {
		return err
	}
	if sum != d.sum {
		say("   curl: %s; sha256 DIFFERS from the file nginx serves", res)
		return errors.New("curl got another file than nginx serves")
	}
	say("   curl: %s; sha256 matches the file nginx serves", res)
	acc, err := x.nextRequest(ctx)
	if err != nil {
		return err
	}
	dst := netip.AddrPortFrom(to.Addr4, nginxPort).String()
	outbound := func(l logLine) bool {
		return message("connection done", "outbound")(l) && l.str("dst") == dst
	}

	if from.node != to.node {
		out, err := from.node.smeshd.waitLine(ctx, marks[from.node], 10*time.Second, `outbound "connection done" for `+dst, outbound)
		if err != nil {
			return err
		}
		in, err := to.node.smeshd.waitLine(ctx, marks[to.node], 10*time.Second, `tunnel-in "tunnel connection done" for `+dst,
			func(l logLine) bool {
				return message("tunnel connection done", "tunnel-in")(l) && l.str("dst") == dst
			})
		if err != nil {
			return err
		}
		say("   node %s, smeshd: outbound \"connection done\": src %s, dst %s, path %s, tx %s, rx %s",
			from.node.name, out.str("src"), out.str("dst"), out.str("path"), bytesOf(out.num("tx")), bytesOf(out.num("rx")))
		say("           (curl's connect() was captured by cgroup/connect4 and sent to smeshd's listener in pod %s;\n"+
			"           smeshd learnt the original destination and carried the connection through the tunnel)", from.short)
		handshake := "a full TLS 1.3 handshake"
		if in["resumed"] == true {
			handshake = "a resumed TLS session"
		}
		say("   node %s, smeshd: tunnel-in \"tunnel connection done\": peer %s, peer_id %s, resumed %s, dst %s, rx %s, tx %s",
			to.node.name, in.str("peer"), in.str("peer_id"), in.str("resumed"), in.str("dst"), bytesOf(in.num("rx")), bytesOf(in.num("tx")))
		say("           (node %s's smeshd, identified by its certificate, with %s, reached the tunnel\n"+
			"           listener smeshd keeps inside pod %s, which delivered it to nginx there)", from.node.name, handshake, to.short)
	} else {
		// A captured connection would be logged when it ends: give that
		// line a moment before saying there is none.
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
		lines := from.node.smeshd.since(marks[from.node], outbound)
		for _, l := range lines {
			say("   node %s, smeshd: outbound \"connection done\": src %s, dst %s, path %s (captured)",
				from.node.name, l.str("src"), l.str("dst"), l.str("path"))
		}
		if len(lines) == 0 {
			say("   node %s, smeshd: no \"connection done\" for %s: curl's connect() to a pod of its own node was not\n"+
				"           captured (no proxy hop)", from.node.name, dst)
		}
	}

	who := ""
	switch acc.from.Addr() {
	case to.Addr4:
		who = " (its own pod's address: smeshd connected from inside the pod)"
	case from.Addr4:
		who = fmt.Sprintf(" (pod %s's address: curl's own connection)", from.short)
	}
	say("   nginx in pod %s: %q %d, %s, from %s%s", to.short, acc.request, acc.status, bytesOf(uint64(acc.bytes)), acc.from, who)

	for _, n := range nodes {
		after, err := n.smeshd.counters()
		if err != nil {
			return err
		}
		c := after.sub(before[n])
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

func (d *demo) served(ctx context.Context) error {
	for _, n := range []*node{d.a, d.b} {
		infos, err := n.smeshd.namespaces(ctx)
		if err != nil {
			return err
		}
		ready := 0
		for _, i := range infos {
			if i.Ready {
				ready++
			}
		}
		say("   node %s: %d network namespaces, %d ready", n.name, len(infos), ready)
		for _, i := range infos {
			name := fmt.Sprintf("namespace %d", i.Inode)
			if i.Own {
				name = "node " + n.name + " itself"
			}
			for _, p := range n.pods {
				if p.inode == i.Inode {
					name = "pod " + p.short
				}
			}
			state := "ready"
			if !i.Ready {
				state = "NOT READY: " + i.Error
			}
			var addrs []string
			linkLocal := 0
			for _, a := range i.Addrs {
				if ip, err := netip.ParseAddr(a); err == nil && ip.IsLinkLocalUnicast() {
					linkLocal++
					continue
				}
				addrs = append(addrs, a)
			}
			say("     %-14s inode %d, %s: %s (+%d link-local)", name, i.Inode, state, strings.Join(addrs, " "), linkLocal)
		}
	}
	return nil
}

func (d *demo) stop(ctx context.Context) error {
	for _, n := range []*node{d.a, d.b} {
		total, err := n.smeshd.counters()
		if err != nil {
			return err
		}
		mark := n.smeshd.mark()
		drained, err := n.smeshd.stop(ctx)
		if err != nil {
			return err
		}
		for _, l := range n.smeshd.since(mark, message("stopping: no new captures, draining")) {
			say("   node %s, smeshd: \"stopping: no new captures, draining\": %d relayed connections open", n.name, l.num("relayed"))
		}
		tun, _ := drained["tunnel"].(map[string]any)
		errs := "none"
		if m, ok := tun["errors"].(map[string]any); ok && len(m) > 0 {
			errs = fmt.Sprint(m)
		}
		say("   node %s, smeshd: \"drained\": tunnel connections out %d, in %d, errors %s; exited",
			n.name, logLine(tun).num("out"), logLine(tun).num("in"), errs)
		say("   node %s, BPF counters over smeshd's life: %s spliced by sk_msg, %s sent by TCP after a demotion",
			n.name, bytesOf(total.spliced), bytesOf(total.demoted))
	}
	if err := d.w.close(); err != nil {
		return err
	}
	say("   removed pods client-a, web-a, web-b, client-b (their processes, cgroups and namespaces), nodes %s\n"+
		"   and %s, cgroup %s and %s", d.a.cn.Name, d.b.cn.Name, d.w.cgroup, d.w.dir)
	left, err := d.w.leftovers()
	if err != nil {
		return err
	}
	if len(left) > 0 {
		return fmt.Errorf("left behind: %s", strings.Join(left, ", "))
	}
	say("   nothing left: no network namespace %s-*, no cgroup, no directory", d.w.prefix)
	return nil
}

func bytesOf(n uint64) string {
	switch {
	case n >= 1<<20:
		return strconv.FormatFloat(float64(n)/(1<<20), 'f', 1, 64) + " MiB"
	case n >= 1<<10:
		return strconv.FormatFloat(float64(n)/(1<<10), 'f', 1, 64) + " KiB"
	}
	return strconv.FormatUint(n, 10) + " bytes"
}
