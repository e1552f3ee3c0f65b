package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ip6tSoOriginalDst is IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h),
// which x/sys/unix does not name.
const ip6tSoOriginalDst = 80

// origDstRetry bounds how long OriginalDst asks again when the kernel has
// no original destination for a connection.
const origDstRetry = time.Second

// OriginalDst asks the kernel where a captured connection was going before
// connect4 sent it to smeshd (SO_ORIGINAL_DST, answered by smesh's
// cgroup/getsockopt program from the original-destination map).
//
// A miss is asked again for up to origDstRetry: while a successor whose
// smesh_orig_dst has another layout takes over (docs/restart.md 3.6), a
// connection established by the new sock_ops program has its entry in the
// new map only, and one accepted then by the predecessor is answered by
// the old getsockopt program, which reads the old map, until every
// getsockopt link runs the new program: milliseconds later, hundreds under
// emulation. The program passes a miss on to the kernel, whose answer is
// ENOENT with netfilter's conntrack loaded and ENOPROTOOPT without it (the
// kernel-test guest). A connection that was never captured (made to the
// listener directly) has no entry either, and is reset that much later.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	wait := time.Millisecond
	deadline := time.Now().Add(origDstRetry)
	for {
		dst, err := originalDst(c)
		miss := errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOPROTOOPT)
		if !miss || time.Now().Add(wait).After(deadline) {
			return dst, err
		}
		time.Sleep(wait)
		wait *= 2
	}
}

func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	// A connection accepted on the IPv4 listener (a dual-stack app's
	// v4-mapped one too) asks at the IPv4 level, as any
	// SO_ORIGINAL_DST-aware proxy would; one on the IPv6 listener at the
	// IPv6 level (IP6T_SO_ORIGINAL_DST, what Envoy asks).
	level, opt := unix.SOL_IP, unix.SO_ORIGINAL_DST
	if local, ok := c.LocalAddr().(*net.TCPAddr); ok && local.AddrPort().Addr().Is6() && !local.AddrPort().Addr().Is4In6() {
		level, opt = unix.SOL_IPV6, ip6tSoOriginalDst
	}
	var buf [unix.SizeofSockaddrInet6]byte
	var serr error
	err = raw.Control(func(fd uintptr) {
		l := uint32(len(buf))
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), uintptr(opt),
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
		if errno != 0 {
			serr = errno
		}
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("SO_ORIGINAL_DST: %w", err)
	}
	// sockaddr_in and sockaddr_in6 both start with the family and the
	// port (network byte order).
	port := binary.BigEndian.Uint16(buf[2:4])
	switch fam := binary.NativeEndian.Uint16(buf[0:2]); fam {
	case unix.AF_INET:
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), port), nil
	case unix.AF_INET6:
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(buf[8:24])).Unmap(), port), nil
	default:
		return netip.AddrPort{}, fmt.Errorf("SO_ORIGINAL_DST: address family %d", fam)
	}
}

// smeshSoSrcID is SMESH_SO_SRC_ID (bpf/connect/connect.c): smesh's own
// getsockopt option at SOL_IP, answered by its cgroup/getsockopt program.
const smeshSoSrcID = 0x534d4931

// OriginalSource asks the kernel for the source identity number connect4/6
// recorded for a captured connection (the cgroup that called connect(),
// numbered by smeshd: bpf/connect/identity.h). 0 with no error when there is
// none: a connection captured by a predecessor's programs (which recorded
// no source), or an older program that does not know the option; the
// kernel then answers ENOPROTOOPT.
func OriginalSource(c *net.TCPConn) (uint32, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var n uint32
	var serr error
	err = raw.Control(func(fd uintptr) {
		n, serr = getsockoptUint32(int(fd), unix.SOL_IP, smeshSoSrcID)
	})
	if err == nil {
		err = serr
	}
	if errors.Is(err, unix.ENOPROTOOPT) || errors.Is(err, unix.ENOENT) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("SMESH_SO_SRC_ID: %w", err)
	}
	return n, nil
}

// getsockoptUint32 reads a 4-byte option; the answer must be exactly that
// long.
func getsockoptUint32(fd, level, opt int) (uint32, error) {
	var buf [4]byte
	l := uint32(len(buf))
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt),
		uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
	if errno != 0 {
		return 0, errno
	}
	if l != uint32(len(buf)) {
		return 0, fmt.Errorf("answer of %d bytes, want 4", l)
	}
	return binary.NativeEndian.Uint32(buf[:]), nil
}
