package sandbox

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// netnsDir is where named network namespaces are bind-mounted, by iproute2
// and vishvananda/netns alike.
const netnsDir = "/run/netns"

// netnsDirMu serializes prepareNetnsDir: two callers that both find
// netnsDir no mount point must not both bind-mount it. It guards the mount
// namespace, which is process-wide state, not state of this package.
var netnsDirMu sync.Mutex

// prepareNetnsDir makes netnsDir a shared mount point, as `ip netns add`
// does before it creates a namespace (iproute2's netns_add): when netnsDir is
// not a mount point yet, it is bind-mounted onto itself first. Like ip, it
// does so on every call rather than once: it costs one mount(2) when there is
// nothing to do, and a /run/netns unmounted meanwhile is prepared again.
//
// Without it, the first `ip netns add` on a machine makes that bind mount
// over namespaces already mounted in the plain directory: they are hidden
// beneath it, unmounting one by its path removes only the copy on top, and
// its file stays busy for good. Once netnsDir is a mount point, `ip netns
// add` finds it one and mounts nothing over it.
//
// Two processes preparing at the same moment (this one and `ip netns add`)
// may both bind-mount netnsDir; that is harmless: each mounts a namespace
// only after making the top mount shared, and a bind mount of a shared mount
// joins its peer group, so unmounting the copy on top unmounts the one
// beneath too. What remains is a process that mounts namespaces in a
// netnsDir that is no mount point without preparing it (vishvananda/netns
// NewNamed alone, as this package did before, or `unshare
// --net=/run/netns/NAME`): the first preparation, ours or ip's, hides those.
func prepareNetnsDir() error {
	netnsDirMu.Lock()
	defer netnsDirMu.Unlock()
	if err := os.MkdirAll(netnsDir, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", netnsDir, err)
	}
	err := unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if errors.Is(err, unix.EINVAL) {
		// Not a mount point yet: make it one, then shared.
		if err := unix.Mount(netnsDir, netnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind-mounting %s onto itself: %w", netnsDir, err)
		}
		err = unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	}
	if err != nil {
		return fmt.Errorf("making %s a shared mount: %w", netnsDir, err)
	}
	return nil
}

// NewNamedNetns creates a network namespace bind-mounted at /run/netns/name,
// so that `ip netns exec name` and Start find it, brings its loopback up, and
// returns a handle to it. The caller closes the handle and, to delete the
// namespace, calls DeleteNamedNetns.
//
// lo is up because in a namespace where it is down even 127.0.0.1 does not
// answer, which no user of this package wants.
//
// /run/netns is made a shared mount point first, as `ip netns add` does (see
// prepareNetnsDir), so that the two can be used side by side.
//
// On error nothing is left behind, except when the name was taken: then the
// existing namespace is not touched.
func NewNamedNetns(name string) (netns.NsHandle, error) {
	if err := prepareNetnsDir(); err != nil {
		return netns.None(), fmt.Errorf("creating network namespace %s: %w", name, err)
	}
	type result struct {
		ns  netns.NsHandle
		err error
	}
	res := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			res <- result{netns.None(), fmt.Errorf("opening the current network namespace: %w", err)}
			return
		}
		defer orig.Close()
		// NewNamed unshares this thread into the new namespace (also when
		// it fails later on) and leaves it there: lo is brought up from
		// inside before switching back.
		ns, err := netns.NewNamed(name)
		if err == nil {
			if err = loopbackUp(); err != nil {
				ns.Close()
			}
		}
		if rerr := netns.Set(orig); rerr != nil {
			// Stay locked: see InNetns.
			if err == nil {
				ns.Close()
			}
			res <- result{netns.None(), errors.Join(err, fmt.Errorf("returning to the original network namespace: %w", rerr))}
			return
		}
		runtime.UnlockOSThread()
		res <- result{ns, err}
	}()
	r := <-res
	if r.err != nil {
		err := fmt.Errorf("creating network namespace %s: %w", name, r.err)
		// NewNamed fails with EEXIST before creating anything when the
		// name is taken; any other failure may leave the mount point.
		if !errors.Is(r.err, fs.ErrExist) {
			if derr := DeleteNamedNetns(name); derr != nil {
				err = errors.Join(err, derr)
			}
		}
		return netns.None(), err
	}
	return r.ns, nil
}

// loopbackUp brings up lo in the network namespace of the calling thread.
func loopbackUp() error {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("opening rtnetlink: %w", err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		return fmt.Errorf("bringing lo up: %w", err)
	}
	return nil
}

// DeleteNamedNetns removes what NewNamedNetns(name) made: the bind mount
// and the file it is mounted on. The namespace itself goes once nothing else
// (a process, a socket, an open handle) holds it. Deleting a name that does
// not exist is not an error.
func DeleteNamedNetns(name string) error {
	path := filepath.Join(netnsDir, name)
	// EINVAL: not (or no longer) a mount point.
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil &&
		!errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmounting %s: %w", path, err)
	}
	if err := unix.Unlink(path); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("removing %s: %w", path, err)
	}
	return nil
}

// InNetns runs fn on a locked OS thread switched into the network namespace
// ns, switches back, and returns fn's error; a panic in fn becomes an error
// too.
//
// Sockets keep the namespace they were created in: a listener or connection
// made in fn can be used from any goroutine afterwards. Goroutines that fn
// starts, however, run wherever the runtime puts them, not in ns.
//
// The work happens on a goroutine of its own: if switching back fails, that
// goroutine exits without unlocking, and the runtime then discards the
// thread instead of handing a thread in the wrong namespace to other
// goroutines.
//
// When the thread is in ns already, fn runs there without setns(2), which
// needs CAP_SYS_ADMIN (smeshd.service does not grant it, and its
// RestrictNamespaces= forbids setns).
func InNetns(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("opening the current network namespace: %w", err)
			return
		}
		defer orig.Close()
		if orig.Equal(ns) {
			fnErr := callRecovered(fn)
			runtime.UnlockOSThread()
			errc <- fnErr
			return
		}
		if err := netns.Set(ns); err != nil {
			// setns failed: the thread is where it was.
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering network namespace: %w", err)
			return
		}
		fnErr := callRecovered(fn)
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(fnErr, fmt.Errorf("returning to the original network namespace: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- fnErr
	}()
	return <-errc
}

// callRecovered turns a panic in fn into an error, so that InNetns still
// switches the thread back and the panic reaches the caller as an error.
func callRecovered(fn func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("panic: %v\n%s", r, debug.Stack())
		}
	}()
	return fn()
}

// routeHandle returns an rtnetlink handle whose socket lives in ns, usable
// from any goroutine.
func routeHandle(ns netns.NsHandle) (*netlink.Handle, error) {
	var h *netlink.Handle
	err := InNetns(ns, func() (err error) {
		// Only NETLINK_ROUTE: for a family without a socket of its own,
		// the handle would open one in whatever namespace the calling
		// thread is in.
		h, err = netlink.NewHandle(unix.NETLINK_ROUTE)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("opening rtnetlink: %w", err)
	}
	return h, nil
}

// StrayThreads lists the threads of this process that are not in the
// network namespace want (a /proc/self/ns/net link, e.g. "net:[4026531840]").
// Tests use it to show that switching namespaces leaves no thread behind.
func StrayThreads(want string) ([]string, error) {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return nil, err
	}
	var stray []string
	for _, task := range tasks {
		ns, err := os.Readlink(filepath.Join("/proc/self/task", task.Name(), "ns/net"))
		if errors.Is(err, fs.ErrNotExist) {
			continue // the thread exited meanwhile
		}
		if err != nil {
			return nil, err
		}
		if ns != want {
			stray = append(stray, fmt.Sprintf("thread %s in %s", task.Name(), ns))
		}
	}
	return stray, nil
}
