// Package kubecp starts a real Kubernetes control plane for a test or a
// benchmark: etcd and kube-apiserver, on loopback ports of their own, with
// real authentication and authorization (client certificates, service
// account tokens, --authorization-mode=Node,RBAC). What smeshd meets in a
// cluster is then checked against the API server itself, not a stand-in.
//
// The binaries are built from source by hack/kubecp (its own Go module, so
// the main go.mod does not grow) once per machine into a cache directory;
// the first start on a machine waits for that build, minutes, and says so.
// There is no kubelet and no controller-manager: nothing runs pods, and
// what a controller would make (a namespace's default ServiceAccount, token
// Secrets) a test creates itself.
//
//	cp := kubecp.Start(t)
//	admin := kubernetes.NewForConfigOrDie(cp.Admin)
//	... create a ServiceAccount ...
//	sa := cp.ServiceAccount(t, "smesh-system", "smeshd")
//
// Every control plane keeps an audit log (Audit). A test can also restart
// the API server (RestartAPIServer), start a second one on the same etcd
// (Second) and compact etcd (CompactEtcd). A program that is not a test
// (hack/kubescale) uses New and Close.
package kubecp

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// readyTimeout bounds the wait for /readyz: a loaded 2-core machine takes
// some seconds to start the API server's controllers and bootstrap RBAC.
const readyTimeout = 2 * time.Minute

// ErrUnavailable marks an error of New that says the control plane cannot
// run on this machine (no go command to build it with, not Linux), as
// opposed to one that failed while building or starting: a build that
// fails is a defect to see, not a reason to skip.
var ErrUnavailable = errors.New("kubernetes control plane unavailable")

// Options configure New and StartWith.
type Options struct {
	// Dir holds the certificates, etcd's data and the logs; it must exist.
	// StartWith makes one in t.TempDir() if it is empty.
	Dir string
	// Logf reports progress; nil discards it (StartWith: t.Logf).
	Logf func(format string, args ...any)
	// AuditPolicy is the API server's audit policy, an audit.k8s.io/v1
	// Policy in YAML; empty records every request at the Metadata level.
	AuditPolicy string
	// NoWatchCache runs kube-apiserver with --watch-cache=false: watches
	// go to etcd itself, so a watch from a compacted revision is answered
	// by etcd's compaction ("410 Gone"), not by the watch cache's window.
	NoWatchCache bool
	// APIServerArgs are added to kube-apiserver's flags.
	APIServerArgs []string
}

// ServiceCIDRs are the ClusterIP ranges of the API server, IPv4 and IPv6.
const ServiceCIDRs = "198.19.255.0/24,fd00:5e:ffff::/112"

// auditPolicy records every request at the Metadata level (user, verb,
// URI with its query, status): enough to see what a client asked for.
const auditPolicy = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
`

// ControlPlane is a running etcd and kube-apiserver.
type ControlPlane struct {
	// Admin reaches the API server as the test's admin, a client
	// certificate in the group system:masters (cluster-admin).
	Admin *rest.Config
	// Version is what the API server reports (GET /version), e.g. v1.34.3.
	Version string
	// Etcd is etcd's client URL, http://127.0.0.1:PORT.
	Etcd string
	// AuditLog is the API server's audit log (JSON lines, one
	// audit.k8s.io/v1 Event per request and stage the policy records).
	AuditLog string
	// PIDs of kube-apiserver (the current one, after a restart) and etcd.
	APIServerPID, EtcdPID int

	caPEM     []byte
	bin, dir  string
	args      []string // kube-apiserver's, for a restart and a second one
	etcd      *process
	apiserver *process
	procs     []*process // stopped in reverse order
}

// Start starts etcd and kube-apiserver and returns once the API server is
// ready; they are stopped in t.Cleanup. When it cannot run (no go command
// to build with) the test is skipped, or failed under
// SMESH_REQUIRE_PRIVILEGED=1; any other error, a failed build too, fails it.
func Start(t testing.TB) *ControlPlane {
	t.Helper()
	return StartWith(t, Options{})
}

// StartWith is Start with options.
func StartWith(t testing.TB, o Options) *ControlPlane {
	t.Helper()
	if o.Dir == "" {
		o.Dir = t.TempDir()
	}
	if o.Logf == nil {
		o.Logf = t.Logf
	}
	cp, err := New(o)
	if errors.Is(err, ErrUnavailable) {
		testenv.SkipOrFail(t, "%v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cp.Close()
		if t.Failed() {
			for _, p := range cp.procs {
				t.Log(p.tail())
			}
		}
	})
	return cp
}

// startAttempts bounds New's starts: a port picked free can be taken by
// another program before etcd or kube-apiserver binds it (see
// reservePorts), and New then starts again on other ports.
const startAttempts = 3

// New starts etcd and kube-apiserver and returns once the API server is
// ready. The caller stops them with Close. An error that says the control
// plane cannot run here wraps ErrUnavailable.
func New(o Options) (*ControlPlane, error) {
	if o.Dir == "" {
		return nil, errors.New("kubecp: Options.Dir is empty")
	}
	logf := o.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	bin, err := binaries(logf)
	if err != nil {
		return nil, err
	}
	p, err := newPKI(o.Dir)
	if err != nil {
		return nil, fmt.Errorf("kubernetes control plane certificates: %w", err)
	}
	policy := o.AuditPolicy
	if policy == "" {
		policy = auditPolicy
	}
	policyFile := filepath.Join(o.Dir, "audit-policy.yaml")
	if err := os.WriteFile(policyFile, []byte(policy), 0o600); err != nil {
		return nil, err
	}
	for attempt := 1; ; attempt++ {
		cp, err := start(o, bin, p, policyFile)
		if err == nil {
			logf("kube-apiserver %s at %s, etcd at %s", cp.Version, cp.Admin.Host, cp.Etcd)
			return cp, nil
		}
		taken := cp != nil && cp.portTaken()
		if cp != nil {
			for _, p := range cp.procs {
				logf("%s", p.tail())
			}
			cp.Close()
		}
		if !taken || attempt == startAttempts {
			return nil, err
		}
		logf("kubecp: a port was taken between picking it and binding it (%v); starting again on other ports", err)
		// etcd's member was made with the peer URL of this attempt, and
		// the audit log is the next attempt's alone.
		for _, f := range []string{filepath.Join(o.Dir, "etcd"), filepath.Join(o.Dir, "audit.log")} {
			if err := os.RemoveAll(f); err != nil {
				return nil, err
			}
		}
	}
}

// start is one attempt of New: etcd and kube-apiserver on ports of their
// own. On an error it returns what it started, if anything, for New to
// stop.
func start(o Options, bin string, p *pki, policyFile string) (*ControlPlane, error) {
	ports, err := reservePorts(3)
	if err != nil {
		return nil, err
	}
	etcdClient, etcdPeer, apiPort := ports.addrs[0], ports.addrs[1], ports.addrs[2]
	cp := &ControlPlane{
		Admin: &rest.Config{
			Host: "https://" + apiPort,
			TLSClientConfig: rest.TLSClientConfig{
				CAData: p.caPEM, CertData: p.adminCertPEM, KeyData: p.adminKeyPEM,
			},
		},
		Etcd:     "http://" + etcdClient,
		AuditLog: filepath.Join(o.Dir, "audit.log"),
		caPEM:    p.caPEM,
		bin:      bin,
		dir:      o.Dir,
	}
	// Held until now, so no other control plane (nor this one's other
	// listeners) could pick the same ports.
	ports.release()
	etcd, err := cp.startProcess(filepath.Join(bin, "etcd"), filepath.Join(o.Dir, "etcd.log"),
		"--name=kubecp",
		"--data-dir="+filepath.Join(o.Dir, "etcd"),
		"--listen-client-urls=http://"+etcdClient,
		"--advertise-client-urls=http://"+etcdClient,
		"--listen-peer-urls=http://"+etcdPeer,
		"--initial-advertise-peer-urls=http://"+etcdPeer,
		"--initial-cluster=kubecp=http://"+etcdPeer,
		// A test's data need not survive a crash of the machine.
		"--unsafe-no-fsync",
		"--log-level=warn",
	)
	if err != nil {
		return cp, err
	}
	cp.EtcdPID = etcd.cmd.Process.Pid
	cp.etcd = etcd
	cp.args = append(apiserverArgs(p, apiPort, cp.Etcd, policyFile, cp.AuditLog, o.NoWatchCache), o.APIServerArgs...)
	apiserver, err := cp.startProcess(filepath.Join(bin, "kube-apiserver"), filepath.Join(o.Dir, "kube-apiserver.log"), cp.args...)
	if err != nil {
		return cp, err
	}
	cp.apiserver = apiserver
	cp.APIServerPID = apiserver.cmd.Process.Pid
	if err := waitReady(cp.Admin, etcd, apiserver); err != nil {
		return cp, fmt.Errorf("kubernetes control plane: %w", err)
	}
	cs, err := kubernetes.NewForConfig(cp.Admin)
	if err != nil {
		return cp, err
	}
	v, err := cs.Discovery().ServerVersion()
	if err != nil {
		return cp, fmt.Errorf("kubernetes control plane version: %w", err)
	}
	cp.Version = v.GitVersion
	return cp, nil
}

// portTaken reports whether a process of cp could not bind its port
// because something else had it: its log says so.
func (cp *ControlPlane) portTaken() bool {
	for _, p := range cp.procs {
		if data, err := os.ReadFile(p.log); err == nil && bytes.Contains(data, []byte("address already in use")) {
			return true
		}
	}
	return false
}

// apiserverArgs are kube-apiserver's flags: serving on addr, its data in
// etcd, its audit log at auditLog.
func apiserverArgs(p *pki, addr, etcd, policyFile, auditLog string, noWatchCache bool) []string {
	host, port, _ := net.SplitHostPort(addr)
	return []string{
		"--etcd-servers=" + etcd,
		"--bind-address=" + host,
		"--secure-port=" + port,
		"--advertise-address=" + host,
		"--tls-cert-file=" + p.servingCert,
		"--tls-private-key-file=" + p.servingKey,
		"--client-ca-file=" + p.caFile,
		"--authorization-mode=Node,RBAC",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-signing-key-file=" + p.saKeyFile,
		"--service-account-key-file=" + p.saPubFile,
		// Only stored, never routed: the test ranges, as for test pods.
		// Dual-stack, so that Services may have a ClusterIP of each family
		// (the IPv4 one first: single-stack Services are IPv4). A later
		// flag in Options.APIServerArgs replaces it (a larger range).
		"--service-cluster-ip-range=" + ServiceCIDRs,
		// The kubernetes Service's endpoints would name the loopback
		// address, which validation refuses; nothing here reaches the API
		// server through that Service.
		"--endpoint-reconciler-type=none",
		"--audit-policy-file=" + policyFile,
		"--audit-log-path=" + auditLog,
		"--watch-cache=" + strconv.FormatBool(!noWatchCache),
	}
}

// Close stops the API servers (a second one too), then etcd, by their
// PIDs: SIGTERM, then SIGKILL if one lingers. It may be called more than
// once.
func (cp *ControlPlane) Close() {
	for i := len(cp.procs) - 1; i >= 0; i-- {
		cp.procs[i].stop()
	}
}

// ServiceAccount returns a config that reaches the API server as the
// ServiceAccount namespace/name, which must exist, with a token from the
// TokenRequest API, as the kubelet mounts into a pod.
func (cp *ControlPlane) ServiceAccount(t testing.TB, namespace, name string) *rest.Config {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rc, err := cp.Token(ctx, namespace, name)
	if err != nil {
		t.Fatal(err)
	}
	return rc
}

// Token is ServiceAccount for a caller that is not a test.
func (cp *ControlPlane) Token(ctx context.Context, namespace, name string) (*rest.Config, error) {
	cs, err := kubernetes.NewForConfig(cp.Admin)
	if err != nil {
		return nil, err
	}
	expiry := int64(3600)
	tr, err := cs.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, name,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &expiry}},
		metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("token for service account %s/%s: %w", namespace, name, err)
	}
	return &rest.Config{
		Host:            cp.Admin.Host,
		TLSClientConfig: rest.TLSClientConfig{CAData: cp.caPEM},
		BearerToken:     tr.Status.Token,
	}, nil
}

// RestartAPIServer stops kube-apiserver by its PID (SIGTERM, as a rolling
// restart of the control plane does), runs whileDown, and starts it again
// with the same flags: the same port, etcd and keys, so clients and their
// tokens carry on. It returns once the API server is ready again.
func (cp *ControlPlane) RestartAPIServer(t testing.TB, whileDown func()) {
	t.Helper()
	cp.apiserver.stop()
	if whileDown != nil {
		whileDown()
	}
	// The log goes on in a file of its own; the first one is kept.
	p, err := cp.startProcess(filepath.Join(cp.bin, "kube-apiserver"),
		filepath.Join(cp.dir, fmt.Sprintf("kube-apiserver-%d.log", time.Now().UnixNano())), cp.args...)
	if err != nil {
		t.Fatal(err)
	}
	cp.apiserver, cp.APIServerPID = p, p.cmd.Process.Pid
	if err := waitReady(cp.Admin, cp.etcd, p); err != nil {
		t.Fatalf("kube-apiserver after its restart: %v", err)
	}
}

// Second starts another kube-apiserver on the same etcd, with the same keys
// and CA (an HA control plane's second member), and returns a config for
// the admin on it; Close stops it with the first. Objects written through
// it while the first one is down are what a client of the first finds
// changed after a restart.
func (cp *ControlPlane) Second(t testing.TB) *rest.Config {
	t.Helper()
	ports, err := reservePorts(1)
	if err != nil {
		t.Fatal(err)
	}
	addr := ports.addrs[0]
	args := slices.Clone(cp.args)
	host, port, _ := net.SplitHostPort(addr)
	for i, a := range args {
		switch {
		case strings.HasPrefix(a, "--secure-port="):
			args[i] = "--secure-port=" + port
		case strings.HasPrefix(a, "--bind-address="):
			args[i] = "--bind-address=" + host
		case strings.HasPrefix(a, "--audit-log-path="):
			args[i] = "--audit-log-path=" + filepath.Join(cp.dir, "audit-second.log")
		}
	}
	ports.release()
	p, err := cp.startProcess(filepath.Join(cp.bin, "kube-apiserver"), filepath.Join(cp.dir, "kube-apiserver-second.log"), args...)
	if err != nil {
		t.Fatal(err)
	}
	admin := rest.CopyConfig(cp.Admin)
	admin.Host = "https://" + addr
	if err := waitReady(admin, cp.etcd, p); err != nil {
		t.Fatalf("second kube-apiserver: %v", err)
	}
	return admin
}

// CompactEtcd compacts etcd's history up to its current revision, as the
// API server's periodic compaction does, and returns that revision: a
// watch from an older resourceVersion that reaches etcd is then answered
// "410 Gone". It uses etcd's JSON gateway (/v3/kv/...), so the test needs
// no etcd client.
func (cp *ControlPlane) CompactEtcd(t testing.TB) int64 {
	t.Helper()
	var rng struct {
		Header struct {
			Revision string `json:"revision"`
		} `json:"header"`
	}
	// Any key: the answer's header carries the store's revision.
	cp.etcdCall(t, "/v3/kv/range", `{"key":"AA=="}`, &rng)
	rev, err := strconv.ParseInt(rng.Header.Revision, 10, 64)
	if err != nil {
		t.Fatalf("etcd revision %q: %v", rng.Header.Revision, err)
	}
	cp.etcdCall(t, "/v3/kv/compaction", fmt.Sprintf(`{"revision":%d,"physical":true}`, rev), nil)
	return rev
}

func (cp *ControlPlane) etcdCall(t testing.TB, path, body string, into any) {
	t.Helper()
	hc := &http.Client{Timeout: 30 * time.Second}
	resp, err := hc.Post(cp.Etcd+path, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatalf("etcd %s: %v", path, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("etcd %s: %s: %s", path, resp.Status, data)
	}
	if into != nil {
		if err := json.Unmarshal(data, into); err != nil {
			t.Fatalf("etcd %s: %v: %s", path, err, data)
		}
	}
}

// AuditEvent is what is read of an audit.k8s.io/v1 Event (the
// k8s.io/apiserver module that declares it is not linked for this).
type AuditEvent struct {
	AuditID    string `json:"auditID"`
	Stage      string `json:"stage"`
	Verb       string `json:"verb"`
	RequestURI string `json:"requestURI"`
	User       struct {
		Username string `json:"username"`
	} `json:"user"`
	ObjectRef *struct {
		Resource  string `json:"resource"`
		Namespace string `json:"namespace"`
	} `json:"objectRef"`
	ResponseStatus *struct {
		Code int `json:"code"`
	} `json:"responseStatus"`
}

// Audit returns the requests the API server (the first one, across its
// restarts) has logged so far.
func (cp *ControlPlane) Audit(t testing.TB) []AuditEvent {
	t.Helper()
	data, err := os.ReadFile(cp.AuditLog)
	if err != nil {
		t.Fatal(err)
	}
	var evs []AuditEvent
	for _, l := range bytes.Split(data, []byte("\n")) {
		if len(bytes.TrimSpace(l)) == 0 {
			continue
		}
		var ev AuditEvent
		if err := json.Unmarshal(l, &ev); err != nil {
			// The line being written as the server stopped.
			continue
		}
		evs = append(evs, ev)
	}
	return evs
}

// CA is the PEM certificate of the CA that signed the API server's serving
// certificate, what a pod finds as ca.crt in its service account mount.
func (cp *ControlPlane) CA() []byte { return bytes.Clone(cp.caPEM) }

// waitReady polls admin's /readyz until it answers 200, a process exits,
// or readyTimeout passes.
func waitReady(admin *rest.Config, procs ...*process) error {
	hc, err := rest.HTTPClientFor(admin)
	if err != nil {
		return err
	}
	hc.Timeout = 5 * time.Second
	deadline := time.Now().Add(readyTimeout)
	last := "no answer"
	for time.Now().Before(deadline) {
		for _, p := range procs {
			select {
			case <-p.exited:
				return fmt.Errorf("%s exited before the API server was ready: %v", p.name, p.err)
			default:
			}
		}
		resp, err := hc.Get(admin.Host + "/readyz?verbose")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("%s: %s", resp.Status, failedChecks(body))
		} else {
			last = err.Error()
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("not ready after %s: %s", readyTimeout, last)
}

// failedChecks keeps the lines of a verbose /readyz that are not "ok".
func failedChecks(body []byte) string {
	var failed []string
	for _, l := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(l, "[-]") {
			failed = append(failed, l)
		}
	}
	return strings.Join(failed, "; ")
}

// located is what binaries found, worked out once per process. It is
// package state, which the project otherwise avoids, because it caches
// what is fixed for the process's life (the repository, and the versions
// its hack/kubecp/go.mod names): without it every control plane a test
// package starts would run go env and go run again, seconds each. It is
// written once, under once, and only read after.
var located struct {
	once sync.Once
	dir  string
	err  error
}

// binaries returns the directory holding kube-apiserver and etcd, built by
// hack/kubecp if this machine's cache lacks them. The first call in the
// process finds (or builds) them, reporting through its logf; later calls
// reuse its answer, an error too. Only a missing go command or a system
// other than Linux wraps ErrUnavailable: a failed build is an error.
func binaries(logf func(string, ...any)) (string, error) {
	located.once.Do(func() { located.dir, located.err = locate(logf) })
	return located.dir, located.err
}

// locate is binaries' work, done once.
func locate(logf func(string, ...any)) (string, error) {
	if runtime.GOOS != "linux" {
		return "", fmt.Errorf("%w: kube-apiserver and etcd run with Linux-only process attributes, this is %s",
			ErrUnavailable, runtime.GOOS)
	}
	if _, err := exec.LookPath(goCommand()); err != nil {
		return "", fmt.Errorf("%w: no go command to build kube-apiserver and etcd with: %w", ErrUnavailable, err)
	}
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	cmd := exec.Command(goCommand(), "run", ".")
	cmd.Dir = filepath.Join(root, "hack", "kubecp")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	// hack/kubecp announces a build on stderr; a cached run is silent.
	logf("kube-apiserver and etcd from hack/kubecp: cached, or built now (minutes, once per machine; make kube-control-plane builds them ahead)")
	out, err := cmd.Output()
	took, said := time.Since(start).Round(time.Second), strings.TrimSpace(stderr.String())
	if err != nil {
		// In the error, so that every caller that reuses it sees why.
		return "", fmt.Errorf("building kube-apiserver and etcd with hack/kubecp (%s): %w\n%s", took, err, said)
	}
	if said != "" {
		logf("hack/kubecp (%s):\n%s", took, said)
	}
	return strings.TrimSpace(string(out)), nil
}

// repoRoot is the smesh repository's root directory. A test runs in its
// package's directory, a program somewhere in the repository; the go
// command knows the module from there.
func repoRoot() (string, error) {
	out, err := exec.Command(goCommand(), "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("finding the repository with %s env GOMOD: %w", goCommand(), err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("not inside the smesh module: cannot find its root")
	}
	return filepath.Dir(mod), nil
}

// goCommand is $GO (the Makefile sets it), else go from $PATH.
func goCommand() string {
	if g := os.Getenv("GO"); g != "" {
		return g
	}
	return "go"
}

// reserved are loopback ports held open until release. Ports picked one
// at a time (listen, close, next) can come out twice, in one control plane
// or in two started at once by test packages side by side: the kernel
// hands out a port closed a moment ago again. Held together, they differ
// from each other and from every other holder's; they are released just
// before the processes that bind them start, which leaves only a short
// window for a program that does not hold its ports (New retries then).
type reserved struct {
	addrs     []string // 127.0.0.1:PORT
	listeners []net.Listener
}

// reservePorts holds n distinct free loopback ports.
func reservePorts(n int) (*reserved, error) {
	r := &reserved{}
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			r.release()
			return nil, fmt.Errorf("picking a free loopback port: %w", err)
		}
		r.listeners = append(r.listeners, l)
		r.addrs = append(r.addrs, l.Addr().String())
	}
	return r, nil
}

// release closes the listeners, so that the ports can be bound.
func (r *reserved) release() {
	for _, l := range r.listeners {
		l.Close()
	}
	r.listeners = nil
}

// process is etcd or kube-apiserver, its output in a log file.
type process struct {
	name   string
	log    string
	cmd    *exec.Cmd
	exited chan struct{}
	err    error // of Wait, once exited is closed
}

// startProcess starts path with args, logging to logFile; Close stops it.
func (cp *ControlPlane) startProcess(path, logFile string, args ...string) (*process, error) {
	f, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	p := &process{name: filepath.Base(path), log: logFile, cmd: exec.Command(path, args...), exited: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = f, f
	// Gone with the program that started it, even if it dies before Close.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("starting %s: %w", p.name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		f.Close()
		close(p.exited)
	}()
	cp.procs = append(cp.procs, p)
	return p, nil
}

// stop ends the process by its PID: SIGTERM, then SIGKILL if it lingers.
func (p *process) stop() {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// tail is the end of the process's log, for a failure message.
func (p *process) tail() string {
	data, err := os.ReadFile(p.log)
	if err != nil {
		return fmt.Sprintf("%s log: %v", p.name, err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	return p.name + " log (last " + strconv.Itoa(len(lines)) + " lines):\n" + strings.Join(lines, "\n")
}
