package enrol

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/sandbox"
)

// errNoProcess: every process a scan saw in a namespace is gone.
var errNoProcess = errors.New("no process left in it")

// soNetnsCookie is SO_NETNS_COOKIE (Linux 5.14+, asm-generic value), which
// x/sys/unix does not name.
const soNetnsCookie = 71

// Namespace is one network namespace smeshd serves: one that enrolled
// processes live in, or smeshd's own.
type Namespace struct {
	// Cookie is the kernel's netns cookie, which the BPF programs use to
	// name the namespace; never reused.
	Cookie uint64
	// Inode is the namespace's nsfs inode (what `ls -l /proc/PID/ns/net`
	// shows).
	Inode uint64
	// Own is smeshd's own namespace (the node's).
	Own bool

	handle netns.NsHandle // open while smeshd serves the namespace

	mu      sync.Mutex
	pids    []int
	cgroups []string
	addrs   []netip.Addr
	svc     Service // nil until Open succeeded
	openErr error   // why the last Open failed
	stop    chan struct{}
}

// Do runs fn on an OS thread inside the namespace; sockets fn creates stay
// in it (see sandbox.InNetns).
func (n *Namespace) Do(fn func() error) error {
	return sandbox.InNetns(n.handle, fn)
}

// Addrs are the namespace's addresses (loopback excluded).
func (n *Namespace) Addrs() []netip.Addr {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.addrs)
}

// Info describes a namespace for /debug/namespaces.
type Info struct {
	Cookie  uint64   `json:"cookie"`
	Inode   uint64   `json:"inode"`
	Own     bool     `json:"own"`
	PID     int      `json:"pid,omitempty"`
	Procs   int      `json:"processes"`
	Cgroups []string `json:"cgroups"`
	Addrs   []string `json:"addresses"`
	// Ready: smeshd's listeners are up, connections are captured;
	// Ready6: IPv6 ones too.
	Ready  bool   `json:"ready"`
	Ready6 bool   `json:"ready6"`
	Error  string `json:"error,omitempty"`
}

func (n *Namespace) info() Info {
	n.mu.Lock()
	defer n.mu.Unlock()
	i := Info{Cookie: n.Cookie, Inode: n.Inode, Own: n.Own, Procs: len(n.pids),
		Cgroups: slices.Clone(n.cgroups), Addrs: []string{}, Ready: n.svc != nil}
	if n.svc != nil {
		_, i.Ready6 = n.svc.Ready()
	}
	if len(n.pids) > 0 {
		i.PID = n.pids[0]
	}
	for _, a := range n.addrs {
		i.Addrs = append(i.Addrs, a.String())
	}
	if n.openErr != nil {
		i.Error = n.openErr.Error()
	}
	return i
}

// openNamespace opens the namespace of one of pids whose nsfs inode is ino
// and reads its cookie. A PID can be reused between the scan and the open:
// the inode of what was opened is checked.
func openNamespace(ino uint64, pids []int) (*Namespace, error) {
	var errs []error
	for _, pid := range pids {
		h, err := netns.GetFromPath(fmt.Sprintf("/proc/%d/ns/net", pid))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var st unix.Stat_t
		if err := unix.Fstat(int(h), &st); err != nil || st.Ino != ino {
			h.Close()
			continue
		}
		n := &Namespace{Inode: ino, handle: h, stop: make(chan struct{})}
		if n.Cookie, err = n.cookie(); err != nil {
			h.Close()
			return nil, err
		}
		return n, nil
	}
	return nil, fmt.Errorf("opening network namespace %d: %w: %w", ino, errNoProcess, errors.Join(errs...))
}

// ownNamespace opens smeshd's own namespace.
func ownNamespace() (*Namespace, error) {
	h, err := netns.GetFromPath("/proc/self/ns/net")
	if err != nil {
		return nil, fmt.Errorf("opening smeshd's network namespace: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(h), &st); err != nil {
		h.Close()
		return nil, err
	}
	n := &Namespace{Inode: st.Ino, Own: true, handle: h, stop: make(chan struct{})}
	if n.Cookie, err = n.cookie(); err != nil {
		h.Close()
		return nil, err
	}
	return n, nil
}

// cookie reads the namespace's netns cookie through a socket made inside it.
func (n *Namespace) cookie() (uint64, error) {
	var cookie uint64
	err := n.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		v, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, soNetnsCookie)
		cookie = v
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("reading the cookie of network namespace %d: %w", n.Inode, err)
	}
	return cookie, nil
}

// listAddrs reads the namespace's addresses.
func (n *Namespace) listAddrs() ([]netip.Addr, error) {
	var addrs []netip.Addr
	err := n.Do(func() error {
		// The package-level netlink calls open their socket on the
		// calling thread, hence in this namespace.
		list, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
		// A dump that an address change interrupted (the kernel says
		// so: NLM_F_DUMP_INTR) is asked for again, a few times.
		for i := 0; i < 5 && errors.Is(err, netlink.ErrDumpInterrupted); i++ {
			list, err = netlink.AddrList(nil, netlink.FAMILY_ALL)
		}
		for _, a := range list {
			if ip, ok := netip.AddrFromSlice(a.IP); ok && !ip.Unmap().IsLoopback() {
				addrs = append(addrs, ip.Unmap())
			}
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listing the addresses of network namespace %d: %w", n.Inode, err)
	}
	slices.SortFunc(addrs, netip.Addr.Compare)
	return slices.Compact(addrs), nil
}

// watchAddrs calls changed after every address change in the namespace,
// until n.stop is closed.
func (n *Namespace) watchAddrs(changed func()) error {
	updates := make(chan netlink.AddrUpdate, 16)
	err := n.Do(func() error {
		// Subscribed from inside, so the socket is the namespace's.
		return netlink.AddrSubscribeWithOptions(updates, n.stop, netlink.AddrSubscribeOptions{})
	})
	if err != nil {
		return fmt.Errorf("watching the addresses of network namespace %d: %w", n.Inode, err)
	}
	go func() {
		for range updates {
			changed()
		}
	}()
	return nil
}

// close releases the namespace; its service must be closed already.
func (n *Namespace) close() {
	close(n.stop)
	if n.handle.IsOpen() {
		n.handle.Close()
	}
}
