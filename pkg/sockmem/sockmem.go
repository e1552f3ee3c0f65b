// Package sockmem reads what memory a socket holds (SO_MEMINFO): how the
// bounded splice is probed and tested.
package sockmem

import (
	"fmt"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Info is a socket's memory, in bytes, as SO_MEMINFO reports it.
type Info struct {
	RmemAlloc  int64 // sk_rmem_alloc: received data the socket holds
	Rcvbuf     int64 // sk_rcvbuf: what TCP's flow control lets it hold
	WmemQueued int64 // sk_wmem_queued: the send queue
}

// Read returns the memory of the socket under c.
func Read(c syscall.Conn) (Info, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return Info{}, err
	}
	var mi [unix.SK_MEMINFO_VARS]uint32
	var errno syscall.Errno
	err = rc.Control(func(fd uintptr) {
		// x/sys/unix has no getsockopt for SO_MEMINFO's array.
		l := uint32(len(mi) * 4)
		_, _, errno = unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_SOCKET, unix.SO_MEMINFO,
			uintptr(unsafe.Pointer(&mi[0])), uintptr(unsafe.Pointer(&l)), 0)
	})
	if err == nil && errno != 0 {
		err = errno
	}
	if err != nil {
		return Info{}, fmt.Errorf("SO_MEMINFO: %w", err)
	}
	return Info{
		RmemAlloc:  int64(mi[unix.SK_MEMINFO_RMEM_ALLOC]),
		Rcvbuf:     int64(mi[unix.SK_MEMINFO_RCVBUF]),
		WmemQueued: int64(mi[unix.SK_MEMINFO_WMEM_QUEUED]),
	}, nil
}
