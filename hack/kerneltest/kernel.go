package main

import (
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
)

// kernel is an unpacked kernel package: the image to boot and its modules.
type kernel struct {
	Package string // Debian package name, or the .deb's file name
	Version string // package version
	Release string // uname -r
	Image   string // vmlinuz
	Modules string // lib/modules/RELEASE
}

// metaDepends matches the image package a metapackage depends on, in the
// output of apt-cache depends.
var metaDepends = regexp.MustCompile(`(?m)^\s+Depends: (linux-image-\S+)$`)

// resolvePackage follows metapackages (linux-image-amd64,
// linux-image-6.12-amd64, ...) to the package that holds the kernel, as
// `apt-cache depends` names it.
func resolvePackage(name string) (string, error) {
	for range 5 {
		out, err := exec.Command("apt-cache", "depends", name).Output()
		if err != nil {
			return "", fmt.Errorf("apt-cache depends %s: %w", name, exitDetail(err))
		}
		m := metaDepends.FindSubmatch(out)
		if m == nil {
			return name, nil
		}
		name = string(m[1])
	}
	return "", fmt.Errorf("%s: metapackages nest too deep", name)
}

// candidateVersion is the version apt-get download would fetch.
func candidateVersion(pkg string) (string, error) {
	out, err := exec.Command("apt-cache", "policy", pkg).Output()
	if err != nil {
		return "", fmt.Errorf("apt-cache policy %s: %w", pkg, exitDetail(err))
	}
	m := regexp.MustCompile(`(?m)^\s+Candidate: (\S+)$`).FindSubmatch(out)
	if m == nil || string(m[1]) == "(none)" {
		return "", fmt.Errorf("apt knows no installable version of %s (apt-get update?)", pkg)
	}
	return string(m[1]), nil
}

// fetchKernel makes the kernel named by spec (a package, a metapackage or
// a .deb file) available unpacked below cache, downloading it with apt-get
// the first time.
func fetchKernel(spec, cache string, logf func(string, ...any)) (*kernel, error) {
	deb := spec
	k := &kernel{}
	if strings.HasSuffix(spec, ".deb") {
		k.Package = filepath.Base(spec)
		k.Version = "local file"
	} else {
		pkg, err := resolvePackage(spec)
		if err != nil {
			return nil, err
		}
		version, err := candidateVersion(pkg)
		if err != nil {
			return nil, err
		}
		k.Package, k.Version = pkg, version
		debs := filepath.Join(cache, "debs")
		// apt-get download names the file PKG_VERSION_ARCH.deb, with
		// an epoch's colon escaped.
		deb = filepath.Join(debs, fmt.Sprintf("%s_%s_amd64.deb", pkg, strings.ReplaceAll(version, ":", "%3a")))
		if _, err := os.Stat(deb); err != nil {
			if err := os.MkdirAll(debs, 0o755); err != nil {
				return nil, err
			}
			logf("downloading %s %s (apt-get download, into %s)", pkg, version, debs)
			cmd := exec.Command("apt-get", "download", "-q", pkg+"="+version)
			cmd.Dir = debs
			if out, err := cmd.CombinedOutput(); err != nil {
				return nil, fmt.Errorf("apt-get download %s=%s: %w\n%s", pkg, version, err, out)
			}
			if _, err := os.Stat(deb); err != nil {
				return nil, fmt.Errorf("apt-get download %s=%s did not make %s", pkg, version, deb)
			}
		}
	}
	dir := filepath.Join(cache, "unpacked", strings.TrimSuffix(filepath.Base(deb), ".deb"))
	if _, err := os.Stat(filepath.Join(dir, ".complete")); err != nil {
		logf("unpacking %s (dpkg-deb -x)", filepath.Base(deb))
		os.RemoveAll(dir)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, err
		}
		if out, err := exec.Command("dpkg-deb", "-x", deb, dir).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("dpkg-deb -x %s: %w\n%s", deb, err, out)
		}
		if err := os.WriteFile(filepath.Join(dir, ".complete"), nil, 0o644); err != nil {
			return nil, err
		}
	}
	images, _ := filepath.Glob(filepath.Join(dir, "boot", "vmlinuz-*"))
	if len(images) != 1 {
		return nil, fmt.Errorf("%s holds %d kernel images (boot/vmlinuz-*), want 1", deb, len(images))
	}
	k.Image = images[0]
	k.Release = strings.TrimPrefix(filepath.Base(k.Image), "vmlinuz-")
	for _, base := range []string{"lib", "usr/lib"} {
		if d := filepath.Join(dir, base, "modules", k.Release); isDir(d) {
			k.Modules = d
		}
	}
	if k.Modules == "" {
		return nil, fmt.Errorf("%s has no modules for %s", deb, k.Release)
	}
	return k, nil
}

func isDir(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

// module is a loadable module file and what it depends on.
type module struct {
	name string // e.g. "veth"
	path string // below the modules directory
	deps []string
}

// modulesFor lists the module files needed to load names, dependencies
// first. Modules built into the kernel (modules.builtin) are left out.
// Debian's packages carry no modules.dep (depmod runs when the package is
// installed), so dependencies come from each module's own .modinfo.
func modulesFor(modDir string, names []string) ([]module, error) {
	builtin := map[string]bool{}
	if data, err := os.ReadFile(filepath.Join(modDir, "modules.builtin")); err == nil {
		for _, line := range strings.Fields(string(data)) {
			builtin[modName(line)] = true
		}
	}
	files := map[string]string{}
	err := filepath.WalkDir(filepath.Join(modDir, "kernel"), func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.Contains(d.Name(), ".ko") {
			rel, _ := filepath.Rel(modDir, p)
			files[modName(d.Name())] = rel
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	var order []module
	seen := map[string]bool{}
	var visit func(name string) error
	visit = func(name string) error {
		name = strings.ReplaceAll(name, "-", "_")
		if seen[name] || builtin[name] {
			return nil
		}
		seen[name] = true
		rel, ok := files[name]
		if !ok {
			return fmt.Errorf("module %s is neither built in nor in %s", name, modDir)
		}
		data, err := readModule(filepath.Join(modDir, rel))
		if err != nil {
			return err
		}
		deps, err := moduleDepends(data)
		if err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		for _, d := range deps {
			if err := visit(d); err != nil {
				return err
			}
		}
		order = append(order, module{name: name, path: rel, deps: deps})
		return nil
	}
	for _, n := range names {
		if err := visit(n); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// modName is the module name of a file name or path: "net/bridge/bridge.ko.xz"
// is "bridge"; dashes and underscores are the same to the kernel.
func modName(p string) string {
	base := filepath.Base(p)
	if i := strings.Index(base, ".ko"); i >= 0 {
		base = base[:i]
	}
	return strings.ReplaceAll(base, "-", "_")
}

// readModule returns a module's ELF bytes, decompressed when the file is
// (kernels since 6.2 in some distributions ship .ko.xz or .ko.zst, which
// busybox's insmod cannot load).
func readModule(path string) ([]byte, error) {
	var tool []string
	switch {
	case strings.HasSuffix(path, ".ko"):
		return os.ReadFile(path)
	case strings.HasSuffix(path, ".ko.xz"):
		tool = []string{"xz", "-dc", path}
	case strings.HasSuffix(path, ".ko.zst"):
		tool = []string{"zstd", "-dcq", path}
	case strings.HasSuffix(path, ".ko.gz"):
		tool = []string{"gzip", "-dc", path}
	default:
		return nil, fmt.Errorf("%s: unknown module compression", path)
	}
	out, err := exec.Command(tool[0], tool[1:]...).Output()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", strings.Join(tool, " "), exitDetail(err))
	}
	return out, nil
}

// moduleDepends reads the depends= field of a module's .modinfo section.
func moduleDepends(data []byte) ([]string, error) {
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, errors.New("no .modinfo section")
	}
	info, err := sec.Data()
	if err != nil {
		return nil, err
	}
	for _, field := range bytes.Split(info, []byte{0}) {
		if v, ok := bytes.CutPrefix(field, []byte("depends=")); ok {
			if len(v) == 0 {
				return nil, nil
			}
			deps := strings.Split(string(v), ",")
			slices.Sort(deps)
			return deps, nil
		}
	}
	return nil, nil
}

// exitDetail adds a command's stderr to its error.
func exitDetail(err error) error {
	var ee *exec.ExitError
	if errors.As(err, &ee) && len(ee.Stderr) > 0 {
		return fmt.Errorf("%w: %s", err, strings.TrimSpace(string(ee.Stderr)))
	}
	return err
}
