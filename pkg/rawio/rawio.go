// Package rawio reads and writes non-blocking sockets with raw system calls,
// for the relay's hot path.
//
// Why: a Go system call (syscall.Syscall, hence net.Conn's Read and Write and
// unix.Read) enters the scheduler's syscall state, and the first one after
// every P went idle wakes sysmon so that it could take the P back if the
// call blocked. A relay between request/response peers goes idle between
// every message, so each message woke sysmon (a futex wake of another
// thread, which then ran for some microseconds, often on the CPU the next
// hop needed): 2-3 wake-ups per round trip per node where a C relay has 1.5,
// seen with `perf record -e sched:sched_wakeup -g` on smeshd (issue 26).
// A read or write of a non-blocking socket never sleeps, so it needs none of
// that: RawSyscall skips it. Waiting is still the poller's, through
// syscall.RawConn, under the connection's deadlines.
package rawio

import (
	"os"
	"sync"
	"syscall"
	"unsafe"
)

// Read is read(2) of a non-blocking fd: EAGAIN when it has nothing.
// EINTR is retried.
func Read(fd uintptr, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		n, _, errno := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		switch errno {
		case 0:
			return int(n), nil
		case syscall.EINTR:
			continue
		}
		return 0, errno
	}
}

// PeekNoWait is recv(2) of one byte with MSG_PEEK|MSG_DONTWAIT: whether a
// read would return at once (nil: bytes or the end of the stream), EAGAIN if
// it would wait.
func PeekNoWait(fd uintptr, b *[1]byte) error {
	_, _, errno := syscall.RawSyscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&b[0])), 1,
		syscall.MSG_PEEK|syscall.MSG_DONTWAIT, 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// Writer writes whole buffers to a non-blocking socket with write(2),
// waiting in the poller (under the write deadline) while the socket's send
// buffer is full. Made once per socket, so that a write allocates nothing;
// safe for concurrent use.
type Writer struct {
	rc syscall.RawConn
	fn func(fd uintptr) bool

	mu    sync.Mutex
	p     []byte
	n     int
	errno syscall.Errno
}

// NewWriter writes to rc's socket, which must be non-blocking (as every
// socket of package net is).
func NewWriter(rc syscall.RawConn) *Writer {
	w := &Writer{rc: rc}
	w.fn = w.write
	return w
}

// Write writes all of p, or returns how much it wrote and why it stopped:
// the poller's error (the socket closed, the deadline passed) or the
// system call's, as an *os.SyscallError.
func (w *Writer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.p, w.n, w.errno = p, 0, 0
	err := w.rc.Write(w.fn)
	n := w.n
	w.p = nil
	if err == nil && w.errno != 0 {
		err = os.NewSyscallError("write", w.errno)
	}
	return n, err
}

// write is run by RawConn.Write: false (wait until writable, then again)
// while the socket takes no more.
func (w *Writer) write(fd uintptr) bool {
	for w.n < len(w.p) {
		rest := w.p[w.n:]
		n, _, errno := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&rest[0])), uintptr(len(rest)))
		switch errno {
		case 0:
			w.n += int(n)
		case syscall.EINTR:
		case syscall.EAGAIN:
			return false
		default:
			w.errno = errno
			return true
		}
	}
	return true
}

// CloseWrite is shutdown(2) with SHUT_WR: a FIN after what was written.
// Like net.TCPConn.CloseWrite, without waking sysmon.
func CloseWrite(rc syscall.RawConn) error {
	var errno syscall.Errno
	if err := rc.Control(func(fd uintptr) {
		_, _, errno = syscall.RawSyscall(syscall.SYS_SHUTDOWN, fd, syscall.SHUT_WR, 0)
	}); err != nil {
		return err
	}
	if errno != 0 {
		return os.NewSyscallError("shutdown", errno)
	}
	return nil
}
