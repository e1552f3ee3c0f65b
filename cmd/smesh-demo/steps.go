package main

import (
	"context"
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
