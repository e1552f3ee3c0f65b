package kube

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/smesh-dev/smesh/pkg/config"
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
//
// A node may hold more than one kubepods cgroup at the same depth (a
// leftover of an earlier kubelet, another cgroup root): the search then
// keeps them all and takes the one below which a pod's cgroup is found,
// and while none has it, says so naming every candidate. [kubernetes]
// kubepods_cgroup names the right one and ends the search.
type Resolver struct {
	mount    string
	explicit string // the kubepods cgroup the configuration names, or ""

	mu    sync.Mutex
	root  string   // the kubepods cgroup, "" until found
	found []string // with root "", several candidates of the same depth
}

// NewResolver resolves below the cgroup v2 mount point mount. kubepods is
// the kubepods cgroup relative to the mount ([kubernetes] kubepods_cgroup;
// a leading "/" as /proc/PID/cgroup writes it), or "" to search for it.
func NewResolver(mount, kubepods string) *Resolver {
	r := &Resolver{mount: filepath.Clean(mount)}
	if kubepods != "" {
		r.explicit = filepath.Join(r.mount, strings.TrimPrefix(kubepods, "/"))
	}
	return r
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
	roots, err := r.kubepods()
	if err != nil {
		return "", err
	}
	var hits []string
	for _, root := range roots {
		for _, cand := range candidates(root, uid, strings.ToLower(qos)) {
			if fi, err := os.Stat(cand); err == nil && fi.IsDir() {
				hits = append(hits, cand)
				break
			}
		}
	}
	if len(roots) > 1 {
		return r.choose(uid, roots, hits)
	}
	if len(hits) == 1 {
		return hits[0], nil
	}
	root := roots[0]
	if r.explicit != "" {
		if _, err := os.Stat(root); err != nil {
			// %v: a setting that names nothing is a mistake to report
			// (logged), not a pod cgroup still to come (ErrNotExist).
			return "", fmt.Errorf("kubernetes.kubepods_cgroup: %s: %v", root, err)
		}
		return "", fmt.Errorf("no cgroup for pod %s below %s: %w", uid, root, fs.ErrNotExist)
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

// choose settles an ambiguous kubepods cgroup by a pod's cgroup: the
// candidate below which the pod (one the API server lists on this node)
// has its cgroup is the kubelet's, and stays the root from then on.
func (r *Resolver) choose(uid string, roots, hits []string) (string, error) {
	switch len(hits) {
	case 1:
		r.mu.Lock()
		for _, root := range roots {
			if isBelow(hits[0], root) {
				r.root, r.found = root, nil
			}
		}
		r.mu.Unlock()
		return hits[0], nil
	case 0:
		// Not an fs.ErrNotExist: this is worth a warning even while the
		// kubelet has not made the pod's cgroup yet.
		return "", fmt.Errorf("no cgroup for pod %s below any of the %d kubepods cgroups %s: "+
			"which one is the kubelet's is ambiguous until a pod's cgroup is found below one of them "+
			"(set [kubernetes] kubepods_cgroup to name it)", uid, len(roots), strings.Join(roots, ", "))
	default:
		return "", fmt.Errorf("pod %s has a cgroup below each of the kubepods cgroups %s: "+
			"set [kubernetes] kubepods_cgroup to name the kubelet's", uid, strings.Join(hits, ", "))
	}
}

func isBelow(path, dir string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != "." && rel != ".." && !strings.HasPrefix(rel, "../")
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

// kubepods returns the kubepods cgroup, searching for it the first time;
// several when the search found more than one at the same depth.
func (r *Resolver) kubepods() ([]string, error) {
	if r.explicit != "" {
		return []string{r.explicit}, nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.root != "" {
		return []string{r.root}, nil
	}
	if len(r.found) > 0 {
		return r.found, nil
	}
	found, err := findKubepods(r.mount)
	if err != nil {
		return nil, err
	}
	if len(found) == 1 {
		r.root = found[0]
	} else {
		r.found = found
	}
	return found, nil
}

// findKubepods searches breadth-first, up to maxRootDepth below mount, for
// the kubelet's kubepods cgroup: the shallowest directories named
// kubepods.slice or *-kubepods.slice (systemd driver) or kubepods
// (cgroupfs). It returns all of that depth: more than one is ambiguous.
func findKubepods(mount string) ([]string, error) {
	level := []string{mount}
	for depth := 0; depth < maxRootDepth && len(level) > 0; depth++ {
		var next, found []string
		for _, dir := range level {
			entries, err := os.ReadDir(dir)
			if err != nil {
				if dir == mount {
					return nil, fmt.Errorf("reading the cgroup v2 mount %s: %w", mount, err)
				}
				continue // removed meanwhile
			}
			for _, e := range entries {
				if !e.IsDir() {
					continue
				}
				if isKubepods(e.Name()) {
					found = append(found, filepath.Join(dir, e.Name()))
					continue
				}
				next = append(next, filepath.Join(dir, e.Name()))
			}
		}
		if len(found) > 0 {
			return found, nil
		}
		level = next
	}
	return nil, fmt.Errorf("%w (searched %s, %d levels deep; or name it with [kubernetes] kubepods_cgroup)", errNoKubepods, mount, maxRootDepth)
}

func isKubepods(name string) bool { return config.IsKubepodsName(name) }
