// Package kubecp starts a real Kubernetes control plane for a test: etcd and
// kube-apiserver, on loopback ports of their own, with real authentication
// and authorization (client certificates, service account tokens,
// --authorization-mode=Node,RBAC). What smeshd meets in a cluster is then
// checked against the API server itself, not a stand-in.
//
// The binaries are built from source by hack/kubecp (its own Go module, so
// the main go.mod does not grow) once per machine into a cache directory;
// the first Start on a machine waits for that build, minutes, and says so.
// There is no kubelet and no controller-manager: nothing runs pods, and
// what a controller would make (a namespace's default ServiceAccount, token
// Secrets) a test creates itself.
//
//	cp := kubecp.Start(t)
//	admin := kubernetes.NewForConfigOrDie(cp.Admin)
//	... create a ServiceAccount ...
//	sa := cp.ServiceAccount(t, "smesh-system", "smeshd")
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
	"slices"
	"strconv"
	"strings"
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

// ControlPlane is a running etcd and kube-apiserver, stopped in t.Cleanup.
type ControlPlane struct {
	// Admin reaches the API server as the test's admin, a client
	// certificate in the group system:masters (cluster-admin).
	Admin *rest.Config
	// Version is what the API server reports (GET /version), e.g. v1.34.3.
	Version string
	// Etcd is etcd's client URL, http://127.0.0.1:PORT.
	Etcd string
	// AuditLog is the API server's audit log (JSON lines, one
	// audit.k8s.io/v1 Event per request at the Metadata level): what was
	// asked, by whom, with which query.
	AuditLog string

	caPEM     []byte
	bin       string
	etcd      *process
	apiserver *process
	args      []string // kube-apiserver's
	dir       string
}

// Options change how Start runs the API server.
type Options struct {
	// NoWatchCache runs kube-apiserver with --watch-cache=false: watches
	// go to etcd itself, so a watch from a compacted revision is answered
	// by etcd's compaction ("410 Gone"), not by the watch cache's window.
	NoWatchCache bool
}

// auditPolicy records every request at the Metadata level (user, verb,
// URI with its query, status): enough to see what a client asked for.
const auditPolicy = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
`

// Start starts etcd and kube-apiserver and returns once the API server is
// ready. When it cannot run (no go command to build with, a failed build)
// the test is skipped, or failed under SMESH_REQUIRE_PRIVILEGED=1.
func Start(t testing.TB) *ControlPlane {
	t.Helper()
	return StartWith(t, Options{})
}

// StartWith is Start with options.
func StartWith(t testing.TB, o Options) *ControlPlane {
	t.Helper()
	bin, err := binaries(t)
	if err != nil {
		testenv.SkipOrFail(t, "kubernetes control plane: %v", err)
	}
	dir := t.TempDir()
	p, err := newPKI(dir)
	if err != nil {
		t.Fatalf("kubernetes control plane certificates: %v", err)
	}
	policy := filepath.Join(dir, "audit-policy.yaml")
	if err := os.WriteFile(policy, []byte(auditPolicy), 0o600); err != nil {
		t.Fatal(err)
	}
	etcdClient, etcdPeer, apiPort := freePort(t), freePort(t), freePort(t)
	etcd := startProcess(t, filepath.Join(bin, "etcd"), filepath.Join(dir, "etcd.log"),
		"--name=kubecp",
		"--data-dir="+filepath.Join(dir, "etcd"),
		"--listen-client-urls=http://"+etcdClient,
		"--advertise-client-urls=http://"+etcdClient,
		"--listen-peer-urls=http://"+etcdPeer,
		"--initial-advertise-peer-urls=http://"+etcdPeer,
		"--initial-cluster=kubecp=http://"+etcdPeer,
		// A test's data need not survive a crash of the machine.
		"--unsafe-no-fsync",
		"--log-level=warn",
	)
	cp := &ControlPlane{
		Etcd:     "http://" + etcdClient,
		AuditLog: filepath.Join(dir, "audit.log"),
		caPEM:    p.caPEM,
		bin:      bin,
		etcd:     etcd,
		dir:      dir,
	}
	cp.args = cp.apiserverArgs(p, apiPort, policy, cp.AuditLog, o)
	cp.apiserver = startProcess(t, filepath.Join(bin, "kube-apiserver"), filepath.Join(dir, "kube-apiserver.log"), cp.args...)
	cp.Admin = &rest.Config{
		Host: "https://" + apiPort,
		TLSClientConfig: rest.TLSClientConfig{
			CAData: p.caPEM, CertData: p.adminCertPEM, KeyData: p.adminKeyPEM,
		},
	}
	if err := cp.waitReady(etcd, cp.apiserver); err != nil {
		// The processes' cleanups log the end of their logs.
		t.Fatalf("kubernetes control plane: %v", err)
	}
	cs, err := kubernetes.NewForConfig(cp.Admin)
	if err != nil {
		t.Fatal(err)
	}
	v, err := cs.Discovery().ServerVersion()
	if err != nil {
		t.Fatalf("kubernetes control plane version: %v", err)
	}
	cp.Version = v.GitVersion
	t.Logf("kube-apiserver %s at %s, etcd at %s", cp.Version, cp.Admin.Host, etcdClient)
	return cp
}

func (cp *ControlPlane) apiserverArgs(p *pki, addr, policy, auditLog string, o Options) []string {
	host, port, _ := net.SplitHostPort(addr)
	return []string{
		"--etcd-servers=" + cp.Etcd,
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
		// Only stored, never routed: the test range, as for test pods.
		"--service-cluster-ip-range=198.19.255.0/24",
		// The kubernetes Service's endpoints would name the loopback
		// address, which validation refuses; nothing here reaches the API
		// server through that Service.
		"--endpoint-reconciler-type=none",
		"--audit-policy-file=" + policy,
		"--audit-log-path=" + auditLog,
		"--watch-cache=" + strconv.FormatBool(!o.NoWatchCache),
	}
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
	// The log goes on in a file of its own, the first one kept for a
	// failure's cleanup.
	cp.apiserver = startProcess(t, filepath.Join(cp.bin, "kube-apiserver"),
		filepath.Join(cp.dir, fmt.Sprintf("kube-apiserver-%d.log", time.Now().UnixNano())), cp.args...)
	if err := cp.waitReady(cp.etcd, cp.apiserver); err != nil {
		t.Fatalf("kube-apiserver after its restart: %v", err)
	}
}

// Second starts another kube-apiserver on the same etcd, with the same keys
// and CA (an HA control plane's second member), and returns a config for
// the test's admin on it. Objects written through it while the first one
// is down are what a client of the first finds changed after a restart.
func (cp *ControlPlane) Second(t testing.TB) *rest.Config {
	t.Helper()
	addr := freePort(t)
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
	p := startProcess(t, filepath.Join(cp.bin, "kube-apiserver"), filepath.Join(cp.dir, "kube-apiserver-second.log"), args...)
	second := &ControlPlane{Admin: rest.CopyConfig(cp.Admin)}
	second.Admin.Host = "https://" + addr
	if err := second.waitReady(cp.etcd, p); err != nil {
		t.Fatalf("second kube-apiserver: %v", err)
	}
	return second.Admin
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

// AuditEvent is what a test reads of an audit.k8s.io/v1 Event (the
// k8s.io/apiserver module that declares it is not linked for this).
type AuditEvent struct {
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

// ServiceAccount returns a config that reaches the API server as the
// ServiceAccount namespace/name, which must exist, with a token from the
// TokenRequest API, as the kubelet mounts into a pod.
func (cp *ControlPlane) ServiceAccount(t testing.TB, namespace, name string) *rest.Config {
	t.Helper()
	cs, err := kubernetes.NewForConfig(cp.Admin)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	expiry := int64(3600)
	tr, err := cs.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, name,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &expiry}},
		metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("token for service account %s/%s: %v", namespace, name, err)
	}
	return &rest.Config{
		Host:            cp.Admin.Host,
		TLSClientConfig: rest.TLSClientConfig{CAData: cp.caPEM},
		BearerToken:     tr.Status.Token,
	}
}

// waitReady polls /readyz until it answers 200, a process exits, or
// readyTimeout passes.
func (cp *ControlPlane) waitReady(procs ...*process) error {
	hc, err := rest.HTTPClientFor(cp.Admin)
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
		resp, err := hc.Get(cp.Admin.Host + "/readyz?verbose")
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

// binaries returns the directory holding kube-apiserver and etcd, built by
// hack/kubecp if this machine's cache lacks them.
func binaries(t testing.TB) (string, error) {
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
	t.Logf("kube-apiserver and etcd from hack/kubecp: cached, or built now (minutes, once per machine; make kube-control-plane builds them ahead)")
	out, err := cmd.Output()
	if s := strings.TrimSpace(stderr.String()); s != "" {
		t.Logf("hack/kubecp (%s):\n%s", time.Since(start).Round(time.Second), s)
	}
	if err != nil {
		return "", fmt.Errorf("building with hack/kubecp: %w", err)
	}
	return strings.TrimSpace(string(out)), nil
}

// repoRoot is the smesh repository's root directory. The test runs in its
// package's directory; the go command knows the module from there.
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

// freePort returns a loopback address with a port that was free a moment
// ago: the processes bind it themselves.
func freePort(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// process is etcd or kube-apiserver, its output in a log file.
type process struct {
	name   string
	log    string
	cmd    *exec.Cmd
	exited chan struct{}
	err    error // of Wait, once exited is closed
}

// startProcess starts path with args, logging to logFile, and stops it by
// its PID in t.Cleanup: SIGTERM, then SIGKILL if it lingers.
func startProcess(t testing.TB, path, logFile string, args ...string) *process {
	t.Helper()
	f, err := os.Create(logFile)
	if err != nil {
		t.Fatal(err)
	}
	p := &process{name: filepath.Base(path), log: logFile, cmd: exec.Command(path, args...), exited: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = f, f
	// Gone with the test binary, even if it dies before its cleanups.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("starting %s: %v", p.name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		f.Close()
		close(p.exited)
	}()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Log(p.tail())
		}
	})
	return p
}

// stop ends the process by its PID: SIGTERM, then SIGKILL if it lingers.
// Stopping a process that has exited is a no-op.
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
