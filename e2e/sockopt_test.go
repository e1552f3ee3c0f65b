package e2e

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// sockoptProbe is the "sockopts" helper: it opens a TCP connection to
// args[0] and prints the outcome of getsockopt calls that smesh's
// cgroup/getsockopt program must leave untouched, with small and with large
// (over a page) buffers.
func sockoptProbe(args []string) int {
	c, err := net.Dial("tcp4", args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer c.Close()
	raw, _ := c.(*net.TCPConn).SyscallConn()
	calls := []struct {
		name         string
		level, opt   int
		size         int
		volatileData bool // value changes between calls: compare length and error only
	}{
		{"SO_RCVBUF", unix.SOL_SOCKET, unix.SO_RCVBUF, 4, false},
		{"SO_TYPE large", unix.SOL_SOCKET, unix.SO_TYPE, 8192, false},
		{"TCP_NODELAY", unix.IPPROTO_TCP, unix.TCP_NODELAY, 4, false},
		{"TCP_CONGESTION", unix.IPPROTO_TCP, unix.TCP_CONGESTION, 16, false},
		{"TCP_INFO", unix.IPPROTO_TCP, unix.TCP_INFO, 1024, true},
		{"TCP_INFO large", unix.IPPROTO_TCP, unix.TCP_INFO, 16384, true},
		{"IP_TOS large", unix.SOL_IP, unix.IP_TOS, 8192, false},
		{"SO_ORIGINAL_DST uncaptured", unix.SOL_IP, unix.SO_ORIGINAL_DST, 16, false},
		{"SO_ORIGINAL_DST uncaptured large", unix.SOL_IP, unix.SO_ORIGINAL_DST, 8192, false},
	}
	for _, call := range calls {
		buf := make([]byte, call.size)
		l := uint32(call.size)
		var errno error
		raw.Control(func(fd uintptr) {
			_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(call.level), uintptr(call.opt),
				uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
			if e != 0 {
				errno = e
			}
		})
		value := fmt.Sprintf("%x", bytes.TrimRight(buf[:min(int(l), len(buf))], "\x00"))
		if call.volatileData {
			value = "-"
		}
		fmt.Printf("%s: len=%d err=%v value=%s\n", call.name, l, errno, value)
	}
	return 0
}

// TestGetsockoptUntouched: in smeshd's own cgroup, where cgroup/getsockopt
// is attached, every other getsockopt answers exactly as in a cgroup
// without it.
func TestGetsockoptUntouched(t *testing.T) {
	n := newNode(t)
	n.server(n.enrolled, "127.0.0.1:9000")
	n.start("splice", "")
	run := func(cg string) string {
		h := testenv.StartHelper(t, cg, n.ns.Name, "sockopts", "127.0.0.1:9000")
		if err := h.Wait(); err != nil {
			t.Fatalf("sockopts: %v %s", err, h.Stderr())
		}
		return h.Stdout()
	}
	plain := run(testenv.NewCgroup(t))
	hooked := run(n.smeshCg)
	if plain != hooked {
		t.Errorf("getsockopt answers differ under smesh's hook:\nwithout:\n%s\nwith:\n%s", plain, hooked)
	}
	if !strings.Contains(plain, "TCP_CONGESTION") || strings.Count(plain, "\n") != 9 {
		t.Errorf("probe output incomplete:\n%s", plain)
	}
}
