package daemon

import (
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"time"

	sdbus "github.com/coreos/go-systemd/v22/dbus"
	godbus "github.com/godbus/dbus/v5"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/cgroups"
	"github.com/smesh-dev/smesh/pkg/handover"
)

// Under systemd, smeshd runs as a worker of a small master (cmd/smeshd,
// master.go) and keeps everything it would hand over in systemd's file
// descriptor store (docs/restart.md, 3.3):
//
//   - the store is kept current (syncStore): the data path's maps, links and
//     lock, every listener, under the hand-over's names; a namespace's
//     listeners added once it is served, removed once it is gone;
//   - a worker starts from what the store gave back, through the path a
//     hand-over's files take (storedPredecessor);
//   - on SIGTERM the worker asks systemd what the SIGTERM is for: a
//     restart job on its unit (`systemctl restart`, try-restart,
//     reload-or-restart) leaves everything in the store, lets go of its
//     own copies (letGo), moves itself into a transient scope
//     smeshd-drain-PID.scope (bounded by drain_timeout) and tells the
//     master, which exits, so that systemd starts the next master at once;
//     the worker drains its relayed connections in the scope. Anything
//     else (`systemctl stop`, no answer) empties the store first and drains
//     in place as a single smeshd does: in on_failure = "open" the capture
//     then goes with the worker, as before.

const (
	// MasterEnv names the master's socket in a worker's environment (unix
	// datagrams, in the runtime directory); set, smeshd is a worker.
	MasterEnv = "SMESHD_MASTER"
	// MasterSocketName is the master's socket in the runtime directory.
	MasterSocketName = "master.sock"
	// MasterSuccessor ("successor PID") tells the master that its worker
	// handed over to PID (`smeshd upgrade`), its worker from now on.
	MasterSuccessor = "successor"
	// MasterDetached ("detached PID") tells the master that worker PID has
	// moved out of the unit to drain: the master exits.
	MasterDetached = "detached"
)

// drainScopeMargin is what the drain scope lives beyond drain_timeout.
const drainScopeMargin = 10 * time.Second

// fdStore is what this worker keeps in systemd's descriptor store.
type fdStore struct {
	master string          // the master's socket
	known  map[string]bool // names that may be in the store
	synced bool            // the first sync replaced what was received
	kick   chan struct{}
}

// newFDStore returns the store of a worker of a master, nil otherwise
// (a single smeshd: tests, containers, a shell).
func newFDStore() *fdStore {
	master := os.Getenv(MasterEnv)
	if master == "" || os.Getenv("NOTIFY_SOCKET") == "" {
		return nil
	}
	return &fdStore{master: master, known: make(map[string]bool), kick: make(chan struct{}, 1)}
}

// kickStore asks the daemon's loop to bring the store up to date.
func (d *daemon) kickStore() {
	if d.store == nil {
		return
	}
	select {
	case d.store.kick <- struct{}{}:
	default:
	}
}

// storeKicked is the loop's side of kickStore (nil, never ready, without a
// store).
func (d *daemon) storeKicked() <-chan struct{} {
	if d.store == nil {
		return nil
	}
	return d.store.kick
}

// storedPredecessor is what the master passed from systemd's store, as a
// predecessor without a session: nil if nothing was passed. closed is
// capture.on_failure = "closed" now: a data path stored in the other mode
// (pinned or not: "lock" tells) is not adopted, and then nothing is: a
// handed-over listener only works with the data path that goes with it
// (its accepted connections run the getsockopt programs of the cgroup the
// listener was made in, a cgroup systemd has removed since: the unit's
// cgroup is made anew at each start, and only an adopted data path keeps
// that cgroup's attachments). This start is then a fresh one: the store is
// emptied first (dropStore).
func storedPredecessor(store *fdStore, closed bool, log zerolog.Logger) *predecessor {
	files, err := handover.FromMaster()
	if err != nil {
		log.Warn().Err(err).Msg("descriptors from systemd's store: some were left out")
	}
	if store == nil {
		for _, f := range files {
			f.Close()
		}
		return nil
	}
	for name := range files {
		store.known[name] = true
	}
	if len(files) == 0 {
		return nil
	}
	if _, pinned := files["lock"]; pinned != closed {
		log.Warn().Bool("stored_closed", pinned).Bool("closed", closed).
			Msg("capture.on_failure changed since systemd's descriptor store was filled: starting anew, what was stored goes")
		dropStore(store, files, log)
		return nil
	}
	p := newPredecessor(nil, files, log)
	log.Info().Int("files", len(files)).Msg("taking over what systemd's descriptor store kept")
	return p
}

// dropStore empties systemd's store of files, closes them, and waits (3 s
// at most) until the addresses of the listeners among them in smeshd's own
// namespace are free again: systemd closes its copies when it has read
// FDSTOREREMOVE, which nothing confirms on systemd 252. Listeners of other
// namespaces are opened by the namespace tracker, which tries again.
func dropStore(store *fdStore, files map[string]*os.File, log zerolog.Logger) {
	own, _ := ownNetnsCookie()
	var addrs []string
	for name, f := range files {
		if err := handover.Unstore(name); err != nil {
			log.Warn().Err(err).Str("name", name).Msg("removing from systemd's descriptor store")
		}
		delete(store.known, name)
		if isListenerName(name) && listenerNetns(f) == own {
			if a := listenerAddr(f); a != "" {
				addrs = append(addrs, a)
			}
		}
		f.Close()
	}
	deadline := time.Now().Add(3 * time.Second)
	for _, a := range addrs {
		for {
			ln, err := net.Listen("tcp", a)
			if err == nil {
				ln.Close()
				break
			}
			if time.Now().After(deadline) {
				log.Warn().Err(err).Str("addr", a).Msg("a listener systemd's store held is still bound")
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// listenerNetns is the cookie of f's network namespace, 0 if unknown.
func listenerNetns(f *os.File) uint64 {
	raw, err := f.SyscallConn()
	if err != nil {
		return 0
	}
	var cookie uint64
	raw.Control(func(fd uintptr) {
		cookie, _ = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	})
	return cookie
}

// listenerAddr is the address f is bound to, "" if unknown.
func listenerAddr(f *os.File) string {
	raw, err := f.SyscallConn()
	if err != nil {
		return ""
	}
	var addr string
	raw.Control(func(fd uintptr) {
		switch sa, _ := unix.Getsockname(int(fd)); sa := sa.(type) {
		case *unix.SockaddrInet4:
			addr = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)).String()
		case *unix.SockaddrInet6:
			addr = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port)).String()
		}
	})
	return addr
}

// syncStore brings systemd's store up to date with what this smeshd would
// hand over. The first sync replaces every name it knows of (what the store
// gave back may not be what is used now: a listener that did not match was
// made anew).
func (d *daemon) syncStore() {
	s := d.store
	if s == nil || d.released.Load() {
		return
	}
	files, err := d.handoverFiles()
	if err != nil {
		d.log.Warn().Err(err).Msg("systemd's descriptor store is not kept up to date")
		return
	}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	var added, removed int
	for name := range s.known {
		if _, ok := files[name]; !ok || !s.synced {
			if err := handover.Unstore(name); err != nil {
				d.log.Warn().Err(err).Str("name", name).Msg("removing from systemd's descriptor store")
			}
			delete(s.known, name)
			removed++
		}
	}
	for _, name := range slices.Sorted(maps.Keys(files)) {
		if s.known[name] {
			continue
		}
		f := files[name]
		if err := handover.Store(name, f, handover.IsSocket(f)); err != nil {
			d.log.Warn().Err(err).Str("name", name).Msg("storing in systemd's descriptor store")
			continue
		}
		s.known[name] = true
		added++
	}
	s.synced = true
	if added+removed > 0 {
		d.log.Debug().Int("stored", added).Int("removed", removed).Int("held", len(s.known)).Msg("systemd's descriptor store updated")
	}
}

// clearStore empties the store (`systemctl stop`): nothing outlives this
// smeshd but what on_failure = "closed" pinned.
func (d *daemon) clearStore() {
	if d.store == nil {
		return
	}
	for name := range d.store.known {
		if err := handover.Unstore(name); err != nil {
			d.log.Warn().Err(err).Str("name", name).Msg("removing from systemd's descriptor store")
		}
		delete(d.store.known, name)
	}
}

// stopping handles SIGTERM: a restart leaves everything in the store and
// drains in a scope of its own (restartDrain); anything else drains as a
// single smeshd does.
func (d *daemon) stopping() {
	if d.store != nil {
		job, err := unitJob()
		if err != nil {
			d.log.Warn().Err(err).Msg("asking systemd whether this is a restart: taken as a stop")
		}
		d.log.Info().Str("job", job).Msg("SIGTERM from systemd")
		if job == "restart" {
			d.restartDrain()
			return
		}
		d.clearStore()
	}
	d.drain(false)
}

// restartDrain is `systemctl restart` for a worker: everything stays in the
// store for the next worker, this one lets go of its copies, moves out of
// the unit and tells the master, then drains.
func (d *daemon) restartDrain() {
	d.syncStore()
	d.opts.Notify("STATUS=restarting: the next smeshd takes over from the descriptor store")
	d.letGo()
	d.admin.SetDraining()
	timeout := d.cfg.Daemon.DrainTimeout.Duration + drainScopeMargin
	scope, err := moveToDrainScope(timeout)
	if err != nil {
		// Killed with the unit otherwise (KillMode=mixed): drain here,
		// the master waits for this process to exit.
		d.log.Error().Err(err).Msg("cannot drain outside the unit: draining before the next smeshd starts")
	} else {
		d.log.Info().Str("scope", scope).Msg("moved out of the unit to drain")
		if err := tellMaster(d.store.master, MasterDetached, os.Getpid()); err != nil {
			d.log.Error().Err(err).Msg("telling the master to exit")
		}
	}
	d.drain(true)
}

// tellMaster sends the master "kind pid".
func tellMaster(path, kind string, pid int) error {
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = fmt.Fprintf(c, "%s %d", kind, pid)
	return err
}

// systemdConn connects to systemd: its private socket (no D-Bus daemon
// needed, root), else the system bus.
func systemdConn(ctx context.Context) (*sdbus.Conn, error) {
	conn, err := sdbus.NewSystemdConnectionContext(ctx)
	if err == nil {
		return conn, nil
	}
	conn, err2 := sdbus.NewSystemConnectionContext(ctx)
	if err2 != nil {
		return nil, fmt.Errorf("connecting to systemd: %w; over the system bus: %w", err, err2)
	}
	return conn, nil
}

// unitJob is the type of the job systemd runs on this process's unit
// ("restart" while a restart stops it, "stop"), "" for none. A restart job
// keeps its type until the unit is stopped, then becomes a start.
func unitJob() (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := systemdConn(ctx)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	unit, err := conn.GetUnitNameByPID(ctx, uint32(os.Getpid()))
	if err != nil {
		return "", fmt.Errorf("this process's unit: %w", err)
	}
	jobs, err := conn.ListJobsContext(ctx)
	if err != nil {
		return "", fmt.Errorf("listing systemd's jobs: %w", err)
	}
	for _, j := range jobs {
		if j.Unit == unit {
			return j.JobType, nil
		}
	}
	return "", nil
}

// moveToDrainScope moves this process into a new transient scope
// smeshd-drain-PID.scope that systemd ends after timeout
// (RuntimeMaxUSec=), and returns its name.
func moveToDrainScope(timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := systemdConn(ctx)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	name := fmt.Sprintf("smeshd-drain-%d.scope", os.Getpid())
	props := []sdbus.Property{
		sdbus.PropDescription("smeshd draining the connections it relayed before a restart"),
		sdbus.PropPids(uint32(os.Getpid())),
		{Name: "RuntimeMaxUSec", Value: godbus.MakeVariant(uint64(timeout.Microseconds()))},
		{Name: "CollectMode", Value: godbus.MakeVariant("inactive-or-failed")},
	}
	done := make(chan string, 1)
	if _, err := conn.StartTransientUnitContext(ctx, name, "fail", props, done); err != nil {
		return "", fmt.Errorf("starting %s: %w", name, err)
	}
	select {
	case res := <-done:
		if res != "done" {
			return "", fmt.Errorf("starting %s: job %s", name, res)
		}
	case <-ctx.Done():
		return "", fmt.Errorf("starting %s: %w", name, ctx.Err())
	}
	return name, nil
}

// workerCgroup is ownCgroup for a worker: the unit's cgroup is smeshd's
// own, shared with its master (which makes no connection) and with workers
// that handed over and drain.
func workerCgroup(mount string, enrolled []string, predecessor int, log zerolog.Logger) (string, func(), error) {
	cur, err := cgroups.Of(mount, 0)
	if err != nil {
		return "", nil, err
	}
	if cur == mount {
		return ownCgroup(mount, enrolled, predecessor, log)
	}
	for _, e := range enrolled {
		if cgroups.Within(cur, e) {
			return "", nil, fmt.Errorf("smeshd runs in cgroup %s, inside the enrolled cgroup %s: it would capture itself; run it outside the mesh", cur, e)
		}
	}
	return cur, func() {}, nil
}
