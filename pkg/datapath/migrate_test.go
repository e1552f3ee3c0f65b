package datapath

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// The maps datapath.map_size sizes: a change of it remakes them.
var sizedMaps = []string{"smesh_dirs", "smesh_orig_dst", "smesh_sockhash"}

// TestHandoverMapSizeChanged: a successor whose map_size differs from
// its predecessor's takes over while a process in an enrolled cgroup
// connects from 64 threads without pause: the three maps map_size sizes are
// made anew (bigger), every other map is adopted, and every connect,
// before, during and after the swap, is captured and answered by a proxy
// that asks SO_ORIGINAL_DST 100 ms after it accepted: the connections
// established before the successor's load (first copy), those established
// between its load and its SetCapture (the copy after the sock_ops
// switch), and those waiting in the proxy's accept queue across the swap
// (the proxy stops accepting for a while) are all answered. Open and
// closed (pinned) mode; in closed mode the new maps replace the old pins
// at Commit.
func TestHandoverMapSizeChanged(t *testing.T) {
	for _, pinned := range []bool{false, true} {
		t.Run(map[bool]string{false: "open", true: "pinned"}[pinned], func(t *testing.T) {
			testenv.RequirePrivileged(t)
			proxyCg, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
			direct := listenCounting(t)
			px, proxyAddr := startOrigDstProxy(t, proxyCg, direct.addr)
			opts := handoverOpts(ModeCopy, proxyAddr, proxyCg)
			if pinned {
				pinDir := testBPFFS(t)
				t.Cleanup(func() { RemovePins(pinDir) })
				opts.PinDir, opts.FailClosed = pinDir, true
			}
			cookie := ownNetnsCookie(t)
			a := predecessor(t, opts, app)
			if err := a.SetNamespace(cookie, nil, true, true); err != nil {
				t.Fatal(err)
			}
			aMaps := mapIDs(t, a)

			loop := testenv.StartHelper(t, app, "", "connect-hold", direct.addr.String())
			waitFor(t, "connects answered under the predecessor", func() bool { ok, _ := px.count(t); return ok >= 200 })
			px.send(t, "pause", "paused")
			time.Sleep(50 * time.Millisecond) // connections queue
			px.send(t, "resume", "resumed")

			bOpts := opts
			bOpts.MapSize = 2 * opts.MapSize
			b := takeOver(t, a, bOpts, app, 100*time.Millisecond)
			if err := a.Release(); err != nil {
				t.Fatal(err)
			}
			okAtSwap, _ := px.count(t)
			waitFor(t, "connects answered after the swap", func() bool { ok, _ := px.count(t); return ok >= okAtSwap+500 })

			bMaps := mapIDs(t, b)
			for name, id := range bMaps {
				remade := slices.Contains(sizedMaps, name)
				if remade == (id == aMaps[name]) {
					t.Errorf("map %s: id %d, the predecessor's %d; want it remade: %v", name, id, aMaps[name], remade)
				}
			}
			if got := b.sockops.SmeshOrigDst.MaxEntries(); got != bOpts.MapSize {
				t.Errorf("smesh_orig_dst has %d entries, want map_size %d", got, bOpts.MapSize)
			}
			var ready uint8
			if err := b.sockops.SmeshNetns.Lookup(cookie, &ready); err != nil || ready != netnsReady4|netnsReady6 {
				t.Errorf("the predecessor's namespace after the hand-over: %d, %v; want it ready", ready, err)
			}
			if pinned {
				for _, name := range sizedMaps {
					m, err := ebpf.LoadPinnedMap(filepath.Join(opts.PinDir, name), nil)
					if err != nil {
						t.Fatal(err)
					}
					id, _ := mapID(m)
					m.Close()
					if id != bMaps[name] {
						t.Errorf("pinned %s is map %d, want the successor's %d", name, id, bMaps[name])
					}
				}
				if got := names(t, opts.PinDir); slices.ContainsFunc(got, func(n string) bool { return strings.HasPrefix(n, "tmp_") }) {
					t.Errorf("temporary pins left: %v", got)
				}
			}
			checkLoop(t, loop, px, direct)
		})
	}
}

// TestHandoverMapSizeChangedFailedStart: a successor with another
// map_size that switched every link and then fails (closes without
// Commit) gives the predecessor its programs back, and the connections
// established meanwhile (their original destinations in the successor's
// new smesh_orig_dst) are answered by the predecessor's getsockopt: they
// are copied back.
func TestHandoverMapSizeChangedFailedStart(t *testing.T) {
	testenv.RequirePrivileged(t)
	proxyCg, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
	direct := listenCounting(t)
	px, proxyAddr := startOrigDstProxy(t, proxyCg, direct.addr)
	opts := handoverOpts(ModeCopy, proxyAddr, proxyCg)
	a := predecessor(t, opts, app)
	if err := a.SetNamespace(ownNetnsCookie(t), nil, true, true); err != nil {
		t.Fatal(err)
	}
	_, aProgs := linkIDs(t, a)
	loop := testenv.StartHelper(t, app, "", "connect-hold", direct.addr.String())
	waitFor(t, "connects answered under the predecessor", func() bool { ok, _ := px.count(t); return ok >= 200 })

	files, err := a.Handover()
	if err != nil {
		t.Fatal(err)
	}
	bOpts := opts
	bOpts.MapSize = 2 * opts.MapSize
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
	// Connections established under the successor's sock_ops wait.
	px.send(t, "pause", "paused")
	time.Sleep(50 * time.Millisecond)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if _, got := linkIDs(t, a); !maps.Equal(got, aProgs) {
		t.Errorf("predecessor's links run %v after the successor's failed start, want %v", got, aProgs)
	}
	px.send(t, "resume", "resumed")
	okAt, _ := px.count(t)
	waitFor(t, "connects answered after the failed start", func() bool { ok, _ := px.count(t); return ok >= okAt+300 })
	checkLoop(t, loop, px, direct)
}

// TestHandoverMapSizeKeepsSplicedConnection: a connection spliced under
// the predecessor keeps being spliced (by its sockets' old sk_msg program
// into the old sockhash, which they hold) after a successor with another
// map_size made a new sockhash, and one made after the swap is spliced
// in the new sockhash.
func TestHandoverMapSizeKeepsSplicedConnection(t *testing.T) {
	testenv.RequirePrivileged(t)
	proxyCg, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
	opts := handoverOpts(ModeSplice, netip.MustParseAddrPort("127.0.0.1:18000"), proxyCg)
	a := predecessor(t, opts, app)
	pair := startPair(t, app)
	pair.ping(t, "under the predecessor")
	before, err := a.Stats()
	if err != nil {
		t.Fatal(err)
	}
	bOpts := opts
	bOpts.MapSize = 2 * opts.MapSize
	b := takeOver(t, a, bOpts, app, 0)
	if err := a.Release(); err != nil {
		t.Fatal(err)
	}
	if b.sockops.SmeshSockhash.MaxEntries() != bOpts.MapSize {
		t.Fatalf("the successor's sockhash has %d entries, want a new one of %d", b.sockops.SmeshSockhash.MaxEntries(), bOpts.MapSize)
	}
	pair.ping(t, "after the predecessor released")
	after, err := b.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if got := after.Bytes() - before.Bytes(); got != 2*256<<10 {
		t.Errorf("%d bytes spliced after the release, want %d (the old pair still spliced)", got, 2*256<<10)
	}
	pair2 := startPair(t, app)
	pair2.ping(t, "of a pair made after the swap")
	if n, err := b.SplicedSockets(); err != nil || n != 2 {
		t.Errorf("%d sockets in the new sockhash, %v: want the new pair's 2", n, err)
	}
	if got, err := b.Stats(); err != nil || got.Bytes()-after.Bytes() != 2*256<<10 {
		t.Errorf("the new pair spliced %d bytes, %v; want %d", got.Bytes()-after.Bytes(), err, 2*256<<10)
	}
	pair.ping(t, "at the end")
}

// takeOver makes a successor of a with opts (a's Handover adopted),
// capturing app (gap after its load), committed.
func takeOver(t *testing.T, a *Datapath, opts Options, app string, gap time.Duration) *Datapath {
	t.Helper()
	files, err := a.Handover()
	if err != nil {
		t.Fatal(err)
	}
	b := successor(t, opts, files)
	time.Sleep(gap)
	err = b.SetCapture([]string{app}, opts.IncludeCIDRs, nil, nil)
	closeFiles(files)
	if err != nil {
		t.Fatal(err)
	}
	b.Commit()
	return b
}

type origDstProxyHelper struct{ h *testenv.Helper }

func startOrigDstProxy(t *testing.T, cgroup string, want netip.AddrPort) (*origDstProxyHelper, netip.AddrPort) {
	t.Helper()
	h := testenv.StartHelper(t, cgroup, "", "origdst-proxy", want.String(), "100ms")
	line, err := h.ReadLine(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	addr, err := netip.ParseAddrPort(line)
	if err != nil {
		t.Fatalf("origdst-proxy said %q", line)
	}
	return &origDstProxyHelper{h}, addr
}

func (p *origDstProxyHelper) send(t *testing.T, cmd, want string) {
	t.Helper()
	if err := p.h.Send(cmd); err != nil {
		t.Fatal(err)
	}
	if line, err := p.h.ReadLine(10 * time.Second); err != nil || line != want {
		t.Fatalf("origdst-proxy %s: %q, %v", cmd, line, err)
	}
}

func (p *origDstProxyHelper) count(t *testing.T) (ok, failed int64) {
	t.Helper()
	if err := p.h.Send("count"); err != nil {
		t.Fatal(err)
	}
	line, err := p.h.ReadLine(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fmt.Sscanf(line, "ok %d failed %d", &ok, &failed); err != nil {
		t.Fatalf("origdst-proxy said %q", line)
	}
	return ok, failed
}

// checkLoop stops the connect-hold loop and checks that every connect was
// captured and answered with its original destination.
func checkLoop(t *testing.T, loop *testenv.Helper, px *origDstProxyHelper, direct *countingListener) {
	t.Helper()
	if err := loop.Send("stop"); err != nil {
		t.Fatal(err)
	}
	line, err := loop.ReadLine(30 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var ok, failed int64
	if _, err := fmt.Sscanf(line, "ok %d failed %d", &ok, &failed); err != nil {
		t.Fatalf("connect loop said %q: %v", line, err)
	}
	pok, pfailed := px.count(t)
	t.Logf("%d connects answered, %d failed; proxy: %d with the original destination, %d without", ok, failed, pok, pfailed)
	if failed != 0 || pfailed != 0 || direct.n.Load() != 0 || pok != ok {
		t.Errorf("%d connects failed, %d uncaptured, %d without SO_ORIGINAL_DST (stderr: %.500s); want none",
			failed, direct.n.Load(), pfailed, px.h.Stderr())
	}
}

type splicePairHelper struct{ h *testenv.Helper }

func startPair(t *testing.T, app string) *splicePairHelper {
	t.Helper()
	h := testenv.StartHelper(t, app, "", "splice-pair")
	if line, err := h.ReadLine(10 * time.Second); err != nil || line != "ready" {
		t.Fatalf("splice pair: %q, %v", line, err)
	}
	return &splicePairHelper{h}
}

func (p *splicePairHelper) ping(t *testing.T, when string) {
	t.Helper()
	if err := p.h.Send("ping"); err != nil {
		t.Fatal(err)
	}
	if line, err := p.h.ReadLine(20 * time.Second); err != nil || line != "ok" {
		t.Fatalf("exchange %s: %q, %v", when, line, err)
	}
}

// TestPinnedMapSizeChanged: in closed mode a smeshd that starts after
// its predecessor died (no hand-over: the pins are all there is) with
// another map_size makes the sized maps anew instead of refusing to
// start, copies smesh_orig_dst and the rules, and pins the new maps over
// the old ones at Commit; the pinned connect4 captured all along.
func TestPinnedMapSizeChanged(t *testing.T) {
	testenv.RequirePrivileged(t)
	pinDir := testBPFFS(t)
	own, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
	t.Cleanup(func() { RemovePins(pinDir) })
	opts := pinOpts(pinDir, own)
	a := predecessor(t, opts, app)
	aMaps := mapIDs(t, a)
	// It dies: its pins stay, so does the capture.
	if err := a.Release(); err != nil {
		t.Fatal(err)
	}
	bOpts := opts
	bOpts.MapSize = 2 * opts.MapSize
	b, err := Load(bOpts)
	if err != nil {
		t.Fatalf("Load over pins of another map_size: %v", err)
	}
	t.Cleanup(func() { b.Close() })
	if err := b.SetCapture([]string{app}, opts.IncludeCIDRs, nil, nil); err != nil {
		t.Fatal(err)
	}
	b.Commit()
	bMaps := mapIDs(t, b)
	for name, id := range bMaps {
		if slices.Contains(sizedMaps, name) == (id == aMaps[name]) {
			t.Errorf("map %s: id %d, the earlier run's %d", name, id, aMaps[name])
		}
	}
	for _, name := range sizedMaps {
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, name), nil)
		if err != nil {
			t.Fatal(err)
		}
		id, _ := mapID(m)
		max := m.MaxEntries()
		m.Close()
		if id != bMaps[name] || max != bOpts.MapSize {
			t.Errorf("pinned %s is map %d of %d entries, want the new %d of %d", name, id, max, bMaps[name], bOpts.MapSize)
		}
	}
	if got := names(t, pinDir); slices.ContainsFunc(got, func(n string) bool { return strings.HasPrefix(n, "tmp_") }) {
		t.Errorf("temporary pins left: %v", got)
	}
	if n := testenv.AttachedPrograms(t, app, ebpf.AttachCGroupInet4Connect); n != 1 {
		t.Errorf("%d connect4 programs, want the pinned one", n)
	}
}

// TestHandoverRemadeMapsKeepContents: maps of another size (as an older
// build's: one counter slot fewer, smaller rule maps) are made anew with
// their entries copied: counters carry over, and what the old programs
// count between the load and the switch is added once the links switched;
// rules (an LPM trie, a hash) are there before any link is switched.
func TestHandoverRemadeMapsKeepContents(t *testing.T) {
	testenv.RequirePrivileged(t)
	proxyCg, app := testenv.NewCgroup(t), testenv.NewCgroup(t)
	opts := handoverOpts(ModeCopy, netip.MustParseAddrPort("127.0.0.1:18000"), proxyCg)
	a := predecessor(t, opts, app)
	files, err := a.Handover()
	if err != nil {
		t.Fatal(err)
	}
	defer closeFiles(files)
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	counters, err := ebpf.NewMap(&ebpf.MapSpec{Name: "smesh_counters", Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 8, MaxEntries: 9})
	if err != nil {
		t.Fatal(err)
	}
	defer counters.Close()
	perCPU := func(first, rest uint64) []uint64 {
		v := make([]uint64, ncpu)
		for i := range v {
			v[i] = rest
		}
		v[0] = first
		return v
	}
	if err := errors.Join(counters.Put(uint32(0), perCPU(1, 1)), counters.Put(uint32(4), perCPU(5, 0))); err != nil {
		t.Fatal(err)
	}
	include, err := ebpf.NewMap(&ebpf.MapSpec{Name: "smesh_include", Type: ebpf.LPMTrie, KeySize: 20, ValueSize: 1, MaxEntries: 16, Flags: unix.BPF_F_NO_PREALLOC})
	if err != nil {
		t.Fatal(err)
	}
	defer include.Close()
	ten := lpmKey(netip.MustParsePrefix("10.0.0.0/8"))
	if err := include.Put(ten, uint8(1)); err != nil {
		t.Fatal(err)
	}
	ports, err := ebpf.NewMap(&ebpf.MapSpec{Name: "smesh_exclude_ports", Type: ebpf.Hash, KeySize: 4, ValueSize: 1, MaxEntries: 16})
	if err != nil {
		t.Fatal(err)
	}
	defer ports.Close()
	if err := ports.Put(uint32(22), uint8(1)); err != nil {
		t.Fatal(err)
	}
	for name, m := range map[string]*ebpf.Map{"smesh_counters": counters, "smesh_include": include, "smesh_exclude_ports": ports} {
		f, err := dupFile(m.FD(), name)
		if err != nil {
			t.Fatal(err)
		}
		files[mapHandoverName(name)].Close()
		files[mapHandoverName(name)] = f
	}
	bOpts := opts
	bOpts.Adopt = files
	b, err := Load(bOpts)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	c, err := b.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if c.UnreadyOpen != uint64(ncpu) || c.SplicedConns != 5 {
		t.Errorf("counters after the load: unready_open %d, spliced %d; want the old %d and 5", c.UnreadyOpen, c.SplicedConns, ncpu)
	}
	var v uint8
	if err := b.connect.SmeshInclude.Lookup(ten, &v); err != nil {
		t.Errorf("include_cidrs' 10.0.0.0/8 not copied: %v", err)
	}
	if err := b.connect.SmeshExcludePorts.Lookup(uint32(22), &v); err != nil {
		t.Errorf("exclude_ports' 22 not copied: %v", err)
	}
	// The old programs count on until the switch.
	if err := counters.Put(uint32(0), perCPU(4, 1)); err != nil {
		t.Fatal(err)
	}
	if err := b.SetCapture([]string{app}, opts.IncludeCIDRs, nil, nil); err != nil {
		t.Fatal(err)
	}
	if c, err = b.Counters(); err != nil || c.UnreadyOpen != uint64(ncpu)+3 {
		t.Errorf("unready_open after the switch: %d, %v; want the old %d (3 counted between load and switch)", c.UnreadyOpen, err, ncpu+3)
	}
}
