package daemon

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/handover"
)

// The hand-over (docs/restart.md, 3.1 and 3.4): a smeshd started while
// another runs with the same RUNTIME_DIRECTORY takes over from it without
// a refused connection and without detaching capture. The running one (the
// predecessor) serves RUNTIME_DIRECTORY/handover.sock; a starting one (the
// successor) dials it before it listens anywhere or loads anything:
//
//	successor                          predecessor
//	Dial: hello                    ->
//	                               <-  its listeners (dups, by name) and
//	                                   its data path (dp.Handover), or a
//	                                   refusal (it goes on serving)
//	start: takes every listener it
//	would open, the data path adopts
//	the rest (datapath.Options.Adopt)
//	Ready                          ->
//	                                   stops accepting (the queues are the
//	                                   successor's), closes its listeners,
//	                                   dp.Release (nothing detached)
//	                               <-  Released
//	READY=1, serves                    drains its connections, exits 0
//
// Anything failing before Ready leaves the predecessor serving as if
// nothing happened: the successor aborts and exits with the reason.

// HandoverSocketName is the hand-over socket's name in the runtime
// directory, next to the control socket.
const HandoverSocketName = "handover.sock"

// HandoverSocket is the path of the hand-over socket: in RUNTIME_DIRECTORY,
// or "" when it is not set (no hand-over then).
func HandoverSocket() string {
	dir := runtimeDir()
	if dir == "" {
		return ""
	}
	return filepath.Join(dir, HandoverSocketName)
}

const (
	// successorStartTimeout bounds how long a predecessor waits for its
	// successor's Ready: the successor's whole start (the Kubernetes API's
	// first sync and the Workload API's first SVID among it). Past it the
	// predecessor goes on serving.
	successorStartTimeout = 2 * time.Minute
	// releaseTimeout bounds how long a successor that said Ready waits
	// for Released: stopping accept loops and closing descriptors.
	releaseTimeout = 30 * time.Second
)

// predecessor is what a successor received from the running smeshd.
type predecessor struct {
	sess  *handover.Session
	lns   *handover.Listeners
	ports map[string]uint16 // each listener's bound port, for port 0 in the configuration
	// adopt is the data path's part, for datapath.Options.Adopt, which
	// takes out what it uses.
	adopt map[string]*os.File
	log   zerolog.Logger
}

// isListenerName tells the listeners among the handed-over files.
func isListenerName(name string) bool {
	kind, _, _ := strings.Cut(name, "/")
	return name == "admin" || kind == "out4" || kind == "out6" || kind == "tun"
}

// dialPredecessor asks the smeshd serving path to hand over. None runs:
// nil, nil.
func dialPredecessor(ctx context.Context, path string, log zerolog.Logger) (*predecessor, error) {
	sess, err := handover.Dial(ctx, path, handover.Hello{})
	if errors.Is(err, handover.ErrNoPredecessor) {
		return nil, nil
	}
	var refused *handover.RefusedError
	if errors.As(err, &refused) {
		return nil, fmt.Errorf("%w; it goes on serving: to start this smeshd anyway, stop that one first (SIGTERM)", err)
	}
	if err != nil {
		return nil, fmt.Errorf("taking over from the running smeshd (%s): %w", path, err)
	}
	p := newPredecessor(sess, sess.Files, log)
	log.Info().Int("pid", sess.PID).Int("datapath", len(p.adopt)).
		Msg("taking over from the running smeshd")
	return p, nil
}

// newPredecessor sorts what was handed over (by a running smeshd: sess, or
// by systemd's descriptor store: sess nil) into listeners and the data
// path's part.
func newPredecessor(sess *handover.Session, files map[string]*os.File, log zerolog.Logger) *predecessor {
	p := &predecessor{sess: sess, ports: make(map[string]uint16), adopt: make(map[string]*os.File), log: log}
	lns := make(map[string]*os.File)
	for name, f := range files {
		if isListenerName(name) {
			lns[name] = f
			p.ports[name] = boundPort(f)
		} else {
			p.adopt[name] = f
		}
	}
	p.lns = handover.NewListeners(lns)
	return p
}

// pid is the predecessor's PID, 0 for systemd's store.
func (p *predecessor) pid() int {
	if p == nil || p.sess == nil {
		return 0
	}
	return p.sess.PID
}

// boundPort reads the port f is bound to; 0 if it cannot tell.
func boundPort(f *os.File) uint16 {
	raw, err := f.SyscallConn()
	if err != nil {
		return 0
	}
	var port uint16
	// Control, never Fd: Fd would make the listener blocking
	// (docs/restart.md, 2 (f)).
	raw.Control(func(fd uintptr) {
		switch sa, _ := unix.Getsockname(int(fd)); sa := sa.(type) {
		case *unix.SockaddrInet4:
			port = uint16(sa.Port)
		case *unix.SockaddrInet6:
			port = uint16(sa.Port)
		}
	})
	return port
}

// take returns the listener handed over as kind ("out4", "out6", "tun",
// or "admin") of the network namespace with cookie netns,
// bound to one of addrs. nil: none was (the caller listens), or it did not
// match (logged, closed: the caller listens anew). A nil predecessor has
// none.
func (p *predecessor) take(kind string, netns uint64, addrs ...netip.AddrPort) *net.TCPListener {
	if p == nil {
		return nil
	}
	name := kind
	if kind != "admin" {
		name = handover.ListenerName(kind, netns)
	}
	// Port 0 in the configuration (tests): the port the predecessor got
	// is the one to take.
	if port := p.ports[name]; port != 0 {
		for _, a := range slices.Clone(addrs) {
			if a.Port() == 0 {
				addrs = append(addrs, netip.AddrPortFrom(a.Addr(), port))
			}
		}
	}
	ln, err := p.lns.Take(name, netns, addrs...)
	if err != nil {
		p.log.Warn().Err(err).Str("listener", name).Msg("a handed-over listener does not match this configuration: listening anew")
		return nil
	}
	if ln == nil {
		p.log.Info().Str("listener", name).Msg("no listener of this name was handed over: listening anew")
	}
	return ln
}

// closeRest closes what start did not take: listeners of namespaces gone
// meanwhile, objects the data path did not adopt.
func (p *predecessor) closeRest() {
	if names := p.lns.CloseRest(); len(names) > 0 {
		p.log.Info().Strs("listeners", names).Msg("closed handed-over listeners nothing here serves (their namespaces are gone)")
	}
	if len(p.adopt) > 0 {
		p.log.Info().Strs("objects", slices.Sorted(maps.Keys(p.adopt))).Msg("closed handed-over data path objects the data path did not adopt")
	}
	for name, f := range p.adopt {
		f.Close()
		delete(p.adopt, name)
	}
}

// abort gives the hand-over up: the predecessor goes on serving.
func (p *predecessor) abort() {
	if p.sess != nil {
		p.sess.Abort()
	}
	p.lns.CloseRest()
	for name, f := range p.adopt {
		f.Close()
		delete(p.adopt, name)
	}
}

// ownNetnsCookie reads the cookie of smeshd's own network namespace, which
// names its listeners in a hand-over.
func ownNetnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("reading the cookie of smeshd's network namespace: %w", err)
	}
	return cookie, nil
}

// tunnelAddrs are the addresses a tunnel listener for listen may be bound
// to: listen, or 0.0.0.0 on its port where "[::]" fell back to IPv4
// (tunnel.ListenTCP).
func tunnelAddrs(listen netip.AddrPort) []netip.AddrPort {
	addrs := []netip.AddrPort{listen}
	if listen.Addr() == netip.IPv6Unspecified() {
		addrs = append(addrs, netip.AddrPortFrom(netip.IPv4Unspecified(), listen.Port()))
	}
	return addrs
}

// serveHandover accepts successors on srv and hands each request to the
// daemon's loop, until ctx ends.
func serveHandover(ctx context.Context, srv *handover.Server, requests chan<- *handover.Request, log zerolog.Logger) {
	for {
		req, err := srv.Accept(ctx)
		if err != nil {
			if ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
				log.Error().Err(err).Msg("hand-over socket: no more successors are accepted")
			}
			return
		}
		select {
		case requests <- req:
		case <-ctx.Done():
			req.Refuse("the running smeshd is stopping")
			return
		}
	}
}

// readyResult is the outcome of a successor's start.
type readyResult struct {
	req *handover.Request
	err error
}

// offer answers a successor's request: everything this smeshd holds, by
// name, or a refusal. It reports whether the successor is now starting
// (its Ready or failure comes on d.readyc).
func (d *daemon) offer(req *handover.Request) bool {
	log := d.log.With().Int("successor", req.Hello.PID).Logger()
	files, err := d.handoverFiles()
	if err != nil {
		log.Warn().Err(err).Msg("refused a successor's hand-over: going on serving")
		req.Refuse(err.Error())
		return false
	}
	err = req.Offer(files)
	// The successor has its own now (or has nothing): the kernel keeps
	// ours in flight until it takes them.
	for _, f := range files {
		f.Close()
	}
	if err != nil {
		log.Warn().Err(err).Msg("handing over to a successor failed: going on serving")
		return false
	}
	log.Info().Int("files", len(files)).Msg("handed everything to a successor: serving until it is ready")
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), successorStartTimeout)
		defer cancel()
		d.readyc <- readyResult{req, req.WaitReady(ctx)}
	}()
	return true
}

// handoverFiles duplicates everything a successor takes over: the data
// path's maps, links and lock (datapath Handover), and every listener, by
// name. On error nothing is left open.
func (d *daemon) handoverFiles() (_ map[string]*os.File, err error) {
	files, err := d.dp.Handover()
	if err != nil {
		return nil, fmt.Errorf("this smeshd cannot hand its data path over: %w", err)
	}
	if files == nil {
		files = make(map[string]*os.File)
	}
	defer func() {
		if err != nil {
			for _, f := range files {
				f.Close()
			}
		}
	}()
	add := func(name string, ln *net.TCPListener) error {
		if ln == nil {
			return nil
		}
		f, err := ln.File()
		if err != nil {
			return fmt.Errorf("duplicating listener %s: %w", name, err)
		}
		files[name] = f
		return nil
	}
	own := d.members.OwnCookie()
	if err := errors.Join(
		add("admin", d.admin.Listener()),
		add(handover.ListenerName("out4", own), d.out.Listener()),
		add(handover.ListenerName("out6", own), d.out6),
		add(handover.ListenerName("tun", own), d.tun.Server.Listener()),
	); err != nil {
		return nil, err
	}
	d.nsMu.Lock()
	defer d.nsMu.Unlock()
	for svc := range d.nsSvcs {
		if err := errors.Join(
			add(handover.ListenerName("out4", svc.cookie), svc.lns.out),
			add(handover.ListenerName("out6", svc.cookie), svc.lns.out6),
			add(handover.ListenerName("tun", svc.cookie), svc.lns.tun),
		); err != nil {
			return nil, err
		}
	}
	return files, nil
}

// release gives everything up to a successor that is ready: the accept
// loops end without taking what is queued (the successor's now), the
// listeners are closed, the data path is released (nothing detached), and
// the successor is told. Relayed and tunnelled connections go on (drain).
// mainPID, when not 0, is a successor this smeshd started (`smeshd
// upgrade`), which becomes systemd's main process of the unit.
func (d *daemon) release(req *handover.Request, mainPID int) {
	d.letGo()
	if mainPID != 0 && d.store != nil {
		// Under a master the unit's main process stays the master: it
		// is told which worker it has now.
		if err := tellMaster(d.store.master, MasterSuccessor, mainPID); err != nil {
			d.log.Error().Err(err).Msg("telling the master about the successor")
		}
		mainPID = 0
	}
	if mainPID != 0 {
		// Before Released: the successor says READY=1 (and then
		// WATCHDOG=1) once released, and NotifyAccess=main accepts it
		// only from the main process. systemd handles the datagrams in
		// the order sent. From here on this process is a leftover of the
		// unit, which systemd lets exit after its drain; it sends nothing
		// more. Without NOTIFY_SOCKET nothing is sent.
		d.opts.Notify(fmt.Sprintf("MAINPID=%d", mainPID))
	}
	if err := req.Released(); err != nil {
		d.log.Warn().Err(err).Msg("telling the successor that everything is released")
	}
	d.admin.SetDraining()
	d.log.Info().Int("successor", req.Hello.PID).Msg("handed over to the successor: it serves now; draining the connections relayed here")
}

// letGo gives up everything a successor (or systemd's store) holds too:
// the accept loops end without taking what is queued, the listeners are
// closed, the data path is released (nothing detached). Relayed and
// tunnelled connections go on (drain).
func (d *daemon) letGo() {
	d.released.Store(true) // no namespace is opened, no map written from now on
	// Every accept loop first, then the descriptors: no connection is
	// accepted here once the successor may be the only one accepting.
	d.out.StopAccepting()
	d.tun.Server.StopAccepting()
	d.admin.StopAccepting()
	for what, err := range map[string]error{
		"outbound": d.out.Release(), "tunnel": d.tun.Server.Release(), "admin": d.admin.Release(),
	} {
		if err != nil {
			d.log.Warn().Err(err).Str("listeners", what).Msg("closing handed-over listeners")
		}
	}
	if d.stopPods != nil {
		d.stopPods() // the successor follows the Kubernetes API now
	}
	// The successor beats since its start; after restart_hold without
	// either, capture follows on_failure.
	d.beat.Stop()
	if err := d.dp.Release(); err != nil {
		d.log.Error().Err(err).Msg("releasing the data path to the successor")
	}
	// The sockets' paths are the successor's next: remove ours first.
	d.stopHandover()
	d.stopControl()
}
