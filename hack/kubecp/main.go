// Command kubecp builds the Kubernetes control plane the tests start
// (pkg/testenv/kubecp): kube-apiserver from k8s.io/kubernetes and etcd from
// go.etcd.io/etcd/server/v3, at the versions this module's go.mod requires.
// Both are built once per machine into a cache directory keyed by those
// versions, and the directory is printed on stdout; a second run finds it
// and builds nothing. The default cache is in /var/cache (for root) so
// that it outlives the fresh clone CI makes for every run.
//
// The first build takes minutes (kube-apiserver is most of Kubernetes):
// concurrent runs (test packages started side by side) wait for one build
// under a lock instead of building twice.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "kubecp:", err)
		os.Exit(1)
	}
}

// binary is one program of the control plane and how it is built.
type binary struct {
	name string // the file in the cache directory
	pkg  string // the main package
	mod  string // the module whose version it reports
}

var binaries = []binary{
	{"kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver", "k8s.io/kubernetes"},
	{"etcd", "go.etcd.io/etcd/server/v3", "go.etcd.io/etcd/server/v3"},
}

func run(ctx context.Context) error {
	cache := flag.String("cache", defaultCache(), "where the built binaries are kept, one directory per version pair")
	flag.Parse()
	goCmd := os.Getenv("GO")
	if goCmd == "" {
		goCmd = "go"
	}
	// go.mod next to this program says which versions to build.
	modDir, err := moduleDir(ctx, goCmd)
	if err != nil {
		return err
	}
	versions := map[string]string{}
	for _, b := range binaries {
		v, err := goOutput(ctx, goCmd, modDir, "list", "-m", "-f", "{{.Version}}", b.mod)
		if err != nil {
			return fmt.Errorf("version of %s: %w", b.mod, err)
		}
		versions[b.mod] = v
	}
	k8s, etcd := versions[binaries[0].mod], versions[binaries[1].mod]
	dir := filepath.Join(*cache, fmt.Sprintf("kube-%s-etcd-%s-%s", k8s, etcd, runtime.GOARCH))
	if done(dir) {
		fmt.Println(dir)
		return nil
	}

	if err := os.MkdirAll(*cache, 0o755); err != nil {
		return fmt.Errorf("cache directory: %w", err)
	}
	unlock, err := lock(filepath.Join(*cache, ".lock"))
	if err != nil {
		return err
	}
	defer unlock()
	// Another run may have built it while this one waited for the lock.
	if done(dir) {
		fmt.Println(dir)
		return nil
	}
	fmt.Fprintf(os.Stderr, "kubecp: building kube-apiserver %s and etcd %s once into %s (several minutes the first time)\n", k8s, etcd, dir)
	tmp, err := os.MkdirTemp(*cache, ".build-")
	if err != nil {
		return fmt.Errorf("cache directory: %w", err)
	}
	defer os.RemoveAll(tmp)
	// MkdirTemp's 0700 would keep the binaries from other users' tests.
	if err := os.Chmod(tmp, 0o755); err != nil {
		return err
	}
	for _, b := range binaries {
		start := time.Now()
		ldflags := "-s -w"
		if b.name == "kube-apiserver" {
			ldflags += versionFlags(k8s)
		}
		cmd := exec.CommandContext(ctx, goCmd, "build", "-trimpath", "-ldflags", ldflags,
			"-o", filepath.Join(tmp, b.name), b.pkg)
		cmd.Dir = modDir
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		// The binaries run on this machine only; static builds load nothing
		// from the host's libc.
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("building %s: %w", b.pkg, err)
		}
		fi, err := os.Stat(filepath.Join(tmp, b.name))
		if err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "kubecp: built %s %s in %s, %d MB\n", b.name, versions[b.mod],
			time.Since(start).Round(time.Second), fi.Size()>>20)
	}
	// The directory appears whole or not at all: a build cut short leaves
	// only .build-* behind, which the next build does not read.
	if err := os.Rename(tmp, dir); err != nil {
		return fmt.Errorf("cache directory: %w", err)
	}
	fmt.Println(dir)
	return nil
}

// defaultCache is /var/cache/smesh-test-kubecp for root (it survives a
// fresh clone of the repository, as CI makes), else the user's cache
// directory.
func defaultCache() string {
	if os.Geteuid() == 0 {
		return "/var/cache/smesh-test-kubecp"
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "smesh-test-kubecp")
	}
	return filepath.Join(os.TempDir(), "smesh-test-kubecp")
}

// versionFlags makes kube-apiserver report version v (GET /version,
// --version) as a release build does; without them it says v0.0.0.
func versionFlags(v string) string {
	major, minor, _ := strings.Cut(strings.TrimPrefix(v, "v"), ".")
	minor, _, _ = strings.Cut(minor, ".")
	const pkg = "k8s.io/component-base/version"
	return fmt.Sprintf(" -X %[1]s.gitVersion=%[2]s -X %[1]s.gitMajor=%[3]s -X %[1]s.gitMinor=%[4]s -X %[1]s.gitTreeState=clean",
		pkg, v, major, minor)
}

func done(dir string) bool {
	for _, b := range binaries {
		if _, err := os.Stat(filepath.Join(dir, b.name)); err != nil {
			return false
		}
	}
	return true
}

// lock takes an exclusive flock on path, waiting for another build to end.
func lock(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("build lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("build lock %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}

// moduleDir is the directory of this module, which `go run` leaves as the
// working directory only when run from there: ask the go command instead.
func moduleDir(ctx context.Context, goCmd string) (string, error) {
	mod, err := goOutput(ctx, goCmd, "", "env", "GOMOD")
	if err != nil {
		return "", err
	}
	if filepath.Base(filepath.Dir(mod)) != "kubecp" {
		return "", errors.New("run from hack/kubecp (go -C hack/kubecp run .): its go.mod names the versions")
	}
	return filepath.Dir(mod), nil
}

func goOutput(ctx context.Context, goCmd, dir string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, goCmd, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s %s: %w: %s", goCmd, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimSpace(string(out)), nil
}
