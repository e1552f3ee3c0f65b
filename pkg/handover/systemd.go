package handover

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// systemd's file descriptor store (docs/restart.md, 2 (d) and 3.3): under
// systemd smeshd keeps every object it would hand over in the store, under
// the hand-over's names, so that they outlive the process across
// `systemctl restart` and a crash restart, and come back in LISTEN_FDS /
// LISTEN_FDNAMES. go-systemd's SdNotify cannot send descriptors, hence
// Notify.

// Notify sends state to systemd's notification socket (NOTIFY_SOCKET) with
// files as SCM_RIGHTS. No socket (not under systemd): nothing is sent, nil.
// The caller keeps its own copies.
func Notify(state string, files ...*os.File) error {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return nil
	}
	if len(files) > maxPerMessage {
		return fmt.Errorf("notifying systemd: %d descriptors in one message, at most %d", len(files), maxPerMessage)
	}
	if addr[0] == '@' {
		addr = "\x00" + addr[1:] // abstract namespace
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("notifying systemd: %w", err)
	}
	defer unix.Close(fd)
	fds := make([]int, len(files))
	for i, f := range files {
		// Control, never Fd: Fd would make a listener blocking
		// (docs/restart.md, 2 (f)).
		raw, err := f.SyscallConn()
		if err != nil {
			return fmt.Errorf("notifying systemd: descriptor %s: %w", f.Name(), err)
		}
		if err := raw.Control(func(d uintptr) { fds[i] = int(d) }); err != nil {
			return fmt.Errorf("notifying systemd: descriptor %s: %w", f.Name(), err)
		}
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if err := unix.Sendmsg(fd, []byte(state), oob, &unix.SockaddrUnix{Name: addr}, 0); err != nil {
		return fmt.Errorf("notifying systemd (%s): %w", strings.ReplaceAll(state, "\n", " "), err)
	}
	return nil
}

// Store puts f into systemd's file descriptor store under name (FDSTORE=1,
// FDNAME=). poll false adds FDPOLL=0, which BPF maps and links need: a BPF
// map stored without it never came back (TestSystemdFDStore). The unit's
// FileDescriptorStoreMax= must leave room, or systemd drops it (and logs
// it).
func Store(name string, f *os.File, poll bool) error {
	state := "FDSTORE=1\nFDNAME=" + EncodeFDName(name)
	if !poll {
		state += "\nFDPOLL=0"
	}
	return Notify(state, f)
}

// Unstore removes every descriptor stored under name (FDSTOREREMOVE=1).
func Unstore(name string) error {
	return Notify("FDSTOREREMOVE=1\nFDNAME=" + EncodeFDName(name))
}

// EncodeFDName makes name a valid FDNAME: systemd (fdname_is_valid)
// accepts printable ASCII but ':' (LISTEN_FDNAMES' separator), up to 255
// characters. '%', ':' and anything else are %XX-escaped; '/' is kept.
func EncodeFDName(name string) string {
	var b strings.Builder
	for i := 0; i < len(name); i++ {
		c := name[i]
		if c <= ' ' || c >= 0x7f || c == ':' || c == '%' {
			fmt.Fprintf(&b, "%%%02X", c)
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

// DecodeFDName undoes EncodeFDName.
func DecodeFDName(s string) (string, error) {
	if !strings.Contains(s, "%") {
		return s, nil
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '%' {
			b.WriteByte(s[i])
			continue
		}
		if i+2 >= len(s) {
			return "", fmt.Errorf("file descriptor name %q: truncated escape", s)
		}
		v, err := strconv.ParseUint(s[i+1:i+3], 16, 8)
		if err != nil {
			return "", fmt.Errorf("file descriptor name %q: %w", s, err)
		}
		b.WriteByte(byte(v))
		i += 2
	}
	return b.String(), nil
}

// ValidFDName reports whether systemd accepts s as FDNAME
// (fdname_is_valid in src/basic/fd-util.c).
func ValidFDName(s string) bool {
	if len(s) > 255 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < ' ' || c >= 0x7f || c == ':' {
			return false
		}
	}
	return true
}

// WorkerFDsEnv names how many descriptors, from 3 on, smeshd's master
// passed to its worker: what systemd passed the master (LISTEN_FDS, whose
// LISTEN_PID names the master, so it cannot be passed on as it is), named
// by LISTEN_FDNAMES.
const WorkerFDsEnv = "SMESHD_WORKER_FDS"

// FromMaster takes the descriptors the master passed (WorkerFDsEnv,
// LISTEN_FDNAMES), by their decoded names, and unsets the variables so that
// no child takes them. None passed: none.
func FromMaster() (map[string]*os.File, error) {
	n := os.Getenv(WorkerFDsEnv)
	names := os.Getenv("LISTEN_FDNAMES")
	for _, v := range []string{WorkerFDsEnv, "LISTEN_FDNAMES"} {
		os.Unsetenv(v)
	}
	return fromMaster(n, names, listenFDsStart)
}

// fromMaster takes n descriptors from first on, named by names.
func fromMaster(n, names string, first int) (map[string]*os.File, error) {
	if n == "" || n == "0" {
		return nil, nil
	}
	getenv := func(k string) string {
		switch k {
		case "LISTEN_PID":
			return "0"
		case "LISTEN_FDS":
			return n
		case "LISTEN_FDNAMES":
			return names
		}
		return ""
	}
	raw, err := fromEnv(getenv, 0, first)
	out := make(map[string]*os.File, len(raw))
	errs := []error{err}
	for enc, f := range raw {
		name, derr := DecodeFDName(enc)
		if derr != nil {
			f.Close()
			errs = append(errs, derr)
			continue
		}
		out[name] = f
	}
	return out, errors.Join(errs...)
}

// IsSocket reports whether f is a socket (a listener: stored with FDPOLL,
// as systemd's own sockets are) rather than a BPF object or a lock.
func IsSocket(f *os.File) bool {
	raw, err := f.SyscallConn()
	if err != nil {
		return false
	}
	sock := false
	raw.Control(func(fd uintptr) {
		var st unix.Stat_t
		if unix.Fstat(int(fd), &st) == nil {
			sock = st.Mode&unix.S_IFMT == unix.S_IFSOCK
		}
	})
	return sock
}
