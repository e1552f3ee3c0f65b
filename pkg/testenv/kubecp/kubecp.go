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
// A program that is not a test (hack/kubescale) uses New and Close.
package kubecp

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
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

// ErrUnavailable marks an error of New that says the control plane cannot
// run on this machine (no go command to build it with, a failed build),
// as opposed to one that failed while starting.
var ErrUnavailable = errors.New("kubernetes control plane unavailable")

// Options configure New.
type Options struct {
	// Dir holds the certificates, etcd's data and the logs; it must exist.
	Dir string
	// Logf reports progress; nil discards it.
	Logf func(format string, args ...any)
	// APIServerArgs are added to kube-apiserver's flags (e.g. an audit
	// policy).
	APIServerArgs []string
}

// ControlPlane is a running etcd and kube-apiserver.
type ControlPlane struct {
	// Admin reaches the API server as the test's admin, a client
	// certificate in the group system:masters (cluster-admin).
	Admin *rest.Config
	// Version is what the API server reports (GET /version), e.g. v1.34.3.
	Version string
	// PIDs of kube-apiserver and etcd.
	APIServerPID, EtcdPID int
	caPEM                 []byte
	procs                 []*process // stopped in reverse order
}

// Start starts etcd and kube-apiserver and returns once the API server is
// ready; they are stopped in t.Cleanup. When it cannot run (no go command
// to build with, a failed build) the test is skipped, or failed under
// SMESH_REQUIRE_PRIVILEGED=1.
func Start(t testing.TB) *ControlPlane {
	t.Helper()
	cp, err := New(Options{Dir: t.TempDir(), Logf: t.Logf})
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

// New starts etcd and kube-apiserver and returns once the API server is
// ready. The caller stops them with Close. An error that says the control
// plane cannot run here wraps ErrUnavailable.
func New(o Options) (cp *ControlPlane, err error) {
	logf := o.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	bin, err := binaries(logf)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	p, err := newPKI(o.Dir)
	if err != nil {
		return nil, fmt.Errorf("kubernetes control plane certificates: %w", err)
	}
	ports := make([]string, 3)
	for i := range ports {
		if ports[i], err = freePort(); err != nil {
			return nil, err
		}
	}
	etcdClient, etcdPeer, apiPort := ports[0], ports[1], ports[2]
	cp = &ControlPlane{
		Admin: &rest.Config{
			Host: "https://" + apiPort,
			TLSClientConfig: rest.TLSClientConfig{
				CAData: p.caPEM, CertData: p.adminCertPEM, KeyData: p.adminKeyPEM,
			},
		},
		caPEM: p.caPEM,
	}
	defer func() {
		if err != nil {
			for _, p := range cp.procs {
				logf("%s", p.tail())
			}
			cp.Close()
		}
	}()
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
	host, port, _ := net.SplitHostPort(apiPort)
	apiserver, err := cp.startProcess(filepath.Join(bin, "kube-apiserver"), filepath.Join(o.Dir, "kube-apiserver.log"),
		append([]string{
			"--etcd-servers=http://" + etcdClient,
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
		}, o.APIServerArgs...)...,
	)
	if err != nil {
		return cp, err
	}
	cp.APIServerPID = apiserver.cmd.Process.Pid
	if err := cp.waitReady(etcd, apiserver); err != nil {
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
	logf("kube-apiserver %s at %s, etcd at %s", cp.Version, cp.Admin.Host, etcdClient)
	return cp, nil
}

// Close stops kube-apiserver, then etcd, by their PIDs: SIGTERM, then
// SIGKILL if one lingers. It may be called more than once.
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

// CA is the PEM certificate of the CA that signed the API server's serving
// certificate, what a pod finds as ca.crt in its service account mount.
func (cp *ControlPlane) CA() []byte { return bytes.Clone(cp.caPEM) }

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
func binaries(logf func(string, ...any)) (string, error) {
	goCmd := os.Getenv("GO")
	if goCmd == "" {
		goCmd = "go"
	}
	// A test runs in its package's directory, a program somewhere in the
	// repository; the go command knows the repository's root from there.
	out, err := exec.Command(goCmd, "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("finding the repository with %s env GOMOD: %w", goCmd, err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("not inside the smesh module: cannot find hack/kubecp")
	}
	cmd := exec.Command(goCmd, "run", ".")
	cmd.Dir = filepath.Join(filepath.Dir(mod), "hack", "kubecp")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	// hack/kubecp announces a build on stderr; a cached run is silent.
	logf("kube-apiserver and etcd from hack/kubecp: cached, or built now (minutes, once per machine; make kube-control-plane builds them ahead)")
	out, err = cmd.Output()
	if s := strings.TrimSpace(stderr.String()); s != "" {
		logf("hack/kubecp (%s):\n%s", time.Since(start).Round(time.Second), s)
	}
	if err != nil {
		return "", fmt.Errorf("building with hack/kubecp: %w", err)
	}
	return strings.TrimSpace(string(out)), nil
}

// freePort returns a loopback address with a port that was free a moment
// ago: the processes bind it themselves.
func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
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
