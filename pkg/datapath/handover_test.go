package datapath

import (
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/bpf/connect"
	"github.com/smesh-dev/smesh/bpf/skmsg"
	"github.com/smesh-dev/smesh/bpf/sockops"
	"github.com/smesh-dev/smesh/bpf/strict"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// countingListener accepts on loopback and counts the connections.
type countingListener struct {
	addr netip.AddrPort
	n    atomic.Int64
}

func listenCounting(t *testing.T) *countingListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	l := &countingListener{addr: ln.Addr().(*net.TCPAddr).AddrPort()}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			l.n.Add(1)
			c.Close()
		}
	}()
	return l
}

// waitFor waits until cond holds, for at most 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("waiting for %s: timed out", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// ownNetnsCookie is the cookie of the test's network namespace, where the
// helpers run too.
func ownNetnsCookie(t *testing.T) uint64 {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		t.Fatal(err)
	}
	return cookie
}

func handoverOpts(mode Mode, proxy netip.AddrPort, proxyCgroup string) Options {
	return Options{
		Mode:         mode,
		ProxyAddr:    proxy,
		ProxyAddr6:   netip.AddrPortFrom(netip.IPv6Loopback(), proxy.Port()),
		ProxyCgroup:  proxyCgroup,
		IncludeCIDRs: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")},
		MapSize:      1024,
		Logger:       zerolog.Nop(),
	}
}

// linkIDs are the ids of d's attachments, by hand-over name, and the
// programs they run.
func linkIDs(t *testing.T, d *Datapath) (ids map[string]link.ID, progs map[string]ebpf.ProgramID) {
	t.Helper()
	ids, progs = make(map[string]link.ID), make(map[string]ebpf.ProgramID)
	for a, l := range d.links {
		info, err := l.Info()
		if err != nil {
			t.Fatal(err)
		}
		ids[linkHandoverName(a.typ, a.id)] = info.ID
		progs[linkHandoverName(a.typ, a.id)] = info.Program
	}
	return ids, progs
}

// mapIDs are the ids of d's maps, by name.
func mapIDs(t *testing.T, d *Datapath) map[string]ebpf.MapID {
	t.Helper()
	out := make(map[string]ebpf.MapID)
	for name, m := range d.maps() {
		id, err := mapID(m)
		if err != nil {
			t.Fatal(err)
		}
		out[name] = id
	}
	return out
}

func progID(t *testing.T, p *ebpf.Program) ebpf.ProgramID {
	t.Helper()
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, ok := info.ID()
	if !ok {
		t.Fatal("no program id")
	}
	return id
}

func closeFiles(files map[string]*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// TestHandoverKeepsCapture: a successor adopts a running Datapath's maps
// and links (open mode) while a process in an enrolled cgroup connects in
// a loop: every connect, before, during and after the swap and after the
// predecessor's release, is captured (reaches the proxy listener), none
// goes to its destination directly. The links are the same (updated, never
// detached), so are the maps, and the namespace the predecessor registered
// stays registered.
func TestHandoverKeepsCapture(t *testing.T) {
	testenv.RequirePrivileged(t)
	proxyCg, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
	proxy, direct := listenCounting(t), listenCounting(t)
	opts := handoverOpts(ModeCopy, proxy.addr, proxyCg)
	cookie := ownNetnsCookie(t)

	a := predecessor(t, opts, app)
	if err := a.SetNamespace(cookie, nil, true, true); err != nil {
		t.Fatal(err)
	}

	loop := testenv.StartHelper(t, app, "", "connect-loop", direct.addr.String())
	waitFor(t, "connects captured by the predecessor", func() bool { return proxy.n.Load() >= 100 })

	aLinks, aProgs := linkIDs(t, a)
	aMaps := mapIDs(t, a)
	files, err := a.Handover()
	if err != nil {
		t.Fatal(err)
	}
	b := successor(t, opts, files)
	err = b.SetCapture([]string{app}, opts.IncludeCIDRs, nil, nil)
	left := slices.Sorted(maps.Keys(files))
	closeFiles(files)
	if err != nil {
		t.Fatal(err)
	}
	b.Commit()
	if len(left) != 0 {
		t.Errorf("Load and SetCapture left %v of the hand-over unused", left)
	}
	atSwap := proxy.n.Load()
	if err := a.Release(); err != nil {
		t.Fatal(err)
	}
	// Counted wherever they went: the check below says how many were not
	// captured.
	waitFor(t, "connects after the release", func() bool { return proxy.n.Load()+direct.n.Load() >= atSwap+100 })

	bLinks, bProgs := linkIDs(t, b)
	if !reflect.DeepEqual(bLinks, aLinks) {
		t.Errorf("links after the hand-over %v, want the predecessor's %v (adopted, not attached anew)", bLinks, aLinks)
	}
	for name, id := range bProgs {
		if id == aProgs[name] {
			t.Errorf("%s still runs the predecessor's program %d", name, id)
		}
	}
	if got := mapIDs(t, b); !reflect.DeepEqual(got, aMaps) {
		t.Errorf("maps after the hand-over %v, want the predecessor's %v", got, aMaps)
	}
	var ready uint8
	if err := b.sockops.SmeshNetns.Lookup(cookie, &ready); err != nil || ready != netnsReady4|netnsReady6 {
		t.Errorf("the predecessor's namespace after the hand-over: %d, %v; want it ready", ready, err)
	}
	for _, typ := range attachOrder {
		if typ == ebpf.AttachCGroupGetsockopt {
			continue // on the proxy's cgroup only
		}
		if n := testenv.AttachedPrograms(t, app, typ); n != 1 {
			t.Errorf("%d %s programs on the enrolled cgroup after the hand-over, want 1", n, typ)
		}
	}

	if err := loop.Send("stop"); err != nil {
		t.Fatal(err)
	}
	line, err := loop.ReadLine(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var ok, failed int64
	if _, err := fmt.Sscanf(line, "ok %d failed %d", &ok, &failed); err != nil {
		t.Fatalf("connect loop said %q: %v", line, err)
	}
	waitFor(t, "the proxy to accept the last connects", func() bool { return proxy.n.Load() >= ok })
	t.Logf("%d connects, %d of them after the swap", ok, ok-atSwap)
	if failed != 0 || direct.n.Load() != 0 || proxy.n.Load() != ok {
		t.Errorf("%d connects: %d failed, %d uncaptured, %d captured; want all captured", ok+failed, failed, direct.n.Load(), proxy.n.Load())
	}

	// b holds the capture alone now: closing it detaches it.
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if n := programs(t, app); len(n) != 0 {
		t.Errorf("programs left on the enrolled cgroup after the successor closed: %v", n)
	}
}

// TestHandoverKeepsSplicedConnection: a connection spliced under the
// predecessor goes on carrying bytes (all checked) after the successor
// adopted the sockhash and the predecessor released, and a connection
// made after the release is spliced by the successor's sk_msg program,
// which replaced the predecessor's.
func TestHandoverKeepsSplicedConnection(t *testing.T) {
	testenv.RequirePrivileged(t)
	proxyCg, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
	opts := handoverOpts(ModeSplice, netip.MustParseAddrPort("127.0.0.1:18000"), proxyCg)
	a := predecessor(t, opts, app)

	pair := testenv.StartHelper(t, app, "", "splice-pair")
	ping := func(when string) {
		t.Helper()
		if err := pair.Send("ping"); err != nil {
			t.Fatal(err)
		}
		if line, err := pair.ReadLine(20 * time.Second); err != nil || line != "ok" {
			t.Fatalf("exchange %s: %q, %v", when, line, err)
		}
	}
	if line, err := pair.ReadLine(10 * time.Second); err != nil || line != "ready" {
		t.Fatalf("splice pair: %q, %v", line, err)
	}
	ping("under the predecessor")
	if n, err := a.SplicedSockets(); err != nil || n != 2 {
		t.Fatalf("%d sockets in the sockhash, %v: want the pair's two, spliced", n, err)
	}
	before, err := a.Stats()
	if err != nil {
		t.Fatal(err)
	}

	files, err := a.Handover()
	if err != nil {
		t.Fatal(err)
	}
	b := successor(t, opts, files)
	err = b.SetCapture([]string{app}, opts.IncludeCIDRs, nil, nil)
	closeFiles(files)
	if err != nil {
		t.Fatal(err)
	}
	b.Commit()
	if got, err := skMsgProgram(b.sockops.SmeshSockhash); err != nil || got != progID(t, b.msg) {
		t.Errorf("sk_msg program of the sockhash: %d, %v; want the successor's %d (replaced)", got, err, progID(t, b.msg))
	}
	if err := a.Release(); err != nil {
		t.Fatal(err)
	}

	ping("after the predecessor released")
	after, err := b.Stats()
	if err != nil {
		t.Fatal(err)
	}
	// Two 256 KiB transfers, both spliced (by the predecessor's program,
	// which the pair's sockets hold, counting into the shared map).
	if got := after.Bytes() - before.Bytes(); got != 2*256<<10 {
		t.Errorf("%d bytes spliced after the release, want %d", got, 2*256<<10)
	}

	// A new connection is spliced by the successor's program.
	pair2 := testenv.StartHelper(t, app, "", "splice-pair")
	if line, err := pair2.ReadLine(10 * time.Second); err != nil || line != "ready" {
		t.Fatalf("second splice pair: %q, %v", line, err)
	}
	if err := pair2.Send("ping"); err != nil {
		t.Fatal(err)
	}
	if line, err := pair2.ReadLine(20 * time.Second); err != nil || line != "ok" {
		t.Fatalf("exchange of a connection made after the release: %q, %v", line, err)
	}
	if n, err := b.SplicedSockets(); err != nil || n != 4 {
		t.Errorf("%d sockets in the sockhash, %v: want both pairs'", n, err)
	}
	ping("at the end")
}

// TestHandoverPinned: in closed mode the successor takes the pin
// directory's lock from the hand-over (without it, the directory is in use)
// and adopts the pinned capture; the predecessor's release unpins nothing,
// nor does the successor's Close once committed.
func TestHandoverPinned(t *testing.T) {
	testenv.RequirePrivileged(t)
	pinDir := testBPFFS(t)
	own, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
	t.Cleanup(func() { RemovePins(pinDir) })
	opts := pinOpts(pinDir, own)
	a := predecessor(t, opts, app)
	const cookie = 4242 // a namespace the predecessor serves
	if err := a.SetNamespace(cookie, []netip.Addr{netip.MustParseAddr("198.18.0.7")}, true, false); err != nil {
		t.Fatal(err)
	}
	pinsBefore := names(t, pinDir)
	aLinks, _ := linkIDs(t, a)

	if b, err := Load(opts); err == nil || !strings.Contains(err.Error(), "in use by another smeshd") {
		if b != nil {
			b.Close()
		}
		t.Fatalf("Load without the hand-over's lock: %v, want the directory in use", err)
	}

	files, err := a.Handover()
	if err != nil {
		t.Fatal(err)
	}
	if files[lockName] == nil {
		t.Fatalf("the hand-over of a pinned capture has no %q", lockName)
	}
	b := successor(t, opts, files)
	err = b.SetCapture([]string{app}, opts.IncludeCIDRs, nil, nil)
	closeFiles(files)
	if err != nil {
		t.Fatal(err)
	}
	b.Commit()
	if err := a.Release(); err != nil {
		t.Fatal(err)
	}
	if got := names(t, pinDir); !reflect.DeepEqual(got, pinsBefore) {
		t.Errorf("pins after the release %v, want %v", got, pinsBefore)
	}
	if bLinks, _ := linkIDs(t, b); !reflect.DeepEqual(bLinks, aLinks) {
		t.Errorf("links after the hand-over %v, want the predecessor's %v", bLinks, aLinks)
	}
	var ready uint8
	if err := b.sockops.SmeshNetns.Lookup(uint64(cookie), &ready); err != nil || ready != netnsReady4 {
		t.Errorf("the predecessor's namespace after the hand-over: %d, %v; want it ready", ready, err)
	}
	// The successor holds the lock: a third smeshd finds it in use.
	if c, err := Load(opts); err == nil || !strings.Contains(err.Error(), "in use by another smeshd") {
		if c != nil {
			c.Close()
		}
		t.Errorf("Load beside the successor: %v, want the directory in use", err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if got := names(t, pinDir); !reflect.DeepEqual(got, pinsBefore) {
		t.Errorf("pins after the successor closed %v, want %v", got, pinsBefore)
	}
	if n := testenv.AttachedPrograms(t, app, ebpf.AttachCGroupInet4Connect); n != 1 {
		t.Errorf("%d connect4 programs after the successor closed, want the pinned one", n)
	}
}

// TestHandoverIncompatibleMap: a successor handed a map whose layout is
// not its programs' (another build's value struct) makes that map anew
// (empty: nothing of another layout can be copied) and adopts the rest;
// the predecessor goes on working until it releases.
func TestHandoverIncompatibleMap(t *testing.T) {
	testenv.RequirePrivileged(t)
	proxyCg, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
	opts := handoverOpts(ModeSplice, netip.MustParseAddrPort("127.0.0.1:18000"), proxyCg)
	a := predecessor(t, opts, app)
	aMaps := mapIDs(t, a)

	files, err := a.Handover()
	if err != nil {
		t.Fatal(err)
	}
	defer closeFiles(files)
	// smesh_netns as another version might have it: a wider value.
	other, err := ebpf.NewMap(&ebpf.MapSpec{Name: "smesh_netns", Type: ebpf.Hash, KeySize: 8, ValueSize: 16, MaxEntries: 64})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if err := other.Put(uint64(7), make([]byte, 16)); err != nil {
		t.Fatal(err)
	}
	f, err := dupFile(other.FD(), "map/smesh_netns")
	if err != nil {
		t.Fatal(err)
	}
	files[mapHandoverName("smesh_netns")].Close()
	files[mapHandoverName("smesh_netns")] = f
	bOpts := opts
	bOpts.Adopt = files
	b, err := Load(bOpts)
	if err != nil {
		t.Fatalf("Load with a map of another layout handed over: %v", err)
	}
	defer b.Close()
	for name, id := range mapIDs(t, b) {
		if (name == "smesh_netns") == (id == aMaps[name]) {
			t.Errorf("map %s: id %d, the predecessor's %d; want only smesh_netns made anew", name, id, aMaps[name])
		}
	}
	var v uint8
	if err := b.sockops.SmeshNetns.Lookup(uint64(7), &v); err == nil {
		t.Errorf("an entry of the old layout was copied into smesh_netns")
	}
	// The predecessor is untouched (nothing switched yet) and works.
	if err := a.SetNamespace(ownNetnsCookie(t), nil, true, true); err != nil {
		t.Errorf("the predecessor after the successor's load: %v", err)
	}
}

// TestHandoverFailedStartGivesBack: a successor that adopted the capture
// and then closes without Commit (its start failed) gives the predecessor,
// which keeps serving, its programs back: links and sk_msg.
func TestHandoverFailedStartGivesBack(t *testing.T) {
	testenv.RequirePrivileged(t)
	proxyCg, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
	opts := handoverOpts(ModeSplice, netip.MustParseAddrPort("127.0.0.1:18000"), proxyCg)
	a := predecessor(t, opts, app)
	aLinks, aProgs := linkIDs(t, a)

	files, err := a.Handover()
	if err != nil {
		t.Fatal(err)
	}
	bOpts := opts
	bOpts.Adopt = files
	b, err := Load(bOpts)
	if err != nil {
		closeFiles(files)
		t.Fatal(err)
	}
	err = b.SetCapture([]string{app}, opts.IncludeCIDRs, nil, nil)
	closeFiles(files)
	if err != nil {
		b.Close()
		t.Fatal(err)
	}
	if _, bProgs := linkIDs(t, b); reflect.DeepEqual(bProgs, aProgs) {
		t.Fatal("the successor's programs were not swapped in")
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if got, gotProgs := linkIDs(t, a); !reflect.DeepEqual(got, aLinks) || !reflect.DeepEqual(gotProgs, aProgs) {
		t.Errorf("predecessor's links %v running %v after the successor's failed start, want %v running %v", got, gotProgs, aLinks, aProgs)
	}
	if got, err := skMsgProgram(a.sockops.SmeshSockhash); err != nil || got != progID(t, a.msg) {
		t.Errorf("sk_msg program %d, %v after the successor's failed start, want the predecessor's %d", got, err, progID(t, a.msg))
	}
}

// TestHandoverNamesEverything: Handover hands over every map of the BPF
// objects (as their specs declare them) and every attachment, each under
// its name and each a descriptor of the object it names.
func TestHandoverNamesEverything(t *testing.T) {
	testenv.RequirePrivileged(t)
	proxyCg, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
	opts := handoverOpts(ModeSplice, netip.MustParseAddrPort("127.0.0.1:18000"), proxyCg)
	opts.SpliceProxyHops = true // sock_ops on the proxy's cgroup too
	d, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	if err := d.SetCapture([]string{app}, opts.IncludeCIDRs, nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := d.SetStrict(map[string]StrictOptions{app: {}}); err != nil {
		t.Fatal(err)
	}
	files, err := d.Handover()
	if err != nil {
		t.Fatal(err)
	}
	defer closeFiles(files)

	want := make(map[string]bool)
	var specMaps []string
	for _, load := range []func() (*ebpf.CollectionSpec, error){sockops.LoadSockops, connect.LoadConnect, skmsg.LoadSkmsg, strict.LoadStrict} {
		spec, err := load()
		if err != nil {
			t.Fatal(err)
		}
		for name := range spec.Maps {
			if !strings.HasPrefix(name, ".") {
				want[mapHandoverName(name)] = true
				specMaps = append(specMaps, name)
			}
		}
	}
	if len(d.links) != 2+4+1 { // proxy: getsockopt, sock_ops; app: sock_ops, getpeername4/6, connect4/6
		t.Errorf("%d attachments, want 7", len(d.links))
	}
	for a := range d.links {
		want[linkHandoverName(a.typ, a.id)] = true
	}
	if len(d.strictLinks) != 3 { // proxy, app: strict sock_ops; app: ingress
		t.Errorf("%d strict attachments, want 3", len(d.strictLinks))
	}
	for a := range d.strictLinks {
		want[strictLinkName(a.typ, a.id)] = true
	}
	want[lockName] = false // not pinned
	for name, w := range want {
		if _, got := files[name]; got != w {
			t.Errorf("hand-over has %s: %v, want %v", name, got, w)
		}
	}
	for name := range files {
		if !want[name] {
			t.Errorf("hand-over has %s, which is no map or attachment of the data path", name)
		}
	}

	// Each descriptor is the object its name says, and a copy of ours.
	ids := mapIDs(t, d)
	for _, name := range specMaps {
		f := files[mapHandoverName(name)]
		if f == nil {
			continue
		}
		fd, err := unix.Dup(int(f.Fd()))
		if err != nil {
			t.Fatal(err)
		}
		m, err := ebpf.NewMapFromFD(fd)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		id, err := mapID(m)
		m.Close()
		if err != nil || id != ids[name] {
			t.Errorf("map/%s is map %d, %v; want %d", name, id, err, ids[name])
		}
	}
	linkIDsByName, _ := linkIDs(t, d)
	for a, l := range d.strictLinks {
		info, err := l.Info()
		if err != nil {
			t.Fatal(err)
		}
		linkIDsByName[strictLinkName(a.typ, a.id)] = info.ID
	}
	for name, want := range linkIDsByName {
		fd, err := unix.Dup(int(files[name].Fd()))
		if err != nil {
			t.Fatal(err)
		}
		l, err := link.NewFromFD(fd)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil || info.ID != want {
			t.Errorf("%s is link %v, %v; want %d", name, info, err, want)
		}
	}
}

// successor loads opts adopting files, a predecessor's Handover, as a
// successor does; it is closed at the test's end.
func successor(t *testing.T, opts Options, files map[string]*os.File) *Datapath {
	t.Helper()
	opts.Adopt = files
	b, err := Load(opts)
	if err != nil {
		closeFiles(files)
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// predecessor loads the data path of opts as a running smeshd would have
// it: capturing the cgroup app, committed. It is closed at the test's end.
func predecessor(t *testing.T, opts Options, app string) *Datapath {
	t.Helper()
	d, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	if err := d.SetCapture([]string{app}, opts.IncludeCIDRs, nil, nil); err != nil {
		t.Fatal(err)
	}
	d.Commit()
	return d
}
