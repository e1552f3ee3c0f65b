package kube

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// mkdirs makes a fake cgroupfs tree: directories below root.
func mkdirs(t *testing.T, root string, dirs ...string) {
	t.Helper()
	for _, d := range dirs {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

const (
	uidG = "1f0e5c2a-8d1b-4c3e-9a7f-000000000001"
	uidB = "1f0e5c2a-8d1b-4c3e-9a7f-000000000002"
	uidE = "1f0e5c2a-8d1b-4c3e-9a7f-000000000003"
)

func TestResolveDrivers(t *testing.T) {
	us := func(uid string) string { // the systemd driver's spelling
		b := []byte(uid)
		for i := range b {
			if b[i] == '-' {
				b[i] = '_'
			}
		}
		return string(b)
	}
	tests := []struct {
		name string
		dirs map[string]string // pod UID -> its cgroup, relative to the mount
		also []string          // other directories of the tree
	}{
		{
			name: "systemd",
			dirs: map[string]string{
				uidG: "kubepods.slice/kubepods-pod" + us(uidG) + ".slice",
				uidB: "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + us(uidB) + ".slice",
				uidE: "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + us(uidE) + ".slice",
			},
			also: []string{"system.slice/kubelet.service", "system.slice/containerd.service", "init.scope"},
		},
		{
			name: "cgroupfs",
			dirs: map[string]string{
				uidG: "kubepods/pod" + uidG,
				uidB: "kubepods/burstable/pod" + uidB,
				uidE: "kubepods/besteffort/pod" + uidE,
			},
			also: []string{"system.slice/kubelet.service", "user.slice"},
		},
		{
			// kind: cgroupRoot "/kubelet", the systemd driver.
			name: "systemd below cgroupRoot",
			dirs: map[string]string{
				uidG: "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod" + us(uidG) + ".slice",
				uidB: "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod" + us(uidB) + ".slice",
				uidE: "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod" + us(uidE) + ".slice",
			},
			also: []string{"system.slice/containerd.service", "kubelet.slice/kubelet.service"},
		},
		{
			name: "cgroupfs below cgroupRoot",
			dirs: map[string]string{
				uidG: "kubelet/kubepods/pod" + uidG,
				uidB: "kubelet/kubepods/burstable/pod" + uidB,
				uidE: "kubelet/kubepods/besteffort/pod" + uidE,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mount := t.TempDir()
			mkdirs(t, mount, tt.also...)
			for _, d := range tt.dirs {
				// Containers below each pod, as the kubelet makes them.
				mkdirs(t, mount, d, filepath.Join(d, "cri-containerd-abc.scope"))
			}
			r := NewResolver(mount, "")
			for uid, rel := range tt.dirs {
				want := filepath.Join(mount, rel)
				// The QoS hint may be missing or wrong: every class is tried.
				for _, qos := range []string{"", "Guaranteed", "Burstable", "BestEffort"} {
					got, err := r.Resolve(uid, qos)
					if err != nil || got != want {
						t.Errorf("Resolve(%s, %q) = %q, %v; want %q", uid, qos, got, err, want)
					}
				}
			}
			missing := "00000000-0000-0000-0000-00000000dead"
			if _, err := r.Resolve(missing, "Burstable"); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("Resolve(unknown pod) = %v, want fs.ErrNotExist", err)
			}
		})
	}
}

func TestResolveNoKubepods(t *testing.T) {
	mount := t.TempDir()
	mkdirs(t, mount, "system.slice/a.service", "user.slice", "a/b/c/d/e/kubepods.slice")
	_, err := NewResolver(mount, "").Resolve(uidB, "Burstable")
	if !errors.Is(err, errNoKubepods) {
		t.Fatalf("Resolve without a kubepods cgroup (one too deep to count) = %v, want errNoKubepods", err)
	}
}

// The kubepods cgroup is found again once it appears, and again after it
// moved (a kubelet restarted with the other cgroup driver).
func TestResolveFindsKubepodsLater(t *testing.T) {
	mount := t.TempDir()
	r := NewResolver(mount, "")
	if _, err := r.Resolve(uidB, ""); !errors.Is(err, errNoKubepods) {
		t.Fatalf("Resolve before the kubelet started = %v, want errNoKubepods", err)
	}
	mkdirs(t, mount, "kubepods/burstable/pod"+uidB)
	if got, err := r.Resolve(uidB, ""); err != nil || got != filepath.Join(mount, "kubepods/burstable/pod"+uidB) {
		t.Fatalf("Resolve = %q, %v", got, err)
	}
	if err := os.RemoveAll(filepath.Join(mount, "kubepods")); err != nil {
		t.Fatal(err)
	}
	mkdirs(t, mount, "kubepods.slice/kubepods-pod"+uidG[:8]+"_8d1b_4c3e_9a7f_000000000001.slice")
	if _, err := r.Resolve(uidG, ""); err == nil {
		t.Fatal("Resolve found a pod below a kubepods cgroup that is gone")
	}
	want := filepath.Join(mount, "kubepods.slice/kubepods-pod1f0e5c2a_8d1b_4c3e_9a7f_000000000001.slice")
	if got, err := r.Resolve(uidG, ""); err != nil || got != want {
		t.Fatalf("Resolve after the move = %q, %v; want %q", got, err, want)
	}
}

func TestResolveRejectsOddUIDs(t *testing.T) {
	mount := t.TempDir()
	mkdirs(t, mount, "kubepods/burstable")
	for _, uid := range []string{"", "..", "../../etc", "a/b"} {
		if got, err := NewResolver(mount, "").Resolve(uid, ""); err == nil {
			t.Errorf("Resolve(%q) = %q, want an error", uid, got)
		}
	}
}

// Two kubepods cgroups at the same depth (a leftover of an earlier run):
// while no pod's cgroup says which is the kubelet's, the error names both;
// once one is found below one of them, that one is taken, for every pod.
func TestResolveAmbiguousKubepods(t *testing.T) {
	mount := t.TempDir()
	// The leftover sorts first, as in the report: the search met it first.
	mkdirs(t, mount, "a.slice/kubepods.slice/kubepods-burstable.slice", "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice")
	leftover := filepath.Join(mount, "a.slice/kubepods.slice")
	real := filepath.Join(mount, "kubelet.slice/kubelet-kubepods.slice")
	r := NewResolver(mount, "")
	_, err := r.Resolve(uidB, "Burstable")
	if err == nil || errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Resolve with two kubepods cgroups and no pod cgroup = %v, want an error that is not fs.ErrNotExist", err)
	}
	for _, want := range []string{leftover, real, "ambiguous", "kubepods_cgroup"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %q", err, want)
		}
	}

	// The kubelet makes the pod's cgroup below its own kubepods.
	us := strings.ReplaceAll(uidB, "-", "_")
	mkdirs(t, real, "kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod"+us+".slice")
	want := filepath.Join(real, "kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod"+us+".slice")
	if got, err := r.Resolve(uidB, "Burstable"); err != nil || got != want {
		t.Fatalf("Resolve = %q, %v; want %q", got, err, want)
	}
	// From then on it is the root: another pod not made yet is below it,
	// plainly not there yet.
	if _, err := r.Resolve(uidE, ""); !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), real) || strings.Contains(err.Error(), leftover) {
		t.Errorf("Resolve(a pod not made yet) after the choice = %v, want fs.ErrNotExist below %s", err, real)
	}

	// A pod UID with a cgroup below both (a copied tree): no guess.
	r2 := NewResolver(mount, "")
	mkdirs(t, leftover, "kubepods-burstable.slice/kubepods-burstable-pod"+us+".slice")
	if _, err := r2.Resolve(uidB, ""); err == nil || !strings.Contains(err.Error(), "kubepods_cgroup") {
		t.Errorf("Resolve of a pod below both = %v, want an error asking for kubepods_cgroup", err)
	}
}

// [kubernetes] kubepods_cgroup names the kubepods cgroup: no search, so a
// second one (even a shallower one) does not matter.
func TestResolveExplicitKubepods(t *testing.T) {
	mount := t.TempDir()
	mkdirs(t, mount, "kubepods/burstable/pod"+uidB, "x.slice/kubepods/burstable/pod"+uidE)
	for _, setting := range []string{"x.slice/kubepods", "/x.slice/kubepods"} {
		r := NewResolver(mount, setting)
		want := filepath.Join(mount, "x.slice/kubepods/burstable/pod"+uidE)
		if got, err := r.Resolve(uidE, ""); err != nil || got != want {
			t.Errorf("kubepods_cgroup %q: Resolve = %q, %v; want %q", setting, got, err, want)
		}
		if got, err := r.Resolve(uidB, ""); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("kubepods_cgroup %q: Resolve of a pod below the other kubepods = %q, %v; want fs.ErrNotExist", setting, got, err)
		}
	}
}

// A kubepods_cgroup that names nothing says so, with the key and the path.
func TestResolveExplicitKubepodsMissing(t *testing.T) {
	mount := t.TempDir()
	mkdirs(t, mount, "kubepods.slice/kubepods-burstable.slice")
	_, err := NewResolver(mount, "kubelet.slice/kubelet-kubepods.slice").Resolve(uidB, "")
	if err == nil {
		t.Fatal("Resolve below a kubepods_cgroup that does not exist: no error")
	}
	want := filepath.Join(mount, "kubelet.slice/kubelet-kubepods.slice")
	for _, s := range []string{"kubernetes.kubepods_cgroup", want} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not name %q", err, s)
		}
	}
	// Not "no cgroup yet", which the watcher retries without a word: a
	// setting that names nothing must be reported.
	if errors.Is(err, fs.ErrNotExist) {
		t.Errorf("error %q is fs.ErrNotExist: the watcher would not log it", err)
	}
}
