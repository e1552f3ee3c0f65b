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

// ControlPlane is a running etcd and kube-apiserver, stopped in t.Cleanup.
type ControlPlane struct {
	// Admin reaches the API server as the test's admin, a client
	// certificate in the group system:masters (cluster-admin).
	Admin *rest.Config
	// Version is what the API server reports (GET /version), e.g. v1.34.3.
	Version string
	caPEM   []byte
}

// Start starts etcd and kube-apiserver and returns once the API server is
// ready. When it cannot run (no go command to build with, a failed build)
// the test is skipped, or failed under SMESH_REQUIRE_PRIVILEGED=1.
func Start(t testing.TB) *ControlPlane {
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
	host, port, _ := net.SplitHostPort(apiPort)
	apiserver := startProcess(t, filepath.Join(bin, "kube-apiserver"), filepath.Join(dir, "kube-apiserver.log"),
		"--etcd-servers=http://"+etcdClient,
		"--bind-address="+host,
		"--secure-port="+port,
		"--advertise-address="+host,
		"--tls-cert-file="+p.servingCert,
		"--tls-private-key-file="+p.servingKey,
		"--client-ca-file="+p.caFile,
		"--authorization-mode=Node,RBAC",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-signing-key-file="+p.saKeyFile,
		"--service-account-key-file="+p.saPubFile,
		// Only stored, never routed: the test range, as for test pods.
		"--service-cluster-ip-range=198.19.255.0/24",
		// The kubernetes Service's endpoints would name the loopback
		// address, which validation refuses; nothing here reaches the API
		// server through that Service.
		"--endpoint-reconciler-type=none",
	)
	cp := &ControlPlane{
		Admin: &rest.Config{
			Host: "https://" + apiPort,
			TLSClientConfig: rest.TLSClientConfig{
				CAData: p.caPEM, CertData: p.adminCertPEM, KeyData: p.adminKeyPEM,
			},
		},
		caPEM: p.caPEM,
	}
	if err := cp.waitReady(etcd, apiserver); err != nil {
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
	goCmd := os.Getenv("GO")
	if goCmd == "" {
		goCmd = "go"
	}
	// The test runs in its package's directory; the go command knows the
	// repository's root from there.
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
	t.Logf("kube-apiserver and etcd from hack/kubecp: cached, or built now (minutes, once per machine; make kube-control-plane builds them ahead)")
	out, err = cmd.Output()
	if s := strings.TrimSpace(stderr.String()); s != "" {
		t.Logf("hack/kubecp (%s):\n%s", time.Since(start).Round(time.Second), s)
	}
	if err != nil {
		return "", fmt.Errorf("building with hack/kubecp: %w", err)
	}
	return strings.TrimSpace(string(out)), nil
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
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(10 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			t.Log(p.tail())
		}
	})
	return p
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
