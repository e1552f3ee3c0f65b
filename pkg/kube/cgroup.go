package kube

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
)

// The kubelet makes one cgroup per pod, named from the pod's UID, below its
// "kubepods" cgroup and, except for Guaranteed pods, below one per QoS class:
//
//	systemd driver   kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<UID, - as _>.slice
//	                 kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<UID, - as _>.slice
//	                 kubepods.slice/kubepods-pod<UID, - as _>.slice                      (Guaranteed)
//	cgroupfs driver  kubepods/burstable/pod<UID>
//	                 kubepods/besteffort/pod<UID>
//	                 kubepods/pod<UID>                                                   (Guaranteed)
//
// With the kubelet's cgroupRoot set (kind sets "/kubelet") kubepods moves
// below it: kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/...
// with systemd, kubelet/kubepods/burstable/... with cgroupfs. The systemd
// names are a slice's path joined by "-", so the prefix follows from the
// name of the kubepods slice itself.

// maxRootDepth bounds the search for the kubepods cgroup below the cgroup
// v2 mount: it sits at depth 1 (kubepods.slice), 2 (kubelet.slice/
// kubelet-kubepods.slice) or a little deeper when the node is itself a
// container whose tree the mount shows.
const maxRootDepth = 4

// QoS classes as the kubelet names its cgroups (lower case of
// corev1.PodQOSClass).
const (
	qosGuaranteed = "guaranteed"
	qosBurstable  = "burstable"
	qosBestEffort = "besteffort"
)

// errNoKubepods: the kubelet has not made its cgroups (yet), or this is
// not the node's cgroup tree.
var errNoKubepods = errors.New("no kubepods cgroup (kubepods.slice, *-kubepods.slice or kubepods) below the cgroup v2 mount: is the node's cgroup v2 tree mounted?")

// Resolver finds a pod's cgroup directory from its UID, for either kubelet
// cgroup driver. It finds the kubepods cgroup once and looks pods up below
// it by name: a stat or two per pod, never a walk of the tree.
type Resolver struct {
	mount string

	mu   sync.Mutex
	root string // the kubepods cgroup, "" until found
}

// NewResolver resolves below the cgroup v2 mount point mount.
func NewResolver(mount string) *Resolver {
	return &Resolver{mount: filepath.Clean(mount)}
}

// Resolve returns the cgroup directory of the pod with this UID. qos is the
// pod's status.qosClass ("Guaranteed", "Burstable", "BestEffort"; may be
// empty): its directory is tried first, then the others, so a missing or
// stale class still finds the pod. An error wrapping fs.ErrNotExist means
// the kubelet has not made the cgroup (yet) or has removed it.
func (r *Resolver) Resolve(uid, qos string) (string, error) {
	if uid == "" || strings.ContainsAny(uid, "/\x00") || uid == "." || uid == ".." {
		return "", fmt.Errorf("pod UID %q cannot name a cgroup", uid)
	}
	root, err := r.kubepods()
	if err != nil {
		return "", err
	}
	for _, cand := range candidates(root, uid, strings.ToLower(qos)) {
		if fi, err := os.Stat(cand); err == nil && fi.IsDir() {
			return cand, nil
		}
	}
	// The kubepods cgroup itself may be gone (the kubelet restarted with
	// another driver, say): look for it again next time.
	if _, err := os.Stat(root); err != nil {
		r.mu.Lock()
		if r.root == root {
			r.root = ""
		}
		r.mu.Unlock()
	}
	return "", fmt.Errorf("no cgroup for pod %s below %s: %w", uid, root, fs.ErrNotExist)
}

// candidates lists where the kubelet puts the cgroup of pod uid below the
// kubepods cgroup root, the QoS class qos first.
func candidates(root, uid, qos string) []string {
	order := []string{qosGuaranteed, qosBurstable, qosBestEffort}
	for i, q := range order {
		if q == qos {
			order[0], order[i] = order[i], order[0]
		}
	}
	var out []string
	base := filepath.Base(root)
	if prefix, ok := strings.CutSuffix(base, ".slice"); ok {
		// systemd: "-" separates a slice's path, so the UID's dashes
		// become underscores.
		u := strings.ReplaceAll(uid, "-", "_")
		for _, q := range order {
			if q == qosGuaranteed {
				out = append(out, filepath.Join(root, prefix+"-pod"+u+".slice"))
			} else {
				out = append(out, filepath.Join(root, prefix+"-"+q+".slice", prefix+"-"+q+"-pod"+u+".slice"))
			}
		}
		return out
	}
	for _, q := range order {
		if q == qosGuaranteed {
			out = append(out, filepath.Join(root, "pod"+uid))
		} else {
			out = append(out, filepath.Join(root, q, "pod"+uid))
		}
	}
	return out
}

// kubepods returns the kubepods cgroup, searching for it the first time.
func (r *Resolver) kubepods() (string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.root != "" {
		return r.root, nil
	}
	root, err := findKubepods(r.mount)
	if err != nil {
		return "", err
	}
	r.root = root
	return root, nil
}

// findKubepods searches breadth-first, up to maxRootDepth below mount, for
// the kubelet's kubepods cgroup: the shallowest directory named
// kubepods.slice or *-kubepods.slice (systemd driver) or kubepods
// (cgroupfs).
func findKubepods(mount string) (string, error) {
	level := []string{mount}
	for depth := 0; depth < maxRootDepth && len(level) > 0; depth++ {
		var next []string
		for _, dir := range level {
			entries, err := os.ReadDir(dir)
			if err != nil {
				if dir == mount {
					return "", fmt.Errorf("reading the cgroup v2 mount %s: %w", mount, err)
				}
				continue // removed meanwhile
			}
			for _, e := range entries {
				if !e.IsDir() {
					continue
				}
				if isKubepods(e.Name()) {
					return filepath.Join(dir, e.Name()), nil
				}
				next = append(next, filepath.Join(dir, e.Name()))
			}
		}
		level = next
	}
	return "", fmt.Errorf("%w (searched %s, %d levels deep)", errNoKubepods, mount, maxRootDepth)
}

func isKubepods(name string) bool {
	return name == "kubepods" || name == "kubepods.slice" || strings.HasSuffix(name, "-kubepods.slice")
}
