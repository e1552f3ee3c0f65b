package handover

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// ListenerName names a listener of kind ("out4", "out6", "tun") in the
// network namespace with the given cookie. Cookies are the kernel's, the
// same in every process, and never reused.
func ListenerName(kind string, netns uint64) string {
	return kind + "/" + strconv.FormatUint(netns, 10)
}

// Listeners are the listening sockets a predecessor handed over (Receive,
// or systemd's store: FromSystemd), by name, until they are taken. A name is
// never trusted alone: Take checks what the socket is.
type Listeners struct {
	mu    sync.Mutex
	files map[string]*os.File
}

// NewListeners keeps files until they are taken; it owns them.
func NewListeners(files map[string]*os.File) *Listeners {
	if files == nil {
		files = make(map[string]*os.File)
	}
	return &Listeners{files: files}
}

// ErrMismatch says that a handed-over descriptor was not the listener its
// name promised; it has been closed, and the caller listens anew.
var ErrMismatch = errors.New("handed-over descriptor does not match")

// Take returns the handed-over listener called name, if it is a TCP
// listener in the network namespace with cookie netns, bound to one of
// addrs. The caller owns the result. Nothing under that name: nil, nil.
// A descriptor under that name that does not match is closed, and the error
// (ErrMismatch) says why.
func (l *Listeners) Take(name string, netns uint64, addrs ...netip.AddrPort) (*net.TCPListener, error) {
	l.mu.Lock()
	f, ok := l.files[name]
	delete(l.files, name)
	l.mu.Unlock()
	if !ok {
		return nil, nil
	}
	defer f.Close()
	if err := check(f, netns, addrs); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrMismatch, name, err)
	}
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("handed-over listener %s: %w", name, err)
	}
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		ln.Close()
		return nil, fmt.Errorf("%w: %s: not a TCP listener", ErrMismatch, name)
	}
	return tl, nil
}

// check says why f is not a TCP listener in netns bound to one of addrs.
func check(f *os.File, netns uint64, addrs []netip.AddrPort) error {
	raw, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var cerr error
	err = raw.Control(func(fd uintptr) {
		cerr = checkFD(int(fd), netns, addrs)
	})
	return errors.Join(err, cerr)
}

func checkFD(fd int, netns uint64, addrs []netip.AddrPort) error {
	if typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil {
		return fmt.Errorf("not a socket: %w", err)
	} else if typ != unix.SOCK_STREAM {
		return fmt.Errorf("socket type %d, not a stream", typ)
	}
	// Go (1.24+) listens with MPTCP where the kernel has it: the
	// listener's protocol is then IPPROTO_MPTCP, and plain TCP clients get
	// plain TCP connections from it.
	if proto, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL); err != nil ||
		proto != unix.IPPROTO_TCP && proto != unix.IPPROTO_MPTCP {
		return fmt.Errorf("protocol %d (%v), not TCP", proto, err)
	}
	if acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || acc != 1 {
		return fmt.Errorf("not listening (%v)", err)
	}
	cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return fmt.Errorf("reading its network namespace: %w", err)
	}
	if cookie != netns {
		return fmt.Errorf("in network namespace %d, want %d", cookie, netns)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return err
	}
	var bound netip.AddrPort
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		bound = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		bound = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	default:
		return fmt.Errorf("bound to %T, not an IP address", sa)
	}
	if !slices.Contains(addrs, bound) {
		return fmt.Errorf("bound to %s, want %v", bound, addrs)
	}
	return nil
}

// Names lists what is left, sorted.
func (l *Listeners) Names() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	names := make([]string, 0, len(l.files))
	for n := range l.files {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// CloseRest closes what was not taken (a namespace gone meanwhile) and
// returns its names.
func (l *Listeners) CloseRest() []string {
	names := l.Names()
	l.mu.Lock()
	defer l.mu.Unlock()
	for n, f := range l.files {
		f.Close()
		delete(l.files, n)
	}
	return names
}

// FromSystemd takes the descriptors systemd passed (sd_listen_fds_with_names:
// LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES), among them what the file
// descriptor store kept, and unsets the variables so that no child takes
// them for its own. Not started by systemd: none.
func FromSystemd() (map[string]*os.File, error) {
	files, err := fromEnv(os.Getenv, os.Getpid(), listenFDsStart)
	for _, v := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		os.Unsetenv(v)
	}
	return files, err
}

// listenFDsStart is SD_LISTEN_FDS_START.
const listenFDsStart = 3

func fromEnv(getenv func(string) string, pid, first int) (map[string]*os.File, error) {
	if getenv("LISTEN_PID") != strconv.Itoa(pid) {
		return nil, nil
	}
	n, err := strconv.Atoi(getenv("LISTEN_FDS"))
	if err != nil || n < 0 {
		return nil, fmt.Errorf("LISTEN_FDS=%q: %v", getenv("LISTEN_FDS"), err)
	}
	var names []string
	if v := getenv("LISTEN_FDNAMES"); v != "" {
		names = strings.Split(v, ":")
	}
	out := make(map[string]*os.File, n)
	var errs []error
	for i := range n {
		fd := first + i
		unix.CloseOnExec(fd)
		name := "unknown"
		if i < len(names) {
			name = names[i]
		}
		if _, dup := out[name]; dup {
			unix.Close(fd)
			errs = append(errs, fmt.Errorf("descriptor %q passed twice", name))
			continue
		}
		out[name] = os.NewFile(uintptr(fd), name)
	}
	return out, errors.Join(errs...)
}
