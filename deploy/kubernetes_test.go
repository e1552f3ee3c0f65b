package deploy

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"

	"github.com/smesh-dev/smesh/pkg/admin"
	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/daemon"
	"github.com/smesh-dev/smesh/pkg/metrics"
	"github.com/smesh-dev/smesh/pkg/testenv"
	"github.com/smesh-dev/smesh/pkg/testenv/kubecp"
)

const manifestDir = "kubernetes"

// imageBinary is where `make image` puts smeshd (hack/image binaryPath).
const imageBinary = "/usr/local/bin/smeshd"

// objects decodes every manifest of deploy/kubernetes.
func objects(t *testing.T) []runtime.Object {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(manifestDir, "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in %s: %v", manifestDir, err)
	}
	var objs []runtime.Object
	for _, f := range files {
		objs = append(objs, manifest(t, filepath.Base(f))...)
	}
	return objs
}

// manifest decodes the objects of one file of deploy/kubernetes.
func manifest(t *testing.T, name string) []runtime.Object {
	t.Helper()
	objs, err := kubecp.DecodeFile(filepath.Join(manifestDir, name))
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

func find[T runtime.Object](t *testing.T, objs []runtime.Object, name string) T {
	t.Helper()
	for _, o := range objs {
		if v, ok := o.(T); ok && o.(metav1.Object).GetName() == name {
			return v
		}
	}
	var zero T
	t.Fatalf("no %T named %s in %s", zero, name, manifestDir)
	return zero
}

func TestManifestsDecodeStrictly(t *testing.T) {
	objs := objects(t)
	seen := map[string]bool{}
	for _, o := range objs {
		m := o.(metav1.Object)
		kind := fmt.Sprintf("%T", o)
		kind = kind[strings.LastIndex(kind, ".")+1:]
		seen[kind] = true
		switch o.(type) {
		case *corev1.Namespace, *rbacv1.ClusterRole, *rbacv1.ClusterRoleBinding:
			if m.GetNamespace() != "" {
				t.Errorf("%s %s: cluster-scoped but has namespace %q", kind, m.GetName(), m.GetNamespace())
			}
		default:
			if m.GetNamespace() != "smesh-system" {
				t.Errorf("%s %s: namespace %q, want smesh-system", kind, m.GetName(), m.GetNamespace())
			}
		}
	}
	for _, k := range []string{"Namespace", "ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "DaemonSet"} {
		if !seen[k] {
			t.Errorf("no %s in %s", k, manifestDir)
		}
	}
}

// TestStrictDecodingCatchesTypos proves the decoding above is strict: a
// misspelt field, which the API server would drop with a warning (or
// kubectl refuse), fails here.
func TestStrictDecodingCatchesTypos(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(manifestDir, "daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ from, to string }{
		{"hostPID: true", "hostPid: true"},
		{"readinessProbe:", "readynessProbe:"},
		{"    type: RollingUpdate", "    type: RollingUpdate\n    paused: true"},
		{"      hostNetwork: true", "      hostNetwork: true\n      hostNetwork: false"},
	} {
		broken := strings.Replace(string(data), tc.from, tc.to, 1)
		if broken == string(data) {
			t.Fatalf("%q not in daemonset.yaml", tc.from)
		}
		if _, err := kubecp.DecodeStrict([]byte(broken)); err == nil {
			t.Errorf("daemonset.yaml with %q for %q decoded without error", tc.to, tc.from)
		}
	}
}

// smeshConfig is the smesh.toml the ConfigMap carries, parsed and validated
// as smeshd does.
func smeshConfig(t *testing.T, objs []runtime.Object) (config.Config, string) {
	t.Helper()
	cm := find[*corev1.ConfigMap](t, objs, "smesh-config")
	if len(cm.Data) != 1 {
		t.Fatalf("ConfigMap smesh-config has keys %v, want smesh.toml only", slices.Collect(maps.Keys(cm.Data)))
	}
	doc, ok := cm.Data["smesh.toml"]
	if !ok {
		t.Fatal("ConfigMap smesh-config has no smesh.toml")
	}
	cfg, err := config.Parse([]byte(doc))
	if err != nil {
		t.Fatalf("the ConfigMap's smesh.toml: %v", err)
	}
	return cfg, "smesh.toml"
}

func smeshdContainer(t *testing.T, ds *appsv1.DaemonSet) corev1.Container {
	t.Helper()
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name == "smeshd" {
			return c
		}
	}
	t.Fatal("the DaemonSet has no container smeshd")
	return corev1.Container{}
}

// mountFor returns the volume mount whose path holds file, and the volume.
func mountFor(t *testing.T, ds *appsv1.DaemonSet, c corev1.Container, file string) (corev1.VolumeMount, corev1.Volume) {
	t.Helper()
	var best corev1.VolumeMount
	for _, m := range c.VolumeMounts {
		if (file == m.MountPath || strings.HasPrefix(file, strings.TrimSuffix(m.MountPath, "/")+"/")) && len(m.MountPath) > len(best.MountPath) {
			best = m
		}
	}
	if best.Name == "" {
		t.Fatalf("nothing is mounted where smeshd opens %s", file)
	}
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.Name == best.Name {
			return best, v
		}
	}
	t.Fatalf("volume mount %s names no volume", best.Name)
	return best, corev1.Volume{}
}

// TestDaemonSetMatchesCode checks the DaemonSet against what smeshd, run
// with the ConfigMap's configuration, opens, listens on and serves.
func TestDaemonSetMatchesCode(t *testing.T) {
	objs := objects(t)
	cfg, key := smeshConfig(t, objs)
	ds := find[*appsv1.DaemonSet](t, objs, "smeshd")
	spec := ds.Spec.Template.Spec
	c := smeshdContainer(t, ds)

	// The configuration file smeshd is started with is the ConfigMap's.
	if len(c.Args) != 2 || c.Args[0] != "-c" || len(c.Command) != 0 {
		t.Fatalf("args %q (command %q): want [-c FILE] to the image's entrypoint", c.Args, c.Command)
	}
	m, v := mountFor(t, ds, c, c.Args[1])
	if v.ConfigMap == nil || v.ConfigMap.Name != "smesh-config" || path.Join(m.MountPath, key) != c.Args[1] {
		t.Errorf("smeshd -c %s is not the ConfigMap smesh-config's %s (mounted %s from %+v)", c.Args[1], key, m.MountPath, v.VolumeSource)
	}

	// [kubernetes]: on, with the node's name where it says.
	if !cfg.Kubernetes.Enabled {
		t.Error("the ConfigMap does not enable [kubernetes]")
	}
	var nodeEnv *corev1.EnvVar
	for i := range c.Env {
		if c.Env[i].Name == cfg.Kubernetes.NodeNameEnv {
			nodeEnv = &c.Env[i]
		}
	}
	if nodeEnv == nil || nodeEnv.ValueFrom == nil || nodeEnv.ValueFrom.FieldRef == nil || nodeEnv.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("$%s (kubernetes.node_name_env) is not set from spec.nodeName: %+v", cfg.Kubernetes.NodeNameEnv, nodeEnv)
	}
	if len(cfg.Capture.Cgroups) != 0 {
		t.Errorf("capture.cgroups = %v: in a cluster pods join by label, and smeshd cannot create cgroups in the read-only cgroup mount", cfg.Capture.Cgroups)
	}

	// Probes: liveness is the node's admin endpoint (whichever smeshd of
	// the node answers: after a hand-over the old pod's idle smeshd must
	// not be restarted into a take-back); readiness is this container's
	// smeshd's, asked with `smeshd ready` from its cgroup, with the
	// configuration smeshd runs with.
	admin := cfg.Admin.Listen
	if p := c.LivenessProbe; p == nil || p.HTTPGet == nil {
		t.Error("no HTTP liveness probe")
	} else if g := p.HTTPGet; g.Path != "/healthz" || g.Port.IntValue() != int(admin.Port()) || g.Host != admin.Addr().String() ||
		(g.Scheme != "" && g.Scheme != corev1.URISchemeHTTP) {
		t.Errorf("liveness probe GET %s %s:%s%s, want http %s/healthz (admin.listen)", g.Scheme, g.Host, g.Port.String(), g.Path, admin)
	}
	if p := c.ReadinessProbe; p == nil || p.Exec == nil {
		t.Error("no exec readiness probe: an HTTP one is answered by whichever smeshd of the node holds the admin listener")
	} else if want := []string{imageBinary, "ready", "-c", c.Args[1]}; !slices.Equal(p.Exec.Command, want) {
		t.Errorf("readiness probe %q, want %q", p.Exec.Command, want)
	} else if p.TimeoutSeconds < 4 {
		t.Errorf("readiness probe timeoutSeconds %d: smeshd ready waits up to 3s for the answer", p.TimeoutSeconds)
	}
	// The kubelet reaches a loopback admin address only in the node's
	// network namespace.
	if admin.Addr().IsLoopback() && !spec.HostNetwork {
		t.Error("admin.listen is on loopback but the pod is not on the host network: the kubelet's probes cannot reach it")
	}
	if !spec.HostPID {
		t.Error("hostPID is off: the PIDs in pods' cgroup.procs would not name processes smeshd can see")
	}

	// No port declared: on the host network it would be a hostPort, and
	// the new pod of a rollout could not be scheduled beside the old one.
	if len(c.Ports) != 0 {
		t.Errorf("ports %+v declared: with hostNetwork each is a hostPort, which keeps maxSurge's new pod off the node", c.Ports)
	}
	if cfg.Tunnel.PeerPort != cfg.Tunnel.Listen.Port() {
		t.Errorf("tunnel.peer_port %d differs from the port every node listens on, %d", cfg.Tunnel.PeerPort, cfg.Tunnel.Listen.Port())
	}

	// Identity: the Secret's files, where [tunnel.tls] reads them.
	if cfg.Tunnel.TLS.Mode != "mtls" || cfg.Tunnel.TLS.Source != "files" {
		t.Fatalf("[tunnel.tls] mode %q source %q: the manifests ship mtls from the Secret", cfg.Tunnel.TLS.Mode, cfg.Tunnel.TLS.Source)
	}
	for f, secretKey := range map[string]string{cfg.Tunnel.TLS.Cert: "tls.crt", cfg.Tunnel.TLS.Key: "tls.key", cfg.Tunnel.TLS.CA: "ca.crt"} {
		m, v := mountFor(t, ds, c, f)
		if v.Secret == nil || v.Secret.SecretName != "smesh-tls" || path.Join(m.MountPath, secretKey) != f {
			t.Errorf("%s is not key %s of the Secret smesh-tls (mount %s, volume %+v)", f, secretKey, m.MountPath, v.VolumeSource)
		}
	}

	// The node's cgroup v2 tree where smeshd finds it (/proc/self/mounts:
	// the mount at /sys/fs/cgroup), and the node's bpffs below pin_dir.
	m, v = mountFor(t, ds, c, "/sys/fs/cgroup")
	if m.MountPath != "/sys/fs/cgroup" || v.HostPath == nil || v.HostPath.Path != "/sys/fs/cgroup" {
		t.Errorf("/sys/fs/cgroup: mount %+v of %+v, want the node's /sys/fs/cgroup", m, v.VolumeSource)
	}
	m, v = mountFor(t, ds, c, cfg.Capture.PinDir)
	if v.HostPath == nil || v.HostPath.Path != m.MountPath || !strings.HasPrefix(m.MountPath, "/sys/fs/bpf") || m.ReadOnly {
		t.Errorf("capture.pin_dir %s: mount %+v of %+v, want the node's bpffs, writable", cfg.Capture.PinDir, m, v.VolumeSource)
	}
	// The hand-over socket in the host's /run/smesh, RUNTIME_DIRECTORY.
	var runtimeDir string
	for _, e := range c.Env {
		if e.Name == "RUNTIME_DIRECTORY" {
			runtimeDir = e.Value
		}
	}
	if runtimeDir == "" {
		t.Error("RUNTIME_DIRECTORY is not set: smeshd serves no hand-over socket, and a rollout cannot hand over")
	} else {
		m, v := mountFor(t, ds, c, path.Join(runtimeDir, "handover.sock"))
		if m.MountPath != runtimeDir || m.ReadOnly || v.HostPath == nil || v.HostPath.Path != "/run/smesh" ||
			v.HostPath.Type == nil || *v.HostPath.Type != corev1.HostPathDirectoryOrCreate {
			t.Errorf("RUNTIME_DIRECTORY %s: mount %+v of %+v, want the host's /run/smesh (DirectoryOrCreate), writable", runtimeDir, m, v.VolumeSource)
		}
	}
	if cfg.Daemon.AfterRelease != "wait" {
		t.Errorf("daemon.after_release = %q: a released smeshd that exits is restarted by the kubelet and takes everything back", cfg.Daemon.AfterRelease)
	}
	for _, v := range spec.Volumes {
		if v.HostPath != nil && !slices.Contains([]string{"/sys/fs/cgroup", "/sys/fs/bpf", "/run/smesh"}, v.HostPath.Path) {
			t.Errorf("host path %s mounted: smeshd opens nothing there", v.HostPath.Path)
		}
	}
	if sc := c.SecurityContext; sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Error("the root file system is writable: smeshd writes nothing there")
	}

	// Stopping: SIGTERM starts the drain; the kubelet must wait for it.
	grace := time.Duration(*spec.TerminationGracePeriodSeconds) * time.Second
	var preStop time.Duration
	if c.Lifecycle != nil && c.Lifecycle.PreStop != nil {
		if c.Lifecycle.PreStop.Sleep == nil {
			t.Error("a preStop hook other than sleep: the image has nothing to exec")
		} else {
			preStop = time.Duration(c.Lifecycle.PreStop.Sleep.Seconds) * time.Second
		}
	}
	if need := preStop + cfg.Daemon.DrainTimeout.Duration + 5*time.Second; grace < need {
		t.Errorf("terminationGracePeriodSeconds %s < preStop %s + daemon.drain_timeout %s + 5s to exit", grace, preStop, cfg.Daemon.DrainTimeout)
	}

	// Upgrades: the new pod beside the old one, which it takes over from.
	ru := ds.Spec.UpdateStrategy.RollingUpdate
	if ds.Spec.UpdateStrategy.Type != appsv1.RollingUpdateDaemonSetStrategyType || ru == nil ||
		ru.MaxSurge == nil || ru.MaxSurge.IntValue() != 1 || ru.MaxUnavailable == nil || ru.MaxUnavailable.IntValue() != 0 {
		t.Errorf("update strategy %+v: want RollingUpdate with maxSurge 1 and maxUnavailable 0 (the hand-over needs the new pod beside the old)", ds.Spec.UpdateStrategy)
	}
	if spec.ServiceAccountName != "smeshd" {
		t.Errorf("service account %q, want smeshd", spec.ServiceAccountName)
	}
}

// wantCapabilities is the DaemonSet's whole privilege, each for a reason
// daemonset.yaml gives; TestDaemonSetCapabilities shows the kernel agrees.
var wantCapabilities = []corev1.Capability{"BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"}

func TestDaemonSetSecurityContext(t *testing.T) {
	ds := find[*appsv1.DaemonSet](t, objects(t), "smeshd")
	c := smeshdContainer(t, ds)
	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Fatal("no capabilities set")
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Error("privileged: smeshd needs a few capabilities, not all of them")
	}
	if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("drop %v, want [ALL]", sc.Capabilities.Drop)
	}
	add := slices.Clone(sc.Capabilities.Add)
	slices.Sort(add)
	if !slices.Equal(add, wantCapabilities) {
		t.Errorf("capabilities %v, want %v", add, wantCapabilities)
	}
	// Each one added has its reason in a comment.
	data, _ := os.ReadFile(filepath.Join(manifestDir, "daemonset.yaml"))
	for _, capName := range wantCapabilities {
		re := regexp.MustCompile(`(?m)((^\s*#.*\n)+)\s*- ` + string(capName) + `\n`)
		if !re.Match(data) {
			t.Errorf("capability %s is added without a comment saying why", capName)
		}
	}
	if ds.Spec.Template.Spec.Containers[0].SecurityContext.AllowPrivilegeEscalation != nil {
		// With CAP_SYS_ADMIN the API server refuses allowPrivilegeEscalation: false.
		t.Error("allowPrivilegeEscalation set: the API server rejects false together with SYS_ADMIN")
	}
}

// TestProbesReachAdmin asks the admin server, built as smeshd builds it,
// the probes' questions: liveness over HTTP, readiness as `smeshd ready`
// (daemon.Probe) asks it from the container's cgroup, which this test
// process plays (the answering smeshd is this process).
func TestProbesReachAdmin(t *testing.T) {
	objs := objects(t)
	ds := find[*appsv1.DaemonSet](t, objs, "smeshd")
	c := smeshdContainer(t, ds)
	srv, err := admin.New(netip.MustParseAddrPort("127.0.0.1:0"), metrics.New("test"), nil, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	defer srv.Shutdown(context.Background())
	live := c.LivenessProbe.HTTPGet.Path
	getLive := func() int {
		resp, err := http.Get("http://" + srv.Addr().String() + live)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	ready := func() error { return daemon.Probe(context.Background(), srv.Addr(), 3*time.Second) }
	if err := ready(); err == nil || !strings.Contains(err.Error(), "503") {
		t.Errorf("readiness while starting: %v, want 503", err)
	}
	if got := getLive(); got != http.StatusOK {
		t.Errorf("liveness %s while starting: %d, want 200", live, got)
	}
	srv.SetReady(true)
	if err := ready(); err != nil {
		t.Errorf("readiness when ready: %v", err)
	}
	srv.SetDraining()
	if err := ready(); err == nil || !strings.Contains(err.Error(), "draining") {
		t.Errorf("readiness while draining: %v, want 503 draining", err)
	}
	if got := getLive(); got != http.StatusOK {
		t.Errorf("liveness %s while draining: %d, want 200 (a draining smeshd must not be killed)", live, got)
	}
}

// TestReadinessIsOwnSmeshds: `smeshd ready` takes an answer only from a
// smeshd of its own cgroup: a ready smeshd of another cgroup (the other pod
// of a rollout, sharing the node's admin listener) is not this pod's
// readiness.
func TestReadinessIsOwnSmeshds(t *testing.T) {
	testenv.RequirePrivileged(t)
	other := testenv.StartProcess(t, testenv.NewCgroup(t), "", "sleep", "60")
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(admin.PIDHeader, strconv.Itoa(other.PID()))
		fmt.Fprintln(w, "ready")
	}))
	defer srv.Close()
	addr := netip.MustParseAddrPort(strings.TrimPrefix(srv.URL, "http://"))
	err := daemon.Probe(context.Background(), addr, 3*time.Second)
	if err == nil || !strings.Contains(err.Error(), "not this container's") {
		t.Errorf("readiness answered by a smeshd of another cgroup: %v, want not ready", err)
	}
}

func TestRBACLeastPrivilege(t *testing.T) {
	objs := objects(t)
	role := find[*rbacv1.ClusterRole](t, objs, "smeshd")
	want := []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"list", "watch"}},
		{APIGroups: []string{""}, Resources: []string{"namespaces"}, Verbs: []string{"list", "watch"}},
		{APIGroups: []string{""}, Resources: []string{"services"}, Verbs: []string{"list", "watch"}},
		{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"list", "watch"}},
		{APIGroups: []string{"security.istio.io"}, Resources: []string{"authorizationpolicies"}, Verbs: []string{"list", "watch"}},
	}
	if len(role.Rules) != len(want) {
		t.Fatalf("rules %+v, want %+v", role.Rules, want)
	}
	for i, r := range role.Rules {
		w := want[i]
		if !slices.Equal(r.APIGroups, w.APIGroups) || !slices.Equal(r.Resources, w.Resources) || !slices.Equal(r.Verbs, w.Verbs) ||
			len(r.ResourceNames) != 0 || len(r.NonResourceURLs) != 0 {
			t.Errorf("rule %d: %+v, want %+v", i, r, w)
		}
	}
	b := find[*rbacv1.ClusterRoleBinding](t, objs, "smeshd")
	if b.RoleRef.Kind != "ClusterRole" || b.RoleRef.Name != "smeshd" || len(b.Subjects) != 1 ||
		b.Subjects[0].Kind != "ServiceAccount" || b.Subjects[0].Name != "smeshd" || b.Subjects[0].Namespace != "smesh-system" {
		t.Errorf("binding %+v: want ClusterRole smeshd for ServiceAccount smesh-system/smeshd", b)
	}
	find[*corev1.ServiceAccount](t, objs, "smeshd")
}

// TestImageReference: the DaemonSet runs the image `make image` builds.
func TestImageReference(t *testing.T) {
	ds := find[*appsv1.DaemonSet](t, objects(t), "smeshd")
	c := smeshdContainer(t, ds)
	mk, err := os.ReadFile("../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^IMAGE \?= (\S+)$`).FindSubmatch(mk)
	if m == nil {
		t.Fatal("no IMAGE ?= in the Makefile")
	}
	if c.Image != string(m[1]) {
		t.Errorf("the DaemonSet runs %s, make image builds %s", c.Image, m[1])
	}
	src, err := os.ReadFile("../hack/image/main.go")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(src), fmt.Sprintf("const binaryPath = %q", imageBinary)) {
		t.Errorf("the readiness probe runs %s, which hack/image does not put smeshd at", imageBinary)
	}
	if c.ImagePullPolicy != corev1.PullIfNotPresent {
		t.Errorf("imagePullPolicy %s: an image loaded into the nodes (kind load) must not be pulled", c.ImagePullPolicy)
	}
}

// certManagerObject is what the cert-manager example's objects must have;
// its types are not in k8s.io/api, so only these fields are checked.
type certManagerObject struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
	} `json:"metadata"`
	Spec struct {
		SecretName string   `json:"secretName"`
		URIs       []string `json:"uris"`
		Usages     []string `json:"usages"`
	} `json:"spec"`
}

func TestCertManagerCertificate(t *testing.T) {
	ds := find[*appsv1.DaemonSet](t, objects(t), "smeshd")
	data, err := os.ReadFile(filepath.Join(manifestDir, "cert-manager", "certificate.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	docs, err := kubecp.SplitDocuments(data)
	if err != nil {
		t.Fatal(err)
	}
	secret := ""
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.Secret != nil {
			secret = v.Secret.SecretName
		}
	}
	found := false
	for _, doc := range docs {
		var o certManagerObject
		if err := yaml.Unmarshal(doc, &o); err != nil {
			t.Fatal(err)
		}
		if o.APIVersion != "cert-manager.io/v1" || o.Metadata.Namespace != "smesh-system" {
			t.Errorf("%s %s: apiVersion %s namespace %s", o.Kind, o.Metadata.Name, o.APIVersion, o.Metadata.Namespace)
		}
		if o.Kind != "Certificate" || o.Spec.SecretName != secret {
			continue
		}
		found = true
		for _, u := range []string{"server auth", "client auth"} {
			if !slices.Contains(o.Spec.Usages, u) {
				t.Errorf("certificate %s lacks usage %q: the tunnel's ends are both client and server", o.Metadata.Name, u)
			}
		}
		if len(o.Spec.URIs) != 1 || !strings.HasPrefix(o.Spec.URIs[0], "spiffe://") {
			t.Errorf("certificate %s URIs %v: want one SPIFFE ID", o.Metadata.Name, o.Spec.URIs)
		}
	}
	if !found {
		t.Errorf("no cert-manager Certificate writes the Secret %q the DaemonSet mounts", secret)
	}
}
