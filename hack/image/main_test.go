package main

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// goTool is the go command that runs these tests.
func goTool(t *testing.T) string {
	if g := os.Getenv("GO"); g != "" {
		if p, err := exec.LookPath(g); err == nil {
			return p
		}
	}
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(runtime.GOROOT(), "bin", "go")
}

// TestImage builds smeshd as `make image` does, builds the image, writes
// the tar, and reads it back both ways a loader does: as a docker-save
// archive (manifest.json: docker load, podman load) and as an OCI image
// layout (index.json: containerd, kind load). Then it runs the binary it
// finds in the layer.
func TestImage(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "smeshd")
	// As make image, less -trimpath, which would recompile every package
	// instead of taking them from the build cache.
	build := exec.Command(goTool(t), "build", "-ldflags", "-s -w -X main.version=v9.9.9-test", "-o", bin, "../../cmd/smeshd")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out := filepath.Join(dir, "smeshd-image.tar")
	if err := run(bin, "smesh/smeshd:dev", out, runtime.GOARCH, "v9.9.9-test"); err != nil {
		t.Fatal(err)
	}
	tag, err := name.NewTag("smesh/smeshd:dev")
	if err != nil {
		t.Fatal(err)
	}

	// Docker's way in.
	img, err := tarball.ImageFromPath(out, &tag)
	if err != nil {
		t.Fatalf("reading the tar as docker load does: %v", err)
	}
	checkImage(t, img, dir)

	// The OCI layout's way in, with containerd's name.
	oci := filepath.Join(dir, "oci")
	untar(t, out, oci)
	lp, err := layout.FromPath(oci)
	if err != nil {
		t.Fatalf("reading the tar as an OCI layout: %v", err)
	}
	idx, err := lp.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 || im.Manifests[0].Annotations["io.containerd.image.name"] != "docker.io/smesh/smeshd:dev" ||
		im.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != "dev" || im.Manifests[0].MediaType != types.OCIManifestSchema1 {
		t.Errorf("index.json: %+v", im.Manifests)
	}
	ociImg, err := idx.Image(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	checkImage(t, ociImg, dir)
	a, errA := img.ConfigName()
	b, errB := ociImg.ConfigName()
	if errA != nil || errB != nil || a != b {
		t.Errorf("the two views have different configs: %s (%v) and %s (%v)", a, errA, b, errB)
	}
	var dm []dockerManifest
	data, _ := os.ReadFile(filepath.Join(oci, "manifest.json"))
	if err := json.Unmarshal(data, &dm); err != nil || len(dm) != 1 || len(dm[0].RepoTags) != 1 || dm[0].RepoTags[0] != "smesh/smeshd:dev" {
		t.Errorf("manifest.json: %s (%v)", data, err)
	}

	// The same binary makes the same tar.
	again := filepath.Join(dir, "again.tar")
	if err := run(bin, "smesh/smeshd:dev", again, runtime.GOARCH, "v9.9.9-test"); err != nil {
		t.Fatal(err)
	}
	x, errX := os.ReadFile(out)
	y, errY := os.ReadFile(again)
	if errX != nil || errY != nil {
		t.Fatal(errX, errY)
	}
	if !bytes.Equal(x, y) {
		t.Error("building twice gave two different tars")
	}
}

func checkImage(t *testing.T, img v1.Image, dir string) {
	t.Helper()
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Architecture != runtime.GOARCH {
		t.Errorf("platform %s/%s", cf.OS, cf.Architecture)
	}
	if got := strings.Join(cf.Config.Entrypoint, " "); got != binaryPath {
		t.Errorf("entrypoint %q, want %s", got, binaryPath)
	}
	if cf.Config.User != "" {
		t.Errorf("user %q: smeshd runs as root (with a few capabilities)", cf.Config.User)
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != 1 {
		t.Fatalf("%d layers, want 1", len(layers))
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	var names []string
	var binary []byte
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		if "/"+h.Name == binaryPath {
			if h.Mode&0o111 == 0 || h.Uid != 0 {
				t.Errorf("%s: mode %o uid %d", h.Name, h.Mode, h.Uid)
			}
			if binary, err = io.ReadAll(tr); err != nil {
				t.Fatalf("reading %s from the layer: %v", h.Name, err)
			}
		}
	}
	if binary == nil {
		t.Fatalf("no %s in the layer (it holds %v)", binaryPath, names)
	}
	if len(names) != 4 {
		t.Errorf("the layer holds %v: want the binary and its directories only", names)
	}
	exe := filepath.Join(dir, "from-image")
	if err := os.WriteFile(exe, binary, 0o755); err != nil {
		t.Fatal(err)
	}
	// Static: no program interpreter, so it runs with nothing else in the
	// image.
	f, err := elf.Open(exe)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("the binary has a program interpreter: not static (CGO_ENABLED=0?)")
		}
	}
	f.Close()
	got, err := exec.Command(exe, "version").CombinedOutput()
	if err != nil || string(got) != "smeshd v9.9.9-test\n" {
		t.Errorf("%s version: %q, %v", binaryPath, got, err)
	}
}

func untar(t *testing.T, file, dir string) {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, filepath.FromSlash(h.Name))
		if !strings.HasPrefix(p, dir+string(filepath.Separator)) {
			t.Fatalf("tar entry %q escapes", h.Name)
		}
		switch h.Typeflag {
		case tar.TypeDir:
			os.MkdirAll(p, 0o755)
		case tar.TypeReg:
			os.MkdirAll(filepath.Dir(p), 0o755)
			data, _ := io.ReadAll(tr)
			if err := os.WriteFile(p, data, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func TestBadName(t *testing.T) {
	for _, ref := range []string{"Not A Name", "smesh/smeshd"} {
		if err := run("x", ref, filepath.Join(t.TempDir(), "o.tar"), "amd64", "v"); err == nil || !strings.Contains(err.Error(), "NAME:TAG") {
			t.Errorf("image name %q: %v, want refused", ref, err)
		}
	}
}
