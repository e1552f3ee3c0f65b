// Package enrol knows who is in the mesh: the cgroups [capture] cgroups
// enrols, the network namespaces their processes live in, and smeshd's
// service (its listeners) inside each of those namespaces.
//
// Capture happens where the app is: connect4 sends a captured connection to
// [outbound] listen in the caller's own namespace (every pod has its own
// 127.0.0.1), so smeshd keeps a listener in every namespace an enrolled
// process lives in, and tells connect4 which namespaces have one
// (Maps.SetNamespace, ready). It also keeps every namespace's addresses in
// the programs' maps: that is how a same-node hop across namespaces finds the
// namespace of its peer, and how a destination is known to be on this node.
//
// Namespaces are found by scanning the enrolled cgroup trees: at once when
// inotify reports a cgroup created, removed or (un)populated, when connect4
// reports a connect() from a namespace without a listener, and every
// ScanInterval as a safety net (a process can join a populated cgroup, or
// change namespace, without any cgroup event). A namespace whose last
// enrolled process is gone is closed.
package enrol

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// Maps is what the kernel data path is told of each namespace
// (datapath.Datapath implements it).
type Maps interface {
	SetNamespace(cookie uint64, addrs []netip.Addr, ready4, ready6 bool) error
	RemoveNamespace(cookie uint64) error
}

// CgroupsWatcher is Maps that wants to know when the cgroups of a
// namespace's enrolled processes changed, addresses or not (a workload's
// processes that joined or left a namespace: Info.Cgroups).
type CgroupsWatcher interface {
	CgroupsChanged()
}

// Service is what smeshd runs inside one namespace: its listeners.
type Service interface {
	// SetAddrs is called with the namespace's addresses whenever they
	// change (the tunnel delivers only to them).
	SetAddrs(addrs []netip.Addr)
	// Ready says which outbound listeners are up: IPv4 (for IPv4 and
	// v4-mapped destinations) and IPv6.
	Ready() (v4, v6 bool)
	Close() error
}

// Options configure a Tracker.
type Options struct {
	// Cgroups are the enrolled cgroup directories (whole trees).
	Cgroups []string
	// Open starts smeshd's service in a namespace found in the cgroups.
	// Until it succeeds, connect4 does not capture there.
	Open func(ns *Namespace) (Service, error)
	// Own is the service of smeshd's own namespace, opened by the caller;
	// it stays until Close, whether enrolled processes live there or not.
	Own  Service
	Maps Maps
	// NodeAddrs, if set, is called with every address of every namespace
	// whenever that set changes: the addresses that are on this node.
	NodeAddrs func([]netip.Addr)
	// Wake makes the tracker scan at once (connect4's namespace events).
	Wake <-chan struct{}
	// ScanInterval is the safety-net scan period; 0 means 5s.
	ScanInterval time.Duration
	Logger       zerolog.Logger
}

// Tracker follows the enrolled cgroups and serves their namespaces.
type Tracker struct {
	o       Options
	log     zerolog.Logger
	watcher *fsnotify.Watcher
	watched map[string]bool
	kick    chan struct{}         // a scan is wanted
	addrs   chan *Namespace       // a namespace's addresses changed
	cgroups chan setCgroups       // SetCgroups
	done    chan struct{}         // closed when Run returns
	roots   []string              // owned by Run
	own     *Namespace            // smeshd's own namespace
	scans   int                   // scans made, for tests
	scanned chan struct{}         // closed and replaced after every scan
	mu      sync.Mutex            // guards ns and scanned
	ns      map[uint64]*Namespace // by inode
	failed  map[uint64]string     // namespaces that could not be opened, with the reason (owned by Run)
}

// New opens smeshd's own namespace, scans the cgroups once and opens the
// service in every namespace found, so that the caller can attach capture
// knowing every listener is up. Run keeps it current afterwards.
func New(o Options) (_ *Tracker, err error) {
	if o.ScanInterval == 0 {
		o.ScanInterval = 5 * time.Second
	}
	t := &Tracker{
		o:       o,
		log:     o.Logger.With().Str("component", "enrol").Logger(),
		watched: make(map[string]bool),
		kick:    make(chan struct{}, 1),
		addrs:   make(chan *Namespace, 64),
		cgroups: make(chan setCgroups),
		done:    make(chan struct{}),
		roots:   slices.Clone(o.Cgroups),
		scanned: make(chan struct{}),
		ns:      make(map[uint64]*Namespace),
		failed:  make(map[uint64]string),
	}
	defer func() {
		if err != nil {
			t.closeAll()
		}
	}()
	if t.watcher, err = fsnotify.NewWatcher(); err != nil {
		return nil, fmt.Errorf("watching enrolled cgroups: %w", err)
	}
	if t.own, err = ownNamespace(); err != nil {
		return nil, err
	}
	t.own.svc = o.Own
	t.ns[t.own.Inode] = t.own
	if err := t.start(t.own); err != nil {
		return nil, err
	}
	t.scan()
	return t, nil
}

// OwnCookie is the netns cookie of smeshd's own namespace.
func (t *Tracker) OwnCookie() uint64 { return t.own.Cookie }

// Run keeps the namespaces current until ctx is done, then closes them
// all (Close).
func (t *Tracker) Run(ctx context.Context) {
	defer close(t.done)
	defer t.closeAll()
	tick := time.NewTicker(t.o.ScanInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case req := <-t.cgroups:
			t.roots = req.roots
			t.scan()
			close(req.scanned)
		case <-t.kick:
			t.scan()
		case <-t.o.Wake:
			t.scan()
		case <-tick.C:
			t.scan()
		case ev, ok := <-t.watcher.Events:
			if !ok {
				return
			}
			t.log.Trace().Str("path", ev.Name).Str("op", ev.Op.String()).Msg("cgroup event")
			t.scan()
		case err := <-t.watcher.Errors:
			// An overflowed queue loses events: scan to catch up.
			t.log.Warn().Err(err).Msg("watching enrolled cgroups")
			t.scan()
		case n := <-t.addrs:
			t.refreshAddrs(n)
		}
	}
}

// setCgroups is a SetCgroups request: Run closes scanned once it has scanned
// the new roots.
type setCgroups struct {
	roots   []string
	scanned chan struct{}
}

// SetCgroups replaces the enrolled cgroups (a reload, a pod that joins or
// leaves) and waits until they have been scanned: when it returns nil, every
// namespace a process of theirs lives in has been served (or has failed to
// be, which is logged), so capture can be attached to them next. On ctx's
// end it stops waiting; the cgroups are replaced all the same.
// It must not be called after Run returned.
func (t *Tracker) SetCgroups(ctx context.Context, cgroups []string) error {
	req := setCgroups{slices.Clone(cgroups), make(chan struct{})}
	select {
	case t.cgroups <- req:
	case <-t.done:
		return errTrackerStopped
	}
	select {
	case <-req.scanned:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-t.done:
		return errTrackerStopped
	}
}

var errTrackerStopped = errors.New("enrol: tracker stopped")

// Scan asks for a scan and waits until one has finished.
func (t *Tracker) Scan(ctx context.Context) error {
	t.mu.Lock()
	scanned := t.scanned
	t.mu.Unlock()
	select {
	case t.kick <- struct{}{}:
	default: // one is pending already
	}
	select {
	case <-scanned:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-t.done:
		return errTrackerStopped
	}
}

// Namespaces describes the namespaces served, smeshd's own first.
func (t *Tracker) Namespaces() []Info {
	t.mu.Lock()
	list := make([]*Namespace, 0, len(t.ns))
	for _, n := range t.ns {
		list = append(list, n)
	}
	t.mu.Unlock()
	infos := make([]Info, 0, len(list))
	for _, n := range list {
		infos = append(infos, n.info())
	}
	sort.Slice(infos, func(i, j int) bool {
		if infos[i].Own != infos[j].Own {
			return infos[i].Own
		}
		return infos[i].Cookie < infos[j].Cookie
	})
	return infos
}

// scan brings the namespaces in line with the cgroups: new ones are opened,
// those without an enrolled process left are closed, and those whose
// service failed to open are tried again.
func (t *Tracker) scan() {
	res, err := scan(t.roots)
	if err != nil {
		t.log.Warn().Err(err).Msg("scanning enrolled cgroups")
	}
	t.watch(res.dirs)
	changed := false
	for ino, f := range res.ns {
		n := t.get(ino)
		if n == nil {
			var oerr error
			if n, oerr = openNamespace(ino, f.pids); oerr != nil {
				t.openFailed(ino, f, oerr)
				continue
			}
			delete(t.failed, ino)
			t.mu.Lock()
			t.ns[ino] = n
			t.mu.Unlock()
			n.mu.Lock()
			n.pids, n.cgroups = f.pids, f.cgroups
			n.mu.Unlock()
			if err := t.start(n); err != nil {
				t.log.Error().Err(err).Uint64("netns", n.Cookie).Msg("serving a network namespace")
			}
			continue
		}
		n.mu.Lock()
		changed = changed || !slices.Equal(n.cgroups, f.cgroups)
		n.pids, n.cgroups = f.pids, f.cgroups
		retry := n.svc == nil
		n.mu.Unlock()
		if retry {
			t.open(n)
		}
	}
	for ino := range t.failed {
		if _, ok := res.ns[ino]; !ok {
			delete(t.failed, ino)
		}
	}
	// A failed scan may have missed processes: close nothing on it.
	if err == nil {
		for ino, n := range t.snapshot() {
			if _, ok := res.ns[ino]; !ok && !n.Own {
				t.stop(n)
			}
		}
	}
	if t.own != nil {
		t.own.mu.Lock()
		if f := res.ns[t.own.Inode]; f != nil {
			changed = changed || !slices.Equal(t.own.cgroups, f.cgroups)
			t.own.pids, t.own.cgroups = f.pids, f.cgroups
		} else {
			changed = changed || len(t.own.cgroups) > 0
			t.own.pids, t.own.cgroups = nil, nil
		}
		t.own.mu.Unlock()
	}
	if w, ok := t.o.Maps.(CgroupsWatcher); ok && changed {
		w.CgroupsChanged()
	}
	t.mu.Lock()
	t.scans++
	close(t.scanned)
	t.scanned = make(chan struct{})
	t.mu.Unlock()
}

// openFailed reports a namespace that could not be opened, once per
// namespace and reason: its processes' connections are not captured
// (on_failure decides) until it can be.
func (t *Tracker) openFailed(ino uint64, f *found, err error) {
	if errors.Is(err, errNoProcess) {
		t.log.Debug().Err(err).Uint64("inode", ino).Msg("namespace gone before it was opened")
		return
	}
	if t.failed[ino] == err.Error() {
		return
	}
	t.failed[ino] = err.Error()
	ev := t.log.Warn().Err(err).Uint64("inode", ino).Strs("cgroups", f.cgroups).Ints("pids", f.pids)
	if errors.Is(err, unix.EPERM) {
		ev = ev.Str("hint", "entering another network namespace (setns) needs CAP_SYS_ADMIN: grant it to serve "+
			"containers and pods (deploy/smeshd.service says how), or keep enrolled processes in smeshd's own namespace")
	}
	ev.Msg("cannot serve the network namespace of enrolled processes: their connections are not captured (capture.on_failure decides)")
}

func (t *Tracker) get(ino uint64) *Namespace {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.ns[ino]
}

func (t *Tracker) snapshot() map[uint64]*Namespace {
	t.mu.Lock()
	defer t.mu.Unlock()
	m := make(map[uint64]*Namespace, len(t.ns))
	for k, v := range t.ns {
		m[k] = v
	}
	return m
}

// start begins serving a namespace just opened: its addresses (watched from
// now on), then its service.
func (t *Tracker) start(n *Namespace) error {
	err := n.watchAddrs(func() {
		select {
		case t.addrs <- n:
		case <-n.stop:
		}
	})
	if err == nil {
		n.mu.Lock()
		n.addrs, err = n.listAddrs()
		n.mu.Unlock()
	}
	if err != nil {
		n.mu.Lock()
		n.openErr = err
		n.mu.Unlock()
		return err
	}
	if n.svc == nil {
		t.open(n)
	} else {
		n.svc.SetAddrs(n.Addrs())
		t.publish(n)
	}
	t.log.Info().Uint64("netns", n.Cookie).Uint64("inode", n.Inode).Bool("own", n.Own).
		Strs("cgroups", n.info().Cgroups).Str("addrs", fmt.Sprint(n.Addrs())).Bool("ready", n.info().Ready).
		Msg("serving network namespace")
	t.publishNode()
	return nil
}

// open tries to start the service in n and tells the maps the outcome.
func (t *Tracker) open(n *Namespace) {
	svc, err := t.o.Open(n)
	n.mu.Lock()
	changed := fmt.Sprint(err) != fmt.Sprint(n.openErr)
	n.svc, n.openErr = svc, err
	n.mu.Unlock()
	if err != nil && changed {
		t.log.Warn().Err(err).Uint64("netns", n.Cookie).Uint64("inode", n.Inode).
			Msg("cannot listen in network namespace; connections from it are not captured until it works (capture.on_failure decides)")
	}
	if svc != nil {
		svc.SetAddrs(n.Addrs())
	}
	t.publish(n)
}

// publish tells the maps what is known of n.
func (t *Tracker) publish(n *Namespace) {
	n.mu.Lock()
	addrs, svc := slices.Clone(n.addrs), n.svc
	n.mu.Unlock()
	var ready4, ready6 bool
	if svc != nil {
		ready4, ready6 = svc.Ready()
	}
	if err := t.o.Maps.SetNamespace(n.Cookie, addrs, ready4, ready6); err != nil {
		t.log.Error().Err(err).Uint64("netns", n.Cookie).Msg("updating the data path's namespace maps")
	}
}

// publishNode reports every address of every namespace.
func (t *Tracker) publishNode() {
	if t.o.NodeAddrs == nil {
		return
	}
	var all []netip.Addr
	for _, n := range t.snapshot() {
		all = append(all, n.Addrs()...)
	}
	slices.SortFunc(all, netip.Addr.Compare)
	t.o.NodeAddrs(slices.Compact(all))
}

// refreshAddrs re-reads n's addresses after a change.
func (t *Tracker) refreshAddrs(n *Namespace) {
	if t.get(n.Inode) != n {
		return // closed meanwhile
	}
	addrs, err := n.listAddrs()
	if err != nil {
		t.log.Warn().Err(err).Uint64("netns", n.Cookie).Msg("re-reading addresses")
		return
	}
	n.mu.Lock()
	same := slices.Equal(addrs, n.addrs)
	n.addrs = addrs
	svc := n.svc
	n.mu.Unlock()
	if same {
		return
	}
	t.log.Debug().Uint64("netns", n.Cookie).Str("addrs", fmt.Sprint(addrs)).Msg("namespace addresses changed")
	if svc != nil {
		svc.SetAddrs(addrs)
	}
	t.publish(n)
	t.publishNode()
}

// stop closes a namespace: capture there stops first, then the service.
func (t *Tracker) stop(n *Namespace) {
	if err := t.o.Maps.RemoveNamespace(n.Cookie); err != nil {
		t.log.Error().Err(err).Uint64("netns", n.Cookie).Msg("removing a namespace from the data path's maps")
	}
	n.mu.Lock()
	svc := n.svc
	n.svc = nil
	n.mu.Unlock()
	if svc != nil && !n.Own {
		if err := svc.Close(); err != nil {
			t.log.Warn().Err(err).Uint64("netns", n.Cookie).Msg("closing listeners")
		}
	}
	n.close()
	t.mu.Lock()
	delete(t.ns, n.Inode)
	t.mu.Unlock()
	t.log.Info().Uint64("netns", n.Cookie).Uint64("inode", n.Inode).Msg("no enrolled process left in network namespace: closed")
	t.publishNode()
}

// closeAll stops serving every namespace and the watcher.
func (t *Tracker) closeAll() {
	for _, n := range t.snapshot() {
		t.stop(n)
	}
	if t.watcher != nil {
		t.watcher.Close()
	}
}

// watch makes the watcher follow exactly dirs: each cgroup directory (a
// child created or removed) and its cgroup.events (populated changes).
func (t *Tracker) watch(dirs []string) {
	want := make(map[string]bool, 2*len(dirs))
	for _, d := range dirs {
		want[d] = true
		want[d+"/cgroup.events"] = true
	}
	for p := range want {
		if !t.watched[p] {
			if err := t.watcher.Add(p); err != nil {
				t.log.Debug().Err(err).Str("path", p).Msg("watching cgroup")
				continue
			}
			t.watched[p] = true
		}
	}
	for p := range t.watched {
		if !want[p] {
			// A removed directory's watch is gone already.
			t.watcher.Remove(p)
			delete(t.watched, p)
		}
	}
}
