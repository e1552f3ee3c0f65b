package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/enrol"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// nsWorkload is a network namespace of its own on a node, with a cgroup
// below the node's enrolled one: an enrolled container, without the bridge.
type nsWorkload struct {
	t  *testing.T
	ns *testenv.Node
	cg string
}

// workload makes one; addr, if set, is an address of it (on lo).
func (n *node) workload(addr string) *nsWorkload {
	t := n.t
	t.Helper()
	w := &nsWorkload{t: t, ns: testenv.NewNode(t), cg: filepath.Join(n.enrolled, testenv.Unique("smesh-test"))}
	// Removed with n.enrolled's tree.
	if err := os.Mkdir(w.cg, 0o755); err != nil {
		t.Fatal(err)
	}
	if addr != "" {
		err := w.ns.Do(func() error {
			// On lo: reachable from inside the namespace only, which is
			// all a same-address test needs.
			lo, err := netlink.LinkByName("lo")
			if err != nil {
				return err
			}
			a, err := netlink.ParseAddr(addr + "/32")
			if err != nil {
				return err
			}
			return netlink.AddrAdd(lo, a)
		})
		if err != nil {
			t.Fatalf("adding %s: %v", addr, err)
		}
	}
	return w
}

// netnsInode is the nsfs inode of a named network namespace, as
// /debug/namespaces names it.
func netnsInode(t *testing.T, name string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat("/run/netns/"+name, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func (w *nsWorkload) server(addr string) *testenv.Helper {
	w.t.Helper()
	h := testenv.StartHelper(w.t, w.cg, w.ns.Name, "server", addr)
	line, err := h.ReadLine(5 * time.Second)
	if err != nil || !strings.HasPrefix(line, "ready ") {
		w.t.Fatalf("server did not start (%q, %v): %s", line, err, h.Stderr())
	}
	return h
}

// namespaces reads smeshd's /debug/namespaces.
func (n *node) namespaces() []enrol.Info {
	n.t.Helper()
	code, body := n.admin("/debug/namespaces")
	if code != 200 {
		n.t.Fatalf("/debug/namespaces: %d %s", code, body)
	}
	var infos []enrol.Info
	if err := json.Unmarshal([]byte(body), &infos); err != nil {
		n.t.Fatalf("/debug/namespaces: %v: %s", err, body)
	}
	return infos
}

// waitNamespace waits until smeshd's /debug/namespaces shows the named
// network namespace in a state ok accepts.
func (n *node) waitNamespace(name string, ok func(enrol.Info) bool) {
	n.t.Helper()
	ino := netnsInode(n.t, name)
	deadline := time.Now().Add(10 * time.Second)
	for {
		infos := n.namespaces()
		for _, i := range infos {
			if i.Inode == ino && ok(i) {
				return
			}
		}
		if time.Now().After(deadline) {
			n.t.Fatalf("namespace %s not in the expected state after 10s: %+v", name, infos)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitServed waits until smeshd serves the named network namespaces
// (listeners up).
func (n *node) waitServed(netnsNames ...string) {
	n.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		infos := n.namespaces()
		missing := 0
		for _, name := range netnsNames {
			found := false
			ino := netnsInode(n.t, name)
			for _, i := range infos {
				found = found || i.Inode == ino && i.Ready
			}
			if !found {
				missing++
			}
		}
		if missing == 0 {
			return
		}
		if time.Now().After(deadline) {
			n.t.Fatalf("smeshd serves %d of %d namespaces after 10s: %+v", len(netnsNames)-missing, len(netnsNames), infos)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// conns starts the "conns" helper in the workload and returns a function
// that runs one of its commands and fails the test unless it succeeds.
func (w *nsWorkload) conns() func(format string, args ...any) {
	h := testenv.StartHelper(w.t, w.cg, w.ns.Name, "conns")
	return func(format string, args ...any) {
		w.t.Helper()
		cmd := fmt.Sprintf(format, args...)
		if err := h.Send(cmd); err != nil {
			w.t.Fatal(err)
		}
		line, err := h.ReadLine(15 * time.Second)
		if err != nil {
			w.t.Fatalf("%s (in %s): %v\n%s", cmd, w.ns.Name, err, h.Stderr())
		}
		if !strings.HasPrefix(line, "ok ") {
			w.t.Fatalf("%s (in %s): %s", cmd, w.ns.Name, line)
		}
	}
}

// TestNamespacesNeverCrossDeliver: two enrolled namespaces on one node hold
// connections with the same 4-tuple, alive at once or one left half-dead
// (client closed, server still holding its socket), in several orders. Every
// byte reaches the server of its own namespace, spliced, and none the other
// one's. Run for loopback and for an address both namespaces have.
func TestNamespacesNeverCrossDeliver(t *testing.T) {
	for _, tc := range []struct{ name, addr string }{
		{"loopback", "127.0.0.1"},
		{"same pod address", "198.18.250.5"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNode(t)
			n.start("splice", "")
			podAddr := ""
			if tc.addr != "127.0.0.1" {
				podAddr = tc.addr
			}
			a, b := n.workload(podAddr), n.workload(podAddr)
			dst := net.JoinHostPort(tc.addr, "8080")
			srvA, srvB := a.server(dst), b.server(dst)
			n.waitServed(a.ns.Name, b.ns.Name)
			inA, inB := a.conns(), b.conns()
			src := func(port int) string { return net.JoinHostPort(tc.addr, fmt.Sprint(port)) }

			const size = 1 << 20
			before := n.stats()
			// Each scenario uses its own source port, the same in both
			// namespaces: identical 4-tuples, a fresh pair each time.
			t.Run("both open", func(t *testing.T) {
				inA("dial c1 %s %s", src(40001), dst)
				inB("dial c1 %s %s", src(40001), dst)
				inA("send c1 %d 1", size)
				inB("send c1 %d 2", size)
				inA("check c1")
				inB("check c1")
				inA("close c1")
				inB("close c1")
			})
			t.Run("first closed, its server holds", func(t *testing.T) {
				inA("dial c2 %s %s", src(40002), dst)
				inA("send c2 %d 3", size)
				inA("check c2")
				inA("close c2")
				inB("dial c2 %s %s", src(40002), dst)
				inB("send c2 %d 4", size)
				inB("check c2")
				inB("close c2")
			})
			t.Run("second closed, its server holds", func(t *testing.T) {
				inB("dial c3 %s %s", src(40003), dst)
				inB("check c3")
				inB("close c3")
				inA("dial c3 %s %s", src(40003), dst)
				inA("send c3 %d 5", size)
				inA("check c3")
				inA("close c3")
			})
			t.Run("one closes while the other sends", func(t *testing.T) {
				inA("dial c4 %s %s", src(40004), dst)
				inB("dial c4 %s %s", src(40004), dst)
				inA("send c4 %d 6", size)
				inA("check c4")
				inA("close c4")
				inB("send c4 %d 7", size)
				inB("check c4")
			})
			// Spliced: otherwise TCP alone would have kept them apart.
			if moved := n.stats().bytes - before.bytes; moved < 6*size {
				t.Errorf("spliced %d bytes, want at least %d", moved, 6*size)
			}
			// Nothing arrived at a socket whose client had gone.
			time.Sleep(100 * time.Millisecond)
			for _, srv := range []*testenv.Helper{srvA, srvB} {
				if out := srv.Stdout(); strings.Contains(out, "late ") {
					t.Errorf("a server received bytes after its client closed:\n%s", out)
				}
			}
		})
	}
}
