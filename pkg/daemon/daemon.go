// Package daemon wires smeshd's parts together: configuration, logging, the
// kernel data path and the listeners, for as long as the daemon runs.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sys/unix"

	sdnotify "github.com/coreos/go-systemd/v22/daemon"

	"github.com/smesh-dev/smesh/pkg/admin"
	"github.com/smesh-dev/smesh/pkg/cgroups"
	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/enrol"
	"github.com/smesh-dev/smesh/pkg/handover"
	"github.com/smesh-dev/smesh/pkg/metrics"
	"github.com/smesh-dev/smesh/pkg/policy"
	"github.com/smesh-dev/smesh/pkg/proxy"
	"github.com/smesh-dev/smesh/pkg/services"
	"github.com/smesh-dev/smesh/pkg/tunnel"
)

// NewLogger builds the logger [log] asks for. The level is zerolog's
// process-wide one, so that a reload can change it for every component's
// logger at once, and disabled events cost nothing.
//
// The console format is coloured only on a terminal: the journal, a pipe or
// a file gets plain text (escape sequences in the journal make
// `journalctl -o json` store messages as byte arrays), and so does anyone
// who sets NO_COLOR.
func NewLogger(c config.Log, w io.Writer) (zerolog.Logger, error) {
	if err := setLogLevel(c.Level); err != nil {
		return zerolog.Logger{}, err
	}
	if c.Format == "console" {
		noColor := !isTerminal(w) || os.Getenv("NO_COLOR") != ""
		w = zerolog.ConsoleWriter{Out: w, TimeFormat: time.RFC3339, NoColor: noColor}
	}
	return zerolog.New(w).With().Timestamp().Logger(), nil
}

// isTerminal reports whether w is a file open on a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

func setLogLevel(level string) error {
	l, err := zerolog.ParseLevel(level)
	if err != nil {
		return fmt.Errorf("log.level: %w", err)
	}
	zerolog.SetGlobalLevel(l)
	return nil
}

// ResolveMode turns [datapath] mode into the mode this kernel can run.
// "auto" splices only where the kernel can also bound what a spliced hop
// queues (datapath.Missing "bounded splice"), and copies otherwise; an
// explicit "splice" on a kernel that cannot splice is an error naming what
// is missing, and on one that cannot bound it splices without a bound (the
// caller warns).
func ResolveMode(mode string, features []datapath.Feature) (datapath.Mode, error) {
	if err := datapath.Missing(features, "capture"); err != nil {
		// Without its capabilities smeshd cannot even probe the kernel:
		// every probe fails with EPERM. Name what is missing instead.
		if priv := datapath.MissingPrivileges(features); priv != nil {
			return "", fmt.Errorf("%w: smeshd needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN); "+
				"under systemd, in CapabilityBoundingSet= and AmbientCapabilities= (see deploy/smeshd.service)", priv)
		}
		if errors.Is(err, datapath.ErrBelowFloor) {
			return "", fmt.Errorf("this kernel (Linux %s) is below smesh's floor: %w", datapath.KernelRelease(), err)
		}
		if errors.Is(err, unix.EPERM) {
			return "", fmt.Errorf("the kernel refuses smesh's capture (operation not permitted): smeshd has CAP_BPF and CAP_NET_ADMIN, "+
				"but they count only in the initial user namespace, and a seccomp filter or LSM may deny bpf(2): %w", err)
		}
		return "", fmt.Errorf("this kernel cannot run smesh's capture: %w", err)
	}
	spliceErr := datapath.Missing(features, "splice")
	boundErr := datapath.Missing(features, "bounded splice")
	switch mode {
	case "copy":
		return datapath.ModeCopy, nil
	case "splice":
		if spliceErr != nil {
			return "", fmt.Errorf("datapath.mode = \"splice\" but this kernel cannot splice (use \"auto\" or \"copy\"): %w", spliceErr)
		}
		return datapath.ModeSplice, nil
	case "auto", "":
		if spliceErr != nil || boundErr != nil {
			return datapath.ModeCopy, nil
		}
		return datapath.ModeSplice, nil
	}
	return "", fmt.Errorf("datapath.mode %q: want auto, splice or copy", mode)
}

// Options of one daemon run.
type Options struct {
	Config config.Config
	// ConfigPath is re-read on SIGHUP; empty disables reloading.
	ConfigPath string
	// Reload delivers SIGHUP. A reload asked for while smeshd starts is
	// applied once it is ready (several are one). nil: Run catches SIGHUP
	// itself, first thing; a caller that does work before Run (reading the
	// configuration) should catch it earlier and pass it here.
	Reload <-chan os.Signal
	LogOut io.Writer
	// Notify reports state changes the systemd way ("READY=1",
	// "RELOADING=1\nMONOTONIC_USEC=...", "STOPPING=1", "WATCHDOG=1",
	// "STATUS=..."); nil ignores them. READY=1 is always a message of
	// its own.
	Notify  func(state string)
	Version string
	// Executable and Args start a successor on `smeshd upgrade`
	// (upgrade.go): the path smeshd was started from (ExecutablePath,
	// resolved at start) and its arguments. Empty: upgrades are refused.
	Executable string
	Args       []string
	// Kubernetes starts the pod enrolment of [kubernetes] when it is
	// enabled, and keeps the cluster's Services in sink (cmd/smeshd
	// passes pkg/kube's); it runs until ctx is done. Nil: a configuration
	// that enables it is refused.
	Kubernetes func(ctx context.Context, cfg config.Kubernetes, td spiffeid.TrustDomain, cgroupMount string, sink services.Sink, log zerolog.Logger) (PodSource, error)
}

// PodSource is an enrolment whose cgroups change while smeshd runs: the
// cgroups of this node's pods in the mesh (pkg/kube), enrolled next to
// [capture] cgroups through the same path as a reload.
type PodSource interface {
	// WaitSynced returns once the first set is known (and the cluster's
	// Services are in the data path: a pod is translated from its first
	// connection on).
	WaitSynced(ctx context.Context) error
	// Cgroups is the current set.
	Cgroups() []string
	// Identities are the pods' workload identities, by cgroup (of
	// Cgroups).
	Identities() map[string]spiffeid.ID
	// Changed receives a value after Cgroups or Identities changed.
	Changed() <-chan struct{}
	// Pods describes the pods for /debug/pods.
	Pods() any
}

// PolicySource is a PodSource that also knows the cluster's side of
// authorization (pkg/kube's Node): the pods as policy destinations, the
// cluster's AuthorizationPolicies, and which node runs which workload.
// With it, smesh.toml's [[policy]] tables are not used.
type PolicySource interface {
	// Workloads are the pods in the mesh as policy sees them, by cgroup
	// (of Cgroups); they change with Changed.
	Workloads() map[string]policy.Workload
	// Policies are the policies in force; PoliciesChanged receives after
	// they changed.
	Policies() *policy.Set
	PoliciesChanged() <-chan struct{}
	// Verify is tunnel.SourceVerifier for the cluster's pods.
	Verify(node, workload spiffeid.ID, addr netip.Addr) error
}

// podVerifier is the tunnel's SourceVerifier with [kubernetes]: the
// cluster's pods (PolicySource), once startPods set them (before any
// tunnel listener serves); a PodSource without them verifies nothing.
type podVerifier struct{ d *daemon }

// Verify: a peer of the mesh's trust domain whose certificate names no node
// (spiffe://TD/node/NAME) cannot be checked against the pods' nodes: the
// shipped cert-manager Certificate gives every node one identity
// (.../ns/smesh-system/sa/smeshd). Its sources are then unverifiable (the
// connection is its node's, matching no principal), not refused: such a
// cluster keeps working, and policies by principal need node identities
// (SPIRE).
func (v podVerifier) Verify(node, workload spiffeid.ID, addr netip.Addr) error {
	ps, ok := v.d.pods.(PolicySource)
	if !ok {
		return tunnel.ErrUnverifiable
	}
	if td, err := spiffeid.TrustDomainFromString(v.d.cfg.Tunnel.TLS.TrustDomain); err == nil && node.TrustDomain() == td {
		if segs := strings.Split(node.Path(), "/"); len(segs) != 3 || segs[1] != "node" || segs[2] == "" {
			return fmt.Errorf("peer %s names no node: which pods it runs cannot be checked: %w", node, tunnel.ErrUnverifiable)
		}
	}
	return ps.Verify(node, workload, addr)
}

// daemon is one running smeshd: its parts and the configuration in force.
type daemon struct {
	opts     Options
	cfg      config.Config
	log      zerolog.Logger
	mount    string
	own      string // smeshd's own cgroup
	metrics  *metrics.Metrics
	admin    *admin.Server
	tun      *tunnel.Tunnel
	out      *proxy.Outbound
	dp       *datapath.Datapath
	beat     *datapath.Heartbeat // smesh_heartbeat's writer, until released
	members  *enrol.Tracker
	static   []string // [capture] cgroups, as paths
	svcs     *staticServices
	pods     PodSource // nil without [kubernetes]
	idents   *identities
	pol      *policies
	cleanups []func() // run in reverse order on exit

	// What the capture covers (cgroups.go): every enrolled cgroup (static's
	// and the pods', the ones in force), the id of each that exists, the
	// error of the last attempt to attach, and the problem /readyz reports,
	// if any.
	cgw        *cgroupWatch
	enrolled   []string
	cgroupIDs  map[string]uint64
	captureErr error
	problem    string

	// The hand-over (handover.go). from is what a predecessor handed
	// over while this smeshd starts (nil without one); out6 is the IPv6
	// outbound listener of smeshd's own namespace, nsSvcs the enrolled
	// namespaces' services, whose listeners a successor takes; released:
	// handed over to a successor, which owns the listeners, the maps and
	// the links now.
	from     *predecessor
	out6     *net.TCPListener
	nsMu     sync.Mutex
	nsSvcs   map[*nsService]struct{}
	released atomic.Bool
	// gate holds the accept loops back while taking over (proxy.Gate).
	gate         *proxy.Gate
	stopPods     context.CancelFunc
	stopControl  func() // removes the control socket; once
	stopHandover func() // stops serving the hand-over socket; once
	handovers    chan *handover.Request
	readyc       chan readyResult
	// store is systemd's descriptor store, kept by a worker of smeshd's
	// master (fdstore.go); nil otherwise.
	store *fdStore

	// strict is strict inbound in force (strict.go).
	strict strictState
}

// Run runs smeshd until ctx is done, then drains (see drain). SIGHUP
// reloads the configuration file, also when it comes while smeshd starts
// (once it is ready), and so does a request on the control socket
// (control.go) when systemd gave smeshd a runtime directory.
func Run(ctx context.Context, opts Options) (err error) {
	// Before anything is started: the report pipe of `smeshd upgrade`
	// must not leak into a child.
	takeUpgradeReport()
	reload := opts.Reload
	if reload == nil {
		hup := make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		defer signal.Stop(hup)
		reload = hup
	}
	d := &daemon{opts: opts, cfg: opts.Config, nsSvcs: make(map[*nsService]struct{}),
		stopControl: func() {}, stopHandover: func() {},
		handovers: make(chan *handover.Request), readyc: make(chan readyResult, 1), store: newFDStore()}
	if d.opts.Notify == nil {
		d.opts.Notify = func(string) {}
	}
	defer func() {
		for i := len(d.cleanups) - 1; i >= 0; i-- {
			d.cleanups[i]()
		}
	}()
	if d.log, err = NewLogger(d.cfg.Log, opts.LogOut); err != nil {
		return err
	}
	// The serving context outlives ctx by the drain: connections being
	// drained still dial and relay.
	serveCtx, stopServing := context.WithCancel(context.Background())
	d.cleanups = append(d.cleanups, stopServing)
	// A running smeshd hands everything over before this one listens
	// anywhere or loads anything.
	handoverPath := HandoverSocket()
	if handoverPath != "" {
		if d.from, err = dialPredecessor(ctx, handoverPath, d.log); err != nil {
			return err
		}
	}
	// What systemd's store kept while no smeshd ran (under the master);
	// a running predecessor's hand-over comes first.
	if stored := storedPredecessor(d.store, d.cfg.Capture.OnFailure == "closed", d.log); d.from == nil {
		d.from = stored
	} else if stored != nil {
		stored.abort()
	}
	if d.from != nil {
		// Until Ready the predecessor serves: whatever fails, it keeps
		// everything it handed over.
		defer func() {
			if d.from != nil {
				d.gate.Cancel() // nil-safe: the loops never accept
				d.from.abort()
			}
		}()
	}
	// Requests wait for the loop below. Upgrades need the hand-over
	// socket, which is in the same runtime directory.
	control := &controlLoop{reloads: make(chan reloadRequest)}
	if handoverPath != "" && opts.Executable != "" {
		control.upgrades = make(chan upgradeRequest)
	}
	// An upgrade's answer is written once this smeshd released, before
	// it exits.
	d.cleanups = append(d.cleanups, control.answers.Wait)
	listenControlSocket := func() error {
		if path := ControlSocket(); path != "" && opts.ConfigPath != "" {
			stop, err := listenControl(serveCtx, path, control, d.log)
			if err != nil {
				return err
			}
			d.stopControl = sync.OnceFunc(stop)
			d.cleanups = append(d.cleanups, d.stopControl)
		}
		return nil
	}
	// The predecessor's control socket stays its own until it released.
	if d.from.pid() == 0 {
		if err := listenControlSocket(); err != nil {
			return err
		}
	}
	if err := d.start(ctx, serveCtx); err != nil {
		if d.from.pid() != 0 {
			return fmt.Errorf("taking over from smeshd PID %d failed, it goes on serving: %w", d.from.sess.PID, err)
		}
		if d.from != nil {
			// From systemd's store (maps of another layout after an
			// upgrade, say): the next start is a fresh one.
			d.clearStore()
			return fmt.Errorf("starting from systemd's descriptor store failed (emptied it: the next start is a fresh one): %w", err)
		}
		return err
	}
	if from := d.from; from != nil && from.sess == nil {
		// From systemd's store: nobody to wait for.
		from.closeRest()
		d.from = nil
		d.gate.Open()
		d.log.Info().Msg("took over what systemd's descriptor store kept")
	} else if from != nil {
		from.closeRest()
		rctx, cancel := context.WithTimeout(ctx, releaseTimeout)
		err := from.sess.Ready(rctx)
		cancel()
		d.from = nil // the session is over: nothing to abort
		if err != nil {
			return fmt.Errorf("taking over from smeshd PID %d: %w", from.sess.PID, err)
		}
		d.gate.Open()
		d.log.Info().Int("predecessor", from.sess.PID).Msg("took over: the predecessor released everything and drains")
		if err := listenControlSocket(); err != nil {
			return err
		}
	}
	// Started: a pinned capture now outlives smeshd. Until here a failure
	// removed every pin this start made.
	d.dp.Commit()
	if handoverPath != "" {
		d.serveHandover(serveCtx, handoverPath)
	}

	d.admin.SetReady(true)
	d.opts.Notify("READY=1")
	d.syncStore()
	closeUpgradeReport() // started: nothing to report to a predecessor
	d.log.Info().Str("mode", string(d.dp.Mode())).Str("outbound", d.out.Addr().String()).
		Str("tunnel", d.tun.Server.Addr().String()).Str("admin", d.admin.Addr().String()).
		Bool("mtls", d.tun.Credentials != nil).Str("on_failure", d.cfg.Capture.OnFailure).Msg("smeshd ready")

	select {
	case <-reload:
		d.log.Info().Msg("a reload was asked for (SIGHUP) while smeshd started: reloading now")
		d.reloadNotifying()
	default:
	}
	var watchdog <-chan time.Time
	if interval, err := sdnotify.SdWatchdogEnabled(false); err == nil && interval > 0 {
		t := time.NewTicker(interval / 2)
		defer t.Stop()
		watchdog = t.C
	}
	// The certificate may be rotated while smeshd runs (its files are
	// re-read on handshakes): keep the expiry metric current.
	certCheck := time.NewTicker(time.Minute)
	defer certCheck.Stop()
	var podsChanged, policiesChanged <-chan struct{}
	if d.pods != nil {
		podsChanged = d.pods.Changed()
	}
	if ps, ok := d.pods.(PolicySource); ok {
		policiesChanged = ps.PoliciesChanged()
	}
	var successor *handover.Request // one hand-over at a time
	// The successor `smeshd upgrade` started, until it took over or
	// failed; its request is answered on every way out of this loop.
	var upgrading *upgrade
	var upgradeExited <-chan error
	var upgradeDeadline <-chan time.Time
	endUpgrade := func(res upgradeResult) {
		upgrading.deadline.Stop()
		upgrading.reply <- res
		upgrading, upgradeExited, upgradeDeadline = nil, nil, nil
	}
	defer func() {
		if upgrading != nil {
			upgrading.kill()
			endUpgrade(upgradeResult{err: errors.New("smeshd is stopping: the upgrade was given up")})
		}
	}()
	for {
		select {
		case <-ctx.Done():
			d.stopping()
			return nil
		case <-d.storeKicked():
			d.syncStore()
		case req := <-d.handovers:
			if successor != nil {
				req.Refuse(fmt.Sprintf("smeshd PID %d is taking over already", successor.Hello.PID))
				continue
			}
			if d.offer(req) {
				successor = req
			}
		case r := <-d.readyc:
			successor = nil
			if r.err != nil {
				d.log.Warn().Err(r.err).Int("successor", r.req.Hello.PID).Msg("the successor did not take over: going on serving")
				// The successor started by an upgrade exits next:
				// its status and reason are the answer.
				continue
			}
			// The successor started by `smeshd upgrade` is in this
			// unit and becomes its main process; one started by hand
			// is not this one's to hand the unit to.
			mainPID := 0
			if upgrading != nil && upgrading.pid == r.req.Hello.PID {
				mainPID = upgrading.pid
			}
			d.release(r.req, mainPID)
			if upgrading != nil {
				if mainPID != 0 {
					endUpgrade(upgradeResult{pid: mainPID})
				} else {
					// Another smeshd took over meanwhile: ours would
					// take over from it next.
					upgrading.kill()
					endUpgrade(upgradeResult{err: fmt.Errorf("smeshd PID %d, started otherwise, took over first; the one started for the upgrade was stopped", r.req.Hello.PID)})
				}
			}
			d.drain(true)
			d.idle(ctx)
			return nil
		case r := <-control.upgrades:
			if upgrading != nil || successor != nil {
				r.reply <- upgradeResult{err: errors.New("a successor is taking over already: wait for it, then ask again")}
				continue
			}
			u, err := d.startSuccessor(r.reply)
			if err != nil {
				d.log.Error().Err(err).Msg("upgrade: going on serving")
				r.reply <- upgradeResult{err: err}
				continue
			}
			upgrading, upgradeExited, upgradeDeadline = u, u.exited, u.deadline.C
		case err := <-upgradeExited:
			failed := upgrading.failed(err)
			d.log.Error().Err(failed).Msg("upgrade failed")
			endUpgrade(upgradeResult{err: failed})
		case <-upgradeDeadline:
			err := fmt.Errorf("the successor (PID %d) did not take over within %v and was stopped; this smeshd goes on serving", upgrading.pid, upgradeTimeout)
			d.log.Error().Err(err).Msg("upgrade failed")
			upgrading.kill()
			endUpgrade(upgradeResult{err: err})
		case <-podsChanged:
			if err := d.enrolPods(); err != nil {
				d.log.Error().Err(err).Msg("enrolling this node's pods in the mesh")
			}
			d.pokeAddrIDs() // labels may have changed: policy follows
			d.kickStore()
		case <-policiesChanged:
			d.pol.set.Store(d.pods.(PolicySource).Policies())
			d.pokeAddrIDs()
		case <-certCheck.C:
			if d.tun.Credentials != nil {
				d.metrics.CertExpiry(d.tun.Credentials.Source(), d.tun.Credentials.NotAfter())
			}
		case <-reload:
			d.reloadNotifying()
			d.kickStore()
		case r := <-control.reloads:
			r.reply <- d.reloadNotifying()
			d.kickStore()
		case <-d.cgw.kick:
			d.checkCgroups()
			d.kickStore()
		case <-watchdog:
			d.opts.Notify("WATCHDOG=1")
		}
	}
}

// start brings the parts up in the order that lets no connection be
// captured before smeshd can serve it: listeners, then the data path. Parts
// run until ctx is done; waiting for the Kubernetes API ends with wait.
func (d *daemon) start(wait, ctx context.Context) error {
	cfg, log := d.cfg, d.log
	features := datapath.ProbeModes()
	mode, err := ResolveMode(cfg.Datapath.Mode, features)
	if err != nil {
		return err
	}
	if mode == datapath.ModeCopy && cfg.Datapath.Mode == "auto" {
		log.Warn().AnErr("missing", datapath.Missing(features, "bounded splice")).
			Msg("this kernel cannot splice with a bound on what a spliced hop queues; using the copy data path " +
				"(datapath.mode = \"splice\" splices without the bound)")
	}
	queueLimit := uint32(cfg.Datapath.SpliceQueueLimit.Bytes)
	if mode == datapath.ModeSplice {
		if err := datapath.Missing(features, "bounded splice"); err != nil {
			queueLimit = 0
			log.Warn().AnErr("missing", err).Bool("splice_proxy_hops", cfg.Datapath.SpliceProxyHops).
				Msg("SPLICING WITHOUT A BOUND: this kernel cannot bound what a spliced hop " +
					"queues at its reader, so a reader that stalls under a fast writer can use up the node's TCP memory " +
					"(datapath.mode = \"auto\" would use the copy data path here; splice_proxy_hops = false keeps " +
					"the hops to and from smeshd, the most exposed, on TCP)")
		}
	}

	d.metrics = metrics.New(d.opts.Version)
	var ownNetns uint64
	if d.from != nil {
		if ownNetns, err = ownNetnsCookie(); err != nil {
			return err
		}
	}
	if ln := d.from.take("admin", ownNetns, cfg.Admin.Listen); ln != nil {
		d.admin, err = admin.NewFrom(ln, d.metrics, d.connections, log)
	} else {
		d.admin, err = admin.New(cfg.Admin.Listen, d.metrics, d.connections, log)
	}
	if err != nil {
		return err
	}
	// Taking over, nothing is accepted on the listeners shared with the
	// predecessor before it released them (proxy.Gate): a start that
	// fails then cuts no connection.
	d.gate = proxy.NewGate(d.from == nil)
	go func() {
		if d.gate.Wait() {
			d.admin.Serve()
		}
	}()
	d.cleanups = append(d.cleanups, func() { d.admin.Shutdown(context.Background()) })

	// The tunnel first: in mtls mode missing certificates stop smeshd
	// before anything is created or attached.
	d.tun, err = tunnel.NewFrom(cfg.Tunnel, []uint16{cfg.Outbound.Listen.Port(), cfg.Admin.Listen.Port()},
		d.from.take("tun", ownNetns, tunnelAddrs(cfg.Tunnel.Listen)...), log)
	if err != nil {
		return err
	}
	d.tun.Server.Hold(d.gate)
	// Sources are verified against [[tunnel.tls.peers]] workloads (the
	// verifier follows reloads), and authorized by the policies in force.
	// Without TLS no source can be verified: every connection is its
	// node's.
	d.pol = newPolicies(cfg, log)
	var verifier tunnel.SourceVerifier
	switch {
	case d.tun.Credentials == nil:
	case cfg.Kubernetes.Enabled:
		verifier = podVerifier{d}
	default:
		verifier = d.tun.Credentials.SourceVerifier()
	}
	d.tun.Server.SetSourceChecks(verifier, d.pol.authorize)
	d.metrics.SetTunnelStats(d.tun.Stats)
	d.metrics.SetParked(metrics.SideTunnelIn, d.tun.Server.Parked)
	d.cleanups = append(d.cleanups, func() { d.tun.Close() })
	if d.tun.Credentials != nil {
		d.metrics.CertExpiry(d.tun.Credentials.Source(), d.tun.Credentials.NotAfter())
	}

	if d.mount, err = cgroups.Mount(); err != nil {
		return err
	}
	static, created, err := d.enroll(cfg)
	if err != nil {
		return err
	}
	d.keepCreated(created)
	d.static = static
	ownFn := ownCgroup
	if d.store != nil {
		ownFn = workerCgroup
	}
	own, restore, err := ownFn(d.mount, d.static, d.from.pid(), log)
	if err != nil {
		return err
	}
	d.own = own
	d.cleanups = append(d.cleanups, restore)
	adoptMemoryLimit(d.mount, own, log)

	d.idents = d.newIdentities()
	d.out, err = proxy.Listen(proxy.Options{
		Listen:         cfg.Outbound.Listen,
		Listener:       d.from.take("out4", ownNetns, cfg.Outbound.Listen),
		Gate:           d.gate,
		Dialer:         d.tun.Dialer(),
		MaxConnections: cfg.Outbound.MaxConnections,
		IdleTimeout:    cfg.Outbound.IdleTimeout.Duration,
		OwnPorts:       []uint16{cfg.Outbound.Listen.Port(), d.tun.Server.Addr().Port(), d.admin.Addr().Port()},
		Local:          d.tun.Node.Contains,
		Source:         d.idents.source,
		Observer:       d.metrics,
		Logger:         log,
	})
	if err != nil {
		return err
	}
	d.cleanups = append(d.cleanups, func() { d.out.Close() })
	d.metrics.SetParked(metrics.SideOutbound, d.out.Parked)
	go d.out.Serve(ctx)
	// IPv6 capture in smeshd's own namespace, where it has IPv6.
	ready6 := false
	ln6 := d.from.take("out6", ownNetns, cfg.Outbound.Listen6)
	if ln6 == nil {
		ln6, err = proxy.ListenLocal("tcp6", cfg.Outbound.Listen6)
	}
	if err != nil {
		log.Warn().Err(err).Str("listen6", cfg.Outbound.Listen6.String()).
			Msg("no IPv6 outbound listener in smeshd's network namespace (IPv6 disabled?): IPv6 connections of workloads there are not captured (capture.on_failure decides)")
	} else {
		d.out.AddListener(ctx, ln6, d.tun.Dialer())
		d.out6 = ln6
		ready6 = true
	}

	// on_failure = "closed" pins the capture so that it outlives smeshd.
	// "open" must leave nothing behind, including pins of an earlier
	// "closed" run, which would refuse connections once smeshd stops.
	pinDir := ""
	if cfg.Capture.OnFailure == "closed" {
		pinDir = cfg.Capture.PinDir
	} else if n, err := datapath.RemovePins(cfg.Capture.PinDir); err != nil {
		log.Warn().Err(err).Str("pin_dir", cfg.Capture.PinDir).Msg("cannot remove the pinned capture of an earlier on_failure = \"closed\" run")
	} else if n > 0 {
		log.Warn().Str("pin_dir", cfg.Capture.PinDir).Msg("removed the pinned capture of an earlier on_failure = \"closed\" run")
	}
	d.dp, err = datapath.Load(datapath.Options{
		Mode:             mode,
		ProxyAddr:        cfg.Outbound.Listen,
		ProxyAddr6:       cfg.Outbound.Listen6,
		ProxyCgroup:      own,
		MapSize:          cfg.Datapath.MapSize,
		ServiceMapSize:   cfg.Datapath.ServiceMapSize,
		BackendMapSize:   cfg.Datapath.BackendMapSize,
		SpliceProxyHops:  cfg.Datapath.SpliceProxyHops,
		SpliceQueueLimit: queueLimit,
		PinDir:           pinDir,
		FailClosed:       cfg.Capture.OnFailure == "closed",
		Adopt:            d.adopt(),
		Logger:           log,
	})
	if err != nil {
		return err
	}
	d.cleanups = append(d.cleanups, func() { d.dp.Close() })
	// The heartbeat before any namespace is marked ready and before
	// anything is attached: adopted programs (pinned by a smeshd that
	// died, or a predecessor's) read this map, and its last beat may be
	// older than restart_hold. A predecessor without the map (an older
	// version) never reads it.
	if d.beat, err = d.dp.StartHeartbeat(cfg.Daemon.RestartHold.Duration); err != nil {
		return err
	}
	d.cleanups = append(d.cleanups, d.beat.Stop)
	d.metrics.SetSpliceSource(d.spliceCounters)
	d.startStrict()
	// [[services]] are in the maps before connect4 is attached; their
	// locality follows this node's addresses (startMembers).
	d.svcs = newStaticServices(d.dp.Services(), log)
	if err := d.svcs.set(cfg.Services); err != nil {
		return err
	}
	d.admin.HandleJSON("/debug/services", debugServices(d.dp.Services()))
	d.metrics.Registry().MustRegister(metrics.ServiceCollector(d.serviceCounts))
	// This node's pods, and the cluster's Services into the maps, before
	// anything is attached: a pod is captured and its Service connections
	// translated from its first connection on.
	if cfg.Kubernetes.Enabled {
		if err := d.startPods(wait, ctx); err != nil {
			return err
		}
	}
	enrolled := d.wanted()

	// Every namespace an enrolled process lives in gets its listeners
	// before connect4 is attached; later ones as they appear.
	if err := d.startMembers(ctx, enrolled, ready6); err != nil {
		return err
	}
	if d.cgw, err = newCgroupWatch(); err != nil {
		return err
	}
	d.cleanups = append(d.cleanups, d.cgw.close)
	if err := d.attachCapture(enrolled, cfg.Capture); err != nil {
		return err
	}
	log.Info().Str("mode", string(mode)).Strs("cgroups", presentOf(enrolled, d.cgroupIDs)).Str("proxy_cgroup", own).Msg("data path attached")
	d.waitCompiled()
	go d.tun.Server.Serve(ctx)
	return nil
}

// startMembers starts tracking the enrolled cgroups' network namespaces
// (package enrol), with smeshd's own listeners as its own namespace's.
func (d *daemon) startMembers(ctx context.Context, enrolled []string, ready6 bool) error {
	events, err := d.dp.NetnsEvents()
	if err != nil {
		return err
	}
	wake := make(chan struct{}, 1)
	go func() {
		for ev := range events {
			d.log.Debug().Uint64("netns", ev.Cookie).Int("pid", ev.PID).Msg("connect() from a namespace without a listener")
			select {
			case wake <- struct{}{}:
			default:
			}
		}
	}()
	d.members, err = enrol.New(enrol.Options{
		Cgroups:   enrolled,
		Open:      d.openNamespace(ctx),
		Own:       ownService{d.tun.Local, ready6},
		Maps:      releasableMaps{d},
		NodeAddrs: func(addrs []netip.Addr) { d.tun.Node.Set(addrs); d.svcs.setLocal(addrs) },
		Wake:      wake,
		Logger:    d.log,
	})
	if err != nil {
		return err
	}
	membersCtx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { d.members.Run(membersCtx); close(done) }()
	d.cleanups = append(d.cleanups, func() { stop(); <-done })
	addrsDone := make(chan struct{})
	go func() { d.runAddrIDs(membersCtx); close(addrsDone) }()
	d.cleanups = append(d.cleanups, func() { stop(); <-addrsDone })
	go d.logSameNodeDenials(membersCtx)
	d.admin.HandleJSON("/debug/namespaces", func() any { return d.members.Namespaces() })
	d.admin.HandleJSON("/debug/identities", d.debugIdentities)
	d.admin.HandleJSON("/debug/policy", d.debugPolicy)
	d.metrics.Registry().MustRegister(metrics.PolicyCollector(d.policyCounts))
	d.metrics.Registry().MustRegister(metrics.NamespaceCollector(d.namespaceCounts))
	return nil
}

// startPods starts the enrolment of this node's pods and waits for the
// first set, so that pods running before smeshd starts are captured from
// its first moment on.
func (d *daemon) startPods(wait, ctx context.Context) error {
	if d.opts.Kubernetes == nil {
		return errors.New("kubernetes.enabled: this smeshd cannot enrol pods (no Kubernetes support wired in)")
	}
	// Its own context: a hand-over stops it (release) while the
	// connections drain.
	ctx, d.stopPods = context.WithCancel(ctx)
	td, err := spiffeid.TrustDomainFromString(d.cfg.Tunnel.TLS.TrustDomain)
	if err != nil {
		return fmt.Errorf("tunnel.tls.trust_domain: %w", err)
	}
	pods, err := d.opts.Kubernetes(ctx, d.cfg.Kubernetes, td, d.mount, d.svcs.below(d.dp.Services()), d.log)
	if err != nil {
		return err
	}
	d.log.Info().Str("label", d.cfg.Kubernetes.Label).Msg("waiting for this node's pods from the Kubernetes API")
	if err := pods.WaitSynced(wait); err != nil {
		return err
	}
	d.pods = pods
	d.admin.HandleJSON("/debug/pods", pods.Pods)
	if ps, ok := pods.(PolicySource); ok {
		if len(d.cfg.Policies) > 0 {
			d.log.Warn().Int("policies", len(d.cfg.Policies)).Msg("[[policy]] in smesh.toml is not used with [kubernetes]: " +
				"the cluster's AuthorizationPolicies are the policies in force")
		}
		d.pol.set.Store(ps.Policies())
	}
	return nil
}

// wanted is every cgroup in the mesh: [capture] cgroups and, with
// [kubernetes], the cgroups of this node's pods in the mesh. A pod's cgroup
// that holds smeshd itself (its own pod labelled) or lies inside a
// [capture] cgroup (captured already) is left out.
func (d *daemon) wanted() []string {
	out := slices.Clone(d.static)
	if d.pods == nil {
		return out
	}
	for _, cg := range d.pods.Cgroups() {
		if d.own != "" && cgroups.Within(d.own, cg) {
			d.log.Warn().Str("cgroup", cg).Str("own", d.own).Msg("a pod in the mesh holds smeshd itself: left out (smeshd would capture itself)")
			continue
		}
		if slices.ContainsFunc(d.static, func(s string) bool { return cgroups.Within(cg, s) }) {
			continue
		}
		out = append(out, cg)
	}
	return out
}

// enrolPods puts the cgroups in the mesh in force after this node's pods
// changed: their namespaces get listeners first (setMembers), then the
// capture is attached to them. A reload does the same in its switch
// (apply). Open connections are left alone.
func (d *daemon) enrolPods() error {
	enrolled := d.wanted()
	if slices.Equal(enrolled, d.enrolled) && d.captureErr == nil {
		// No pod joined or left the mesh (the watcher's first set, for
		// one, was enrolled at start); one may have become strict.
		d.recheckStrict()
		return nil
	}
	d.setMembers(enrolled)
	if err := d.attachCapture(enrolled, d.cfg.Capture); err != nil {
		return fmt.Errorf("applying [capture]: %w", err)
	}
	return nil
}

// memberScanTimeout bounds how long enrolment waits for the namespaces of
// newly enrolled cgroups to get their listeners before capture is attached
// there. Past it capture is attached all the same: it is gated per
// namespace, so on_failure decides there until the listener is up.
const memberScanTimeout = 5 * time.Second

// setMembers hands the enrolled cgroups to the namespace tracker and waits
// until their namespaces are served: capture attached to the cgroups next
// finds a listener in each (enrol's rule: listeners before connect4).
func (d *daemon) setMembers(enrolled []string) {
	ctx, cancel := context.WithTimeout(context.Background(), memberScanTimeout)
	defer cancel()
	if err := d.members.SetCgroups(ctx, enrolled); err != nil {
		d.log.Warn().Err(err).Msg("the enrolled cgroups' namespaces are not all served yet; " +
			"capture is attached to the cgroups anyway, and on_failure decides in those namespaces until they are")
	}
}

// namespaceCounts reads the namespace metrics at scrape time.
func (d *daemon) namespaceCounts() (metrics.NamespaceCounts, error) {
	var nc metrics.NamespaceCounts
	for _, ns := range d.members.Namespaces() {
		if ns.Ready {
			nc.Ready++
		} else {
			nc.NotReady++
		}
	}
	c, err := d.dp.Counters()
	nc.UnreadyOpen, nc.UnreadyClosed = c.UnreadyOpen, c.UnreadyClosed
	return nc, err
}

// enroll resolves [capture] cgroups (ResolveCgroups) and creates the
// missing ones, except where systemd manages the cgroup tree: there it owns
// them (a slice's cgroup is made by starting the slice), and smeshd
// attaches to a missing one when it appears (attachCapture, checkCgroups).
// created are those it made: the caller removes them should what follows
// fail, or hands them to keepCreated.
func (d *daemon) enroll(cfg config.Config) (enrolled, created []string, err error) {
	cgs, err := ResolveCgroups(cfg, d.mount)
	if err != nil {
		return nil, nil, err
	}
	for _, cg := range cgs.Paths {
		if d.own != "" && cgroups.Within(d.own, cg) {
			return nil, nil, fmt.Errorf("capture.cgroups: %s contains smeshd's own cgroup %s: smeshd would capture itself", cg, d.own)
		}
	}
	if SystemdOwnsCgroups() {
		return cgs.Paths, nil, nil
	}
	for _, cg := range cgs.Missing {
		if err := os.Mkdir(cg, 0o755); err != nil {
			removeAll(created)
			return nil, nil, fmt.Errorf("creating enrolled cgroup %s: %w", cg, err)
		}
		created = append(created, cg)
	}
	return cgs.Paths, created, nil
}

// keepCreated keeps the cgroups enroll created: they are removed again on
// exit if nothing runs in them any more (rmdir fails on a populated one).
func (d *daemon) keepCreated(created []string) {
	for _, cg := range created {
		d.log.Info().Str("cgroup", cg).Msg("created enrolled cgroup")
		d.cleanups = append(d.cleanups, func() {
			if !d.released.Load() { // the successor's now
				os.Remove(cg)
			}
		})
	}
}

// removeAll removes the (empty) directories in dirs, last first.
func removeAll(dirs []string) {
	for i := len(dirs) - 1; i >= 0; i-- {
		os.Remove(dirs[i])
	}
}

// stopMargin is what smeshd asks systemd for beyond drain_timeout when it
// stops: time to reset what is still open, detach and exit.
const stopMargin = 10 * time.Second

// drain is the SIGTERM path: stop capturing new connections, let the
// relayed and tunnelled ones finish for up to daemon.drain_timeout, then
// exit. Spliced same-node connections are not smeshd's: they keep going.
// After a hand-over (handedOver) the successor captures and accepts
// already: this one only lets its own connections finish.
func (d *daemon) drain(handedOver bool) {
	timeout := d.cfg.Daemon.DrainTimeout.Duration
	if handedOver {
		d.log.Info().Dur("drain_timeout", timeout).Int("relayed", len(d.out.Connections())).Msg("handed over: draining")
	} else {
		// systemd's TimeoutStopSec= is fixed in the unit while
		// drain_timeout is not: ask for the drain and some time to
		// detach and exit.
		d.opts.Notify(fmt.Sprintf("STOPPING=1\nEXTEND_TIMEOUT_USEC=%d", (timeout + stopMargin).Microseconds()))
		d.admin.SetDraining()
		d.log.Info().Dur("drain_timeout", timeout).Int("relayed", len(d.out.Connections())).Msg("stopping: no new captures, draining")
		if err := d.dp.StopCapture(); err != nil {
			d.log.Error().Err(err).Msg("detaching connect4")
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	done := make(chan struct{}, 2)
	go func() { d.out.Shutdown(ctx); done <- struct{}{} }()
	go func() { d.tun.Server.Shutdown(ctx); done <- struct{}{} }()
	<-done
	<-done
	d.log.Info().Object("tunnel", d.tun.Stats).Msg("drained")
}

// idle is what a released smeshd does after its drain with
// daemon.after_release = "wait": nothing, until ctx ends (SIGTERM). In a
// container (restartPolicy Always) an exit would have the kubelet start it
// again, and the new process would dial the hand-over socket and take
// everything back from its successor. It serves nothing meanwhile: its
// listeners, maps and links are the successor's, and so are the hand-over
// and control sockets' paths, so a smeshd started next meets the
// successor, never this one.
func (d *daemon) idle(ctx context.Context) {
	if d.cfg.Daemon.AfterRelease != "wait" {
		return
	}
	d.log.Info().Msg("handed over and drained: idle until SIGTERM (daemon.after_release = \"wait\"), serving nothing")
	<-ctx.Done()
	d.log.Info().Msg("SIGTERM while idle after the hand-over: exiting")
}

// adopt is what the predecessor handed over for the data path
// (datapath.Options.Adopt), nil without one.
func (d *daemon) adopt() map[string]*os.File {
	if d.from == nil {
		return nil
	}
	return d.from.adopt
}

// serveHandover serves the hand-over socket at path until ctx ends or a
// hand-over released everything. Without it smeshd still runs: it only
// cannot hand over.
func (d *daemon) serveHandover(ctx context.Context, path string) {
	srv, err := handover.Listen(path)
	if err != nil {
		d.log.Warn().Err(err).Msg("no hand-over socket: a smeshd started next cannot take over from this one")
		return
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { serveHandover(ctx, srv, d.handovers, d.log); close(done) }()
	d.stopHandover = sync.OnceFunc(func() {
		cancel()
		srv.Close()
		<-done
	})
	d.cleanups = append(d.cleanups, d.stopHandover)
}

// connections lists the relayed connections for /debug/connections.
func (d *daemon) connections() []admin.Conn {
	var out []admin.Conn
	for _, c := range d.out.Connections() {
		out = append(out, admin.Conn{Source: c.Source, OriginalDst: c.OriginalDst, SourceIdentity: c.SourceIdentity, Path: c.Path,
			TxBytes: c.TxBytes, RxBytes: c.RxBytes, AgeSeconds: c.Age.Seconds()})
	}
	return out
}

// spliceCounters reads the BPF splice counters at scrape time.
func (d *daemon) spliceCounters() (metrics.SpliceCounters, error) {
	st, err := d.dp.Stats()
	if err != nil {
		return metrics.SpliceCounters{}, err
	}
	sockets, err := d.dp.SplicedSockets()
	if err != nil {
		return metrics.SpliceCounters{}, err
	}
	c, err := d.dp.Counters()
	if err != nil {
		return metrics.SpliceCounters{}, err
	}
	return metrics.SpliceCounters{
		TxBytes: st.ClientToServer.Bytes, RxBytes: st.ServerToClient.Bytes,
		TxMsgs: st.ClientToServer.Msgs, RxMsgs: st.ServerToClient.Msgs,
		Sockets:   sockets,
		Demotions: c.Demotions, DemotedTxBytes: st.DemotedClientToServer, DemotedRxBytes: st.DemotedServerToClient,
		Released: c.Released, Conns: c.SplicedConns, Raced: c.Raced,
	}, nil
}

// adoptMemoryLimit makes a memory limit on smeshd's cgroup (systemd's
// MemoryMax=, a pod's limits.memory) the Go runtime's soft limit, at three
// quarters of it, unless GOMEMLIMIT is set: near the limit the collector
// then works harder instead of smeshd being killed at it. The last quarter
// is for what the kernel charges to the cgroup beside the Go runtime's
// memory (socket buffers among it).
func adoptMemoryLimit(mount, own string, log zerolog.Logger) {
	if os.Getenv("GOMEMLIMIT") != "" || own == "" {
		return
	}
	limit, ok, err := cgroups.MemoryLimit(mount, own)
	if err != nil {
		log.Warn().Err(err).Msg("reading the memory limit of smeshd's cgroup: the Go runtime keeps no soft memory limit")
		return
	}
	if !ok {
		return
	}
	soft := limit / 4 * 3
	debug.SetMemoryLimit(soft)
	log.Info().Int64("memory_max", limit).Int64("go_memory_limit", soft).
		Msg("smeshd's cgroup has a memory limit: the Go runtime collects harder as it nears three quarters of it (GOMEMLIMIT overrides)")
}

// sameExecutable: process pid runs the file this process runs.
func sameExecutable(pid int) bool {
	self, err := os.Stat("/proc/self/exe")
	if err != nil {
		return false
	}
	other, err := os.Stat(fmt.Sprintf("/proc/%d/exe", pid))
	return err == nil && os.SameFile(self, other)
}

// ownCgroup makes sure smeshd sits in a cgroup of its own: sock_ops must see
// its sockets (they are hop ends) and connect4 must tell them apart, both by
// cgroup. Under systemd the unit's cgroup is already its own. A cgroup
// shared only with the predecessor taking over (PID predecessor, 0 for
// none) is its own too: that is smeshd as well, and leaves; a successor
// started by `smeshd upgrade` is there, in the unit's cgroup, which under
// systemd it could not leave (ProtectControlGroups=, and systemd owns the
// tree). Otherwise (run from a shell, or in the cgroup v2 root, where
// nothing may be attached) smeshd moves into a new "smeshd-PID" cgroup and
// moves back on exit.
func ownCgroup(mount string, enrolled []string, predecessor int, log zerolog.Logger) (string, func(), error) {
	cur, err := cgroups.Of(mount, 0)
	if err != nil {
		return "", nil, err
	}
	for _, e := range enrolled {
		if cgroups.Within(cur, e) {
			return "", nil, fmt.Errorf("smeshd runs in cgroup %s, inside the enrolled cgroup %s: it would capture itself; run it outside the mesh", cur, e)
		}
	}
	procs, err := cgroups.Procs(cur)
	if err != nil {
		return "", nil, err
	}
	// Processes of smeshd's own executable do not count: in a pod, the
	// readiness probe (`smeshd ready`) runs in the container's cgroup, and
	// one that happens to run as smeshd starts must not send smeshd out of
	// the container's cgroup, where the probe looks for it.
	others := slices.DeleteFunc(procs, func(pid int) bool {
		return pid == os.Getpid() || (predecessor != 0 && pid == predecessor) || sameExecutable(pid)
	})
	if cur != mount && len(others) == 0 {
		return cur, func() {}, nil
	}
	dir := filepath.Join(mount, fmt.Sprintf("smeshd-%d", os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", nil, fmt.Errorf("creating a cgroup of smeshd's own: %w", err)
	}
	if err := cgroups.Join(dir, 0); err != nil {
		os.Remove(dir)
		return "", nil, err
	}
	log.Info().Str("cgroup", dir).Str("was", cur).Msg("moved smeshd into a cgroup of its own")
	return dir, func() {
		if err := cgroups.Join(cur, 0); err == nil {
			os.Remove(dir)
		}
	}, nil
}
