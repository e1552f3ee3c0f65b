package datapath

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

const strictGreeting = "strict-hello"

// strictServer listens on two ports of args[0] (default: all addresses,
// dual-stack: IPv4 SYNs reach it v4-mapped), prints them ("PORT EXEMPT"),
// and writes strictGreeting to every connection it accepts, then closes it.
// Until stdin closes.
func strictServer(args []string) int {
	host := "::"
	if len(args) > 0 {
		host = args[0]
	}
	var ports []string
	for range 2 {
		ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
		if err != nil {
			fmt.Println(err)
			return 1
		}
		ports = append(ports, strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Write([]byte(strictGreeting + "\n"))
				c.Close()
			}
		}()
	}
	fmt.Println(strings.Join(ports, " "))
	io.Copy(io.Discard, os.Stdin)
	return 0
}

// strictDial dials every address that comes on stdin (2 s timeout) and
// prints "read LINE" with what the server wrote, "timeout" when the
// handshake never completed (SYNs dropped), or "error ERR". "mapped ADDR"
// dials the IPv4 ADDR from a dual-stack (AF_INET6) socket, as
// ::ffff:a.b.c.d; "dstopts ADDR" dials the IPv6 ADDR with a destination
// options header (PadN) in front of the TCP header of every packet.
func strictDial([]string) int {
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		if addr, ok := strings.CutPrefix(in.Text(), "mapped "); ok {
			fmt.Println(dialRaw(netip.MustParseAddrPort(addr), false))
			continue
		}
		if addr, ok := strings.CutPrefix(in.Text(), "dstopts "); ok {
			fmt.Println(dialRaw(netip.MustParseAddrPort(addr), true))
			continue
		}
		c, err := net.DialTimeout("tcp", in.Text(), 2*time.Second)
		var ne net.Error
		switch {
		case errors.As(err, &ne) && ne.Timeout():
			fmt.Println("timeout")
			continue
		case err != nil:
			fmt.Println("error", err)
			continue
		}
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if err != nil {
			fmt.Println("error", err)
			continue
		}
		fmt.Println("read", strings.TrimSpace(line))
	}
	return 0
}

// dialRaw connects an AF_INET6 socket to addr (an IPv4 one v4-mapped: Go's
// net package would make it an AF_INET socket), with a destination options
// header on its packets if dstopts, and answers as strictDial.
func dialRaw(addr netip.AddrPort, dstopts bool) string {
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return "error " + err.Error()
	}
	defer unix.Close(fd)
	if dstopts {
		// Next header (the kernel's), length 0 (8 bytes), PadN of 4.
		opts := string([]byte{0, 0, 1, 4, 0, 0, 0, 0})
		if err := unix.SetsockoptString(fd, unix.IPPROTO_IPV6, unix.IPV6_DSTOPTS, opts); err != nil {
			return "error " + err.Error()
		}
	}
	tv := unix.Timeval{Sec: 2}
	for _, opt := range []int{unix.SO_SNDTIMEO, unix.SO_RCVTIMEO} {
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, opt, &tv); err != nil {
			return "error " + err.Error()
		}
	}
	// A blocking connect bounded by SO_SNDTIMEO: EINPROGRESS when the
	// handshake did not complete in time.
	err = unix.Connect(fd, &unix.SockaddrInet6{Port: int(addr.Port()), Addr: netip.AddrFrom16(addr.Addr().As16()).As16()})
	switch {
	case errors.Is(err, unix.EINPROGRESS):
		return "timeout"
	case err != nil:
		return "error " + err.Error()
	}
	buf := make([]byte, 64)
	n, err := unix.Read(fd, buf)
	if err != nil || n <= 0 {
		return fmt.Sprintf("error read %d: %v", n, err)
	}
	return "read " + strings.TrimSpace(string(buf[:n]))
}

// dialFrom has the strict-dial helper h dial addr and returns its answer.
func dialFrom(t *testing.T, h *testenv.Helper, addr netip.AddrPort) string {
	t.Helper()
	return dialLine(t, h, addr.String())
}

// dialLine sends a strict-dial helper a line and returns its answer.
func dialLine(t *testing.T, h *testenv.Helper, line string) string {
	t.Helper()
	if err := h.Send(line); err != nil {
		t.Fatal(err)
	}
	line, err := h.ReadLine(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return line
}

// strictWorld is a strict test setup: a pod (server in its own cgroup and
// namespace) on a cluster node, a remote node joined to it over a wire,
// smeshd's cgroup, and dialers: mesh (in smeshd's cgroup, on the pod's node),
// local (a non-mesh process on that node) and remote (on the other node).
type strictWorld struct {
	pod                 *testenv.Pod
	remoteNode          *testenv.ClusterNode
	remoteEnd           netip.Addr // the remote node's end of the wire
	proxyCg             string
	pinDir              string // set: load pins (on_failure = "closed")
	port, exempt        uint16
	mesh, local, remote *testenv.Helper
}

func newStrictWorld(t *testing.T) *strictWorld {
	t.Helper()
	c := testenv.NewCluster()
	node, remoteNode := c.AddNode(t), c.AddNode(t)
	_, end := testenv.JoinNodes(t, node, remoteNode)
	w := &strictWorld{pod: node.AddPod(t, ""), remoteNode: remoteNode, remoteEnd: end.Addr4, proxyCg: testenv.NewCgroup(t)}
	w.port, w.exempt = startStrictServer(t, w.pod.Cgroup, w.pod.Name)
	w.mesh = testenv.StartHelper(t, w.proxyCg, node.Name, "strict-dial")
	w.local = testenv.StartHelper(t, testenv.NewCgroup(t), node.Name, "strict-dial")
	w.remote = testenv.StartHelper(t, testenv.NewCgroup(t), remoteNode.Name, "strict-dial")
	return w
}

// startStrictServer starts a strict-server helper in cgroup and namespace
// netnsName, listening on args, and returns its two ports.
func startStrictServer(t *testing.T, cgroup, netnsName string, args ...string) (port, exempt uint16) {
	t.Helper()
	srv := testenv.StartHelper(t, cgroup, netnsName, "strict-server", args...)
	line, err := srv.ReadLine(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fmt.Sscan(line, &port, &exempt); err != nil {
		t.Fatalf("strict-server said %q: %v", line, err)
	}
	return port, exempt
}

// load loads a data path with smeshd's cgroup proxyCg, enrolling the pod
// and registering its namespace and addresses; extra are enrolled too.
func (w *strictWorld) load(t *testing.T, adopt map[string]*os.File, extra ...string) *Datapath {
	t.Helper()
	opts := handoverOpts(ModeSplice, netip.MustParseAddrPort("127.0.0.1:18000"), w.proxyCg)
	if w.pinDir != "" {
		opts.PinDir, opts.FailClosed = w.pinDir, true
	}
	var d *Datapath
	if adopt != nil {
		d = successor(t, opts, adopt)
	} else {
		var err error
		if d, err = Load(opts); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
	}
	if err := d.SetCapture(append([]string{w.pod.Cgroup}, extra...), opts.IncludeCIDRs, nil, nil); err != nil {
		t.Fatal(err)
	}
	var cookie uint64
	if err := w.pod.Do(func() (err error) { cookie, err = currentNetnsCookie(); return err }); err != nil {
		t.Fatal(err)
	}
	if err := d.SetNamespace(cookie, []netip.Addr{w.pod.Addr4, w.pod.Addr6}, false, false); err != nil {
		t.Fatal(err)
	}
	return d
}

// check dials the pod's port and exempt port from each dialer, over IPv4
// and IPv6, and compares the answers with what strict (or not) wants.
func (w *strictWorld) check(t *testing.T, strict bool) {
	t.Helper()
	read := "read " + strictGreeting
	plain := read
	if strict {
		plain = "timeout"
	}
	for _, addr := range []netip.Addr{w.pod.Addr4, w.pod.Addr6} {
		for _, c := range []struct {
			who  string
			h    *testenv.Helper
			port uint16
			want string
		}{
			{"another node", w.remote, w.port, plain},
			{"a non-mesh process of the node", w.local, w.port, plain},
			{"smeshd's cgroup", w.mesh, w.port, read},
			{"another node, exempt port", w.remote, w.exempt, read},
		} {
			dst := netip.AddrPortFrom(addr, c.port)
			if got := dialFrom(t, c.h, dst); got != c.want {
				t.Errorf("strict %v: %s dialling %s: %q, want %q", strict, c.who, dst, got, c.want)
			}
		}
	}
	// A dual-stack client socket names the connection v4-mapped in
	// sock_ops, as the receiver's IPv4 SYN is keyed.
	for _, c := range []struct {
		who  string
		h    *testenv.Helper
		want string
	}{
		{"smeshd's cgroup", w.mesh, read},
		{"another node", w.remote, plain},
	} {
		dst := netip.AddrPortFrom(w.pod.Addr4, w.port)
		if got := dialLine(t, c.h, "mapped "+dst.String()); got != c.want {
			t.Errorf("strict %v: %s dialling %s from an AF_INET6 socket: %q, want %q", strict, c.who, dst, got, c.want)
		}
		// The ingress program walks IPv6 extension headers to the TCP
		// one.
		dst = netip.AddrPortFrom(w.pod.Addr6, w.port)
		if got := dialLine(t, c.h, "dstopts "+dst.String()); got != c.want {
			t.Errorf("strict %v: %s dialling %s with a destination options header: %q, want %q", strict, c.who, dst, got, c.want)
		}
	}
}

// TestStrictInbound: a strict workload's server drops the plaintext SYNs
// of another node and of a non-mesh process of its own node (the dial
// times out), counted; smeshd's own sockets get through, and so does
// anything to an exempt port; IPv4 (to a dual-stack listener) and IPv6.
// Once the workload is strict no more, plaintext gets through again.
func TestStrictInbound(t *testing.T) {
	testenv.RequirePrivileged(t)
	w := newStrictWorld(t)
	d := w.load(t, nil)
	w.check(t, false)
	if err := d.SetStrict(map[string]StrictOptions{w.pod.Cgroup: {ExemptPorts: []uint16{w.exempt}}}); err != nil {
		t.Fatal(err)
	}
	w.check(t, true)
	c, err := d.StrictCounters()
	if err != nil {
		t.Fatal(err)
	}
	// Each of the 4 dropped dials sent its SYN at least twice (1 s, 2 s).
	if c.Dropped < 8 || c.Mesh < 2 || c.Exempt < 2 {
		t.Errorf("strict counters %+v: want >= 8 dropped (4 dials, retransmits included), >= 2 mesh, >= 2 exempt", c)
	}
	if got, err := d.StrictDropped(); err != nil || got != c.Dropped {
		t.Errorf("StrictDropped = %d, %v; want %d", got, err, c.Dropped)
	}
	if err := d.SetStrict(nil); err != nil {
		t.Fatal(err)
	}
	w.check(t, false)
}

// TestStrictLoopbackAndOutbound: loopback inside a strict pod's own
// namespace can only come from the pod: it passes, from any process there.
// In smeshd's own namespace (the node's, shared by every host process and
// hostNetwork pod) loopback is checked like any address: a non-mesh process
// is dropped, while an enrolled one (its same-node connection is the mesh's,
// recorded by the enrolled cgroup's recorder) and smeshd's own get through.
// A strict workload's own outbound connections work (their SYN-ACKs are no
// bare SYNs).
func TestStrictLoopbackAndOutbound(t *testing.T) {
	testenv.RequirePrivileged(t)
	w := newStrictWorld(t)
	hostStrict, enrolledApp := testenv.NewCgroup(t), testenv.NewCgroup(t)
	d := w.load(t, nil, hostStrict, enrolledApp)
	if err := d.SetStrict(map[string]StrictOptions{w.pod.Cgroup: {}, hostStrict: {}}); err != nil {
		t.Fatal(err)
	}
	// This test's namespace is smeshd's: listen on loopback only there.
	hostPort, _ := startStrictServer(t, hostStrict, "", "127.0.0.1")
	read := "read " + strictGreeting
	inPodNs := testenv.StartHelper(t, testenv.NewCgroup(t), w.pod.Name, "strict-dial")
	hostPlain := testenv.StartHelper(t, testenv.NewCgroup(t), "", "strict-dial")
	hostEnrolled := testenv.StartHelper(t, enrolledApp, "", "strict-dial")
	hostMesh := testenv.StartHelper(t, w.proxyCg, "", "strict-dial")
	workload := testenv.StartHelper(t, w.pod.Cgroup, w.pod.Name, "strict-dial")
	remotePort, _ := startStrictServer(t, testenv.NewCgroup(t), w.remoteNode.Name)
	for _, c := range []struct {
		who  string
		h    *testenv.Helper
		dst  netip.AddrPort
		want string
	}{
		{"another process of the pod's namespace, 127.0.0.1", inPodNs, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), w.port), read},
		{"another process of the pod's namespace, ::1", inPodNs, netip.AddrPortFrom(netip.IPv6Loopback(), w.port), read},
		{"a non-mesh host process, loopback", hostPlain, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), hostPort), "timeout"},
		{"an enrolled host process, loopback", hostEnrolled, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), hostPort), read},
		{"smeshd's cgroup, loopback", hostMesh, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), hostPort), read},
		{"the strict workload, to another node", workload, netip.AddrPortFrom(w.remoteEnd, remotePort), read},
	} {
		if got := dialFrom(t, c.h, c.dst); got != c.want {
			t.Errorf("%s dialling %s: %q, want %q", c.who, c.dst, got, c.want)
		}
	}
	c, err := d.StrictCounters()
	if err != nil {
		t.Fatal(err)
	}
	if c.Loopback < 2 {
		t.Errorf("strict counters %+v: want >= 2 loopback", c)
	}
}

// TestStrictPinned: with on_failure = "closed" a strict workload stays
// strict while no smeshd runs (the ingress programs and the recorders
// pinned: smeshd's own sockets still get in), and the next smeshd adopts
// the pins and can make the workload strict no more.
func TestStrictPinned(t *testing.T) {
	testenv.RequirePrivileged(t)
	w := newStrictWorld(t)
	w.pinDir = testBPFFS(t)
	t.Cleanup(func() { RemovePins(w.pinDir) })
	strictSet := map[string]StrictOptions{w.pod.Cgroup: {ExemptPorts: []uint16{w.exempt}}}
	a := w.load(t, nil)
	if err := a.SetStrict(strictSet); err != nil {
		t.Fatal(err)
	}
	a.Commit()
	ids := strictLinkIDs(t, a)
	// It dies: the pins stay.
	if err := a.Release(); err != nil {
		t.Fatal(err)
	}
	w.check(t, true)
	b := w.load(t, nil)
	if err := b.SetStrict(strictSet); err != nil {
		t.Fatal(err)
	}
	if got := strictLinkIDs(t, b); !maps.Equal(got, ids) {
		t.Errorf("strict attachments after the restart %v, want the pinned %v", got, ids)
	}
	if err := b.SetStrict(nil); err != nil {
		t.Fatal(err)
	}
	b.Commit()
	w.check(t, false)
}

// TestStrictFailedStartGivesBack: a successor that adopted the strict
// links and fails before Commit gives the predecessor's programs back.
func TestStrictFailedStartGivesBack(t *testing.T) {
	testenv.RequirePrivileged(t)
	proxyCg, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
	opts := handoverOpts(ModeSplice, netip.MustParseAddrPort("127.0.0.1:18000"), proxyCg)
	a := predecessor(t, opts, app)
	if err := a.SetStrict(map[string]StrictOptions{app: {}}); err != nil {
		t.Fatal(err)
	}
	ids := strictLinkIDs(t, a)
	files, err := a.Handover()
	if err != nil {
		t.Fatal(err)
	}
	b := successor(t, opts, files)
	if err := b.SetCapture([]string{app}, opts.IncludeCIDRs, nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := b.SetStrict(map[string]StrictOptions{app: {}}); err != nil {
		t.Fatal(err)
	}
	want := map[ebpf.AttachType]ebpf.ProgramID{
		ebpf.AttachCGroupInetIngress: progID(t, a.strict.Ingress),
		ebpf.AttachCGroupSockOps:     progID(t, a.strict.Sockops),
	}
	newProgs := map[ebpf.AttachType]ebpf.ProgramID{
		ebpf.AttachCGroupInetIngress: progID(t, b.strict.Ingress),
		ebpf.AttachCGroupSockOps:     progID(t, b.strict.Sockops),
	}
	for a, l := range b.strictLinks {
		if info, err := l.Info(); err != nil || info.Program != newProgs[a.typ] {
			t.Fatalf("adopted strict %s link runs %v, %v; want the successor's %d", a.typ, info, err, newProgs[a.typ])
		}
	}
	if got := strictLinkIDs(t, b); !maps.Equal(got, ids) {
		t.Fatalf("successor's strict links %v, want the predecessor's %v", got, ids)
	}
	links := make(map[attachment]link.Link)
	for at, l := range a.strictLinks {
		links[at] = l
	}
	if err := b.Close(); err != nil { // no Commit: a failed start
		t.Fatal(err)
	}
	for at, l := range links {
		info, err := l.Info()
		if err != nil || info.Program != want[at.typ] {
			t.Errorf("strict %s link of %s after the failed start runs %v, %v; want the predecessor's %d", at.typ, at.cgroup, info, err, want[at.typ])
		}
	}
}

// TestStrictNotEnrolled: only enrolled cgroups can be strict.
func TestStrictNotEnrolled(t *testing.T) {
	testenv.RequirePrivileged(t)
	proxyCg, other := testenv.NewCgroup(t), testenv.NewCgroup(t)
	d := predecessor(t, handoverOpts(ModeSplice, netip.MustParseAddrPort("127.0.0.1:18000"), proxyCg), testenv.NewCgroup(t))
	if err := d.StrictAvailable(); err != nil {
		t.Fatalf("strict inbound unavailable on this kernel: %v", err)
	}
	if err := d.SetStrict(map[string]StrictOptions{other: {}}); err == nil || !strings.Contains(err.Error(), "not enrolled") {
		t.Fatalf("SetStrict of a cgroup not enrolled: %v, want not enrolled", err)
	}
	if len(d.strictLinks) != 0 {
		t.Errorf("%d strict attachments after a refused SetStrict", len(d.strictLinks))
	}
}

// TestStrictBelowEnrolled: a cgroup below an enrolled one (a workload's)
// can be strict, by its id at SetStrict: its ingress program attached and
// its smesh_strict entries written; a missing one is refused; once the
// enrolled cgroup is no longer enrolled, it is strict no longer.
func TestStrictBelowEnrolled(t *testing.T) {
	testenv.RequirePrivileged(t)
	proxyCg, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
	opts := handoverOpts(ModeSplice, netip.MustParseAddrPort("127.0.0.1:18000"), proxyCg)
	d := predecessor(t, opts, app)
	if err := d.StrictAvailable(); err != nil {
		t.Fatalf("strict inbound unavailable on this kernel: %v", err)
	}
	child := app + "/smesh-test-child"
	if err := d.SetStrict(map[string]StrictOptions{child: {}}); err == nil {
		t.Fatal("SetStrict of a missing cgroup below an enrolled one: no error")
	}
	if err := os.Mkdir(child, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(child) })
	if err := d.SetStrict(map[string]StrictOptions{child: {ExemptPorts: []uint16{8081}}}); err != nil {
		t.Fatal(err)
	}
	if n := testenv.AttachedPrograms(t, child, ebpf.AttachCGroupInetIngress); n != 1 {
		t.Errorf("%d ingress programs on the strict child cgroup, want 1", n)
	}
	if got := d.strictEntries(); len(got) != 2 {
		t.Errorf("smesh_strict entries wanted: %v, want the cgroup's and its exempt port's", got)
	}
	// No longer enrolled: the child is strict no longer.
	if err := d.SetCapture(nil, opts.IncludeCIDRs, nil, nil); err != nil {
		t.Fatal(err)
	}
	if n := testenv.AttachedPrograms(t, child, ebpf.AttachCGroupInetIngress); n != 0 {
		t.Errorf("%d ingress programs on the child after its enrolled cgroup left the capture, want 0", n)
	}
}

// strictLinkIDs are the ids of d's strict attachments, by hand-over name.
func strictLinkIDs(t *testing.T, d *Datapath) map[string]link.ID {
	t.Helper()
	out := make(map[string]link.ID)
	for a, l := range d.strictLinks {
		info, err := l.Info()
		if err != nil {
			t.Fatal(err)
		}
		out[strictLinkName(a.typ, a.id)] = info.ID
	}
	return out
}

// TestStrictHandover: a successor adopts the strict maps and attachments
// (the same links, the counters carried on) and the workload stays strict
// through the predecessor's release; a predecessor without strict inbound
// (an older smeshd, emulated by leaving its strict objects out of the
// hand-over) hands over all the same, and the successor makes them.
func TestStrictHandover(t *testing.T) {
	testenv.RequirePrivileged(t)
	for _, older := range []bool{false, true} {
		t.Run(fmt.Sprintf("older=%v", older), func(t *testing.T) {
			w := newStrictWorld(t)
			strictSet := map[string]StrictOptions{w.pod.Cgroup: {ExemptPorts: []uint16{w.exempt}}}
			a := w.load(t, nil)
			if !older {
				if err := a.SetStrict(strictSet); err != nil {
					t.Fatal(err)
				}
				// One dropped dial, for the counters to carry.
				if got := dialFrom(t, w.remote, netip.AddrPortFrom(w.pod.Addr4, w.port)); got != "timeout" {
					t.Fatalf("plaintext dial to the strict pod: %q", got)
				}
			}
			a.Commit()
			before, err := a.StrictCounters()
			if err != nil {
				t.Fatal(err)
			}
			ids := strictLinkIDs(t, a)
			files, err := a.Handover()
			if err != nil {
				t.Fatal(err)
			}
			if older {
				for name, f := range files {
					if strings.HasPrefix(name, strictLinkPrefix) || slices.Contains(strictMapNames, strings.TrimPrefix(name, mapHandoverPrefix)) {
						f.Close()
						delete(files, name)
					}
				}
			}
			b := w.load(t, files)
			if err := b.SetStrict(strictSet); err != nil {
				t.Fatal(err)
			}
			b.Commit()
			if !older {
				if got := strictLinkIDs(t, b); !maps.Equal(got, ids) {
					t.Errorf("successor's strict attachments %v, want the predecessor's %v", got, ids)
				}
			}
			if err := a.Release(); err != nil {
				t.Fatal(err)
			}
			w.check(t, true)
			after, err := b.StrictCounters()
			if err != nil {
				t.Fatal(err)
			}
			if after.Dropped < before.Dropped+8 {
				t.Errorf("strict drops: %d before the hand-over, %d after; want the count carried on and 8 more", before.Dropped, after.Dropped)
			}
		})
	}
}
