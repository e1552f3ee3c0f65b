// Command image builds smeshd's container image (`make image`) offline, with
// go-containerregistry: one layer holding the static binary at
// /usr/local/bin/smeshd, no base image, no Dockerfile, no network. It writes
// one tar that is both an OCI image layout (oci-layout, index.json, blobs/)
// and a `docker save` archive (manifest.json naming the same blobs), as
// Docker 25 writes them, so that `docker load`, `podman load` and
// containerd's import (`kind load image-archive`) all take it.
//
//	go run ./hack/image -binary bin/image/smeshd -name smesh/smeshd:dev -out bin/smeshd-image.tar
package main

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// binaryPath is where the image holds smeshd; the entrypoint.
const binaryPath = "/usr/local/bin/smeshd"

// epoch stamps every file and the image itself: the same binary gives the
// same image, byte for byte.
var epoch = time.Unix(0, 0).UTC()

func main() {
	binary := flag.String("binary", "", "the static smeshd binary to put in the image (CGO_ENABLED=0)")
	ref := flag.String("name", "smesh/smeshd:dev", "image name and tag")
	out := flag.String("out", "bin/smeshd-image.tar", "where to write the image tar")
	arch := flag.String("arch", runtime.GOARCH, "the binary's GOARCH")
	version := flag.String("version", "dev", "smeshd's version, for the image's labels")
	flag.Parse()
	if err := run(*binary, *ref, *out, *arch, *version); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func run(binary, ref, out, arch, version string) error {
	if binary == "" {
		return errors.New("-binary is required")
	}
	tag, err := name.NewTag(ref)
	if err == nil && !strings.HasSuffix(ref, ":"+tag.TagStr()) {
		err = errors.New("no tag")
	}
	if err != nil {
		return fmt.Errorf("-name %q: want NAME:TAG, e.g. smesh/smeshd:dev: %w", ref, err)
	}
	bin, err := os.ReadFile(binary)
	if err != nil {
		return err
	}
	img, err := Build(bin, arch, version)
	if err != nil {
		return err
	}
	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	if err := Write(f, tag, img); err != nil {
		f.Close()
		os.Remove(tmp)
		return err
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, out); err != nil {
		return err
	}
	d, _ := img.Digest()
	fmt.Printf("%s: %s (%s), docker load -i %s\n", out, tag, d, out)
	return nil
}

// Build makes the image: an OCI manifest and config, one gzip layer with
// the binary, smeshd as the entrypoint.
func Build(binary []byte, arch, version string) (v1.Image, error) {
	layerTar, err := binaryLayer(binary)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer), tarball.WithCompressedCaching)
	if err != nil {
		return nil, fmt.Errorf("image layer: %w", err)
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.Append(img, mutate.Addendum{
		Layer:   layer,
		History: v1.History{Created: v1.Time{Time: epoch}, CreatedBy: "make image (hack/image)", Comment: "smeshd " + version},
	})
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", arch
	cf.Created = v1.Time{Time: epoch}
	cf.Config = v1.Config{
		Entrypoint: []string{binaryPath},
		Cmd:        []string{"-c", "/etc/smesh/smesh.toml"},
		Env:        []string{"PATH=/usr/local/bin"},
		Labels: map[string]string{
			"org.opencontainers.image.title":       "smeshd",
			"org.opencontainers.image.description": "smesh node data plane (eBPF capture, same-node splicing, mTLS tunnel)",
			"org.opencontainers.image.version":     version,
			"org.opencontainers.image.source":      "https://github.com/smesh-dev/smesh",
		},
	}
	return mutate.ConfigFile(img, cf)
}

// binaryLayer is the layer's tar: the directories and the binary, owned by
// root, executable.
func binaryLayer(binary []byte) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, dir := range []string{"usr/", "usr/local/", "usr/local/bin/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
	}
	hdr := &tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(binaryPath, "/"), Mode: 0o755, Size: int64(len(binary)), ModTime: epoch, Format: tar.FormatPAX}
	if err := tw.WriteHeader(hdr); err != nil {
		return nil, err
	}
	if _, err := tw.Write(binary); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// dockerManifest is one entry of a `docker save` archive's manifest.json.
type dockerManifest struct {
	Config   string
	RepoTags []string
	Layers   []string
}

// Write writes img, named tag, as one tar that is an OCI image layout and a
// docker-save archive at once (blobs shared).
func Write(w io.Writer, tag name.Tag, img v1.Image) error {
	files := map[string][]byte{}
	blob := func(h v1.Hash) string { return "blobs/" + h.Algorithm + "/" + h.Hex }

	manifest, err := img.RawManifest()
	if err != nil {
		return err
	}
	digest, err := img.Digest()
	if err != nil {
		return err
	}
	files[blob(digest)] = manifest
	config, err := img.RawConfigFile()
	if err != nil {
		return err
	}
	configName, err := img.ConfigName()
	if err != nil {
		return err
	}
	files[blob(configName)] = config
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	var layerPaths []string
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			return err
		}
		rc, err := l.Compressed()
		if err != nil {
			return err
		}
		data, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			return err
		}
		files[blob(d)] = data
		layerPaths = append(layerPaths, blob(d))
	}

	files["oci-layout"] = []byte(`{"imageLayoutVersion":"1.0.0"}`)
	mt, err := img.MediaType()
	if err != nil {
		return err
	}
	index := v1.IndexManifest{
		SchemaVersion: 2,
		MediaType:     types.OCIImageIndex,
		Manifests: []v1.Descriptor{{
			MediaType: mt,
			Digest:    digest,
			Size:      int64(len(manifest)),
			Annotations: map[string]string{
				// containerd's import names the image by this one.
				"io.containerd.image.name":          containerdName(tag),
				"org.opencontainers.image.ref.name": tag.TagStr(),
			},
		}},
	}
	if files["index.json"], err = json.Marshal(index); err != nil {
		return err
	}
	if files["manifest.json"], err = json.Marshal([]dockerManifest{{
		Config:   blob(configName),
		RepoTags: []string{dockerName(tag)},
		Layers:   layerPaths,
	}}); err != nil {
		return err
	}

	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	tw := tar.NewWriter(w)
	for _, dir := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755, ModTime: epoch}); err != nil {
			return err
		}
	}
	for _, n := range names {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: n, Mode: 0o644, Size: int64(len(files[n])), ModTime: epoch}); err != nil {
			return err
		}
		if _, err := tw.Write(files[n]); err != nil {
			return err
		}
	}
	return tw.Close()
}

// dockerName is the name as Docker writes it in RepoTags: Docker Hub's
// images without the registry ("smesh/smeshd:dev").
func dockerName(tag name.Tag) string {
	if tag.RegistryStr() == name.DefaultRegistry {
		return tag.RepositoryStr() + ":" + tag.TagStr()
	}
	return tag.Name()
}

// containerdName is the fully qualified name containerd and the kubelet
// use ("docker.io/smesh/smeshd:dev").
func containerdName(tag name.Tag) string {
	if tag.RegistryStr() == name.DefaultRegistry {
		return "docker.io/" + tag.RepositoryStr() + ":" + tag.TagStr()
	}
	return tag.Name()
}
