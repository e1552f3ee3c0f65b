package e2e

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"syscall"
	"time"

	"github.com/smesh-dev/smesh/pkg/sockmem"
	"golang.org/x/sys/unix"
)

// The slow-reader exchange (cmdSlow) checks bounded splice: the client
// writes an offset pattern as fast as it can, the server reads it slowly (or
// stalls first), and both report the most kernel memory their socket held
// (SO_MEMINFO), so the test can tell whether the connection stayed bounded.
//
// Request after the command byte: mode (1 byte: 'p' plain reads, 'w'
// MSG_WAITALL reads, 'l' SO_RCVLOWAT, 'g' plain reads after the server sent
// one byte first, 'm' plain reads of several writers' bytes, see
// writerByte, 's' MSG_WAITALL reads interrupted by signals), stall seconds (1 byte), pause per
// read in microseconds (4 bytes). Answer once the client half-closed:
// bytes read (8), offset of the first wrong byte or -1 (8), the most
// receive memory seen (8), and the most it exceeded the socket's receive
// buffer, what TCP alone would have let it hold (8).
const cmdSlow = 'L'

// slowReadSize is the size of each of the server's reads.
const slowReadSize = 64 << 10

// patternAt fills buf with the pattern at offset off: every 8-byte word,
// little endian, holds its own offset, so a lost, repeated or reordered byte
// anywhere shows.
func patternAt(buf []byte, off int64) {
	for i := range buf {
		o := off + int64(i)
		buf[i] = byte(uint64(o&^7) >> (8 * (o & 7)))
	}
}

// serveSlow is the server's side of cmdSlow.
func serveSlow(c *net.TCPConn, say func(string, ...any)) {
	var req [6]byte
	if _, err := io.ReadFull(c, req[:]); err != nil {
		return
	}
	mode, stall := req[0], time.Duration(req[1])*time.Second
	pause := time.Duration(binary.BigEndian.Uint32(req[2:])) * time.Microsecond
	if mode == 'l' {
		rc, _ := c.SyscallConn()
		rc.Control(func(fd uintptr) {
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVLOWAT, slowReadSize)
		})
	}
	if mode == 'g' {
		// The server's direction splices before the client's bulk.
		if _, err := c.Write([]byte{'g'}); err != nil {
			return
		}
	}
	time.Sleep(stall)
	var got, bad, maxRmem, maxOver int64 = 0, -1, 0, 0
	var seen [slowWriters]int64 // 'm': bytes of each writer so far
	buf := make([]byte, slowReadSize)
	want := make([]byte, slowReadSize)
	read := c.Read
	var br *blockingReader
	if mode == 'w' || mode == 'l' || mode == 's' {
		// Readers that wait in the kernel: recv(MSG_WAITALL), or plain
		// reads with SO_RCVLOWAT set above.
		flags := 0
		if mode != 'l' {
			flags = unix.MSG_WAITALL
		}
		var err error
		if br, err = newBlockingReader(c, flags, mode == 's'); err != nil {
			say("result slow error:%v", err)
			return
		}
		read = br.Read
		if mode == 's' {
			stop := br.signalEvery(time.Millisecond)
			defer stop()
		}
	}
	var err error
	for {
		var n int
		n, err = read(buf)
		if m, err := sockmem.Read(c); err == nil {
			maxRmem, maxOver = max(maxRmem, m.RmemAlloc), max(maxOver, m.RmemAlloc-m.Rcvbuf)
		}
		if n > 0 && bad < 0 && mode == 'm' {
			for i, b := range buf[:n] {
				w := int(b) / writerSpan
				if writerByte(w, seen[w]) != b {
					bad = got + int64(i)
					break
				}
				seen[w]++
			}
		} else if n > 0 && bad < 0 {
			patternAt(want[:n], got)
			if !bytes.Equal(buf[:n], want[:n]) {
				for i := range n {
					if buf[i] != want[i] {
						bad = got + int64(i)
						break
					}
				}
			}
		}
		got += int64(n)
		if err != nil {
			break
		}
		time.Sleep(pause)
	}
	interrupted := 0
	if br != nil {
		interrupted = br.interrupted
	}
	say("result slow %s read=%d bad=%d max_rmem=%d max_over_rcvbuf=%d interrupted=%d", outcome(ignoreEOF(err)), got, bad, maxRmem, maxOver, interrupted)
	var ans [32]byte
	binary.BigEndian.PutUint64(ans[0:], uint64(got))
	binary.BigEndian.PutUint64(ans[8:], uint64(bad))
	binary.BigEndian.PutUint64(ans[16:], uint64(maxRmem))
	binary.BigEndian.PutUint64(ans[24:], uint64(maxOver))
	c.Write(ans[:])
}

func ignoreEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

// blockingReader reads a socket with blocking recv(2) calls, flags added,
// that wait inside the kernel (tcp_recvmsg: sk_wait_data, or
// tcp_bpf_recvmsg's wait), as a C program's reads on a blocking socket do:
// what a spliced socket must never leave waiting forever or out of order.
// Go's own reads cannot show it: its descriptors are non-blocking, so the
// kernel never sleeps in them, whatever MSG_WAITALL or SO_RCVLOWAT say.
//
// Its goroutine keeps one thread, and that thread takes no signals (as a C
// program's that sets no handler): the Go runtime signals its threads
// (preemption), and a signal that interrupts a wait in tcp_bpf_recvmsg
// makes the kernel return EAGAIN on a blocking socket where tcp_recvmsg
// restarts the call (README, "How a spliced hop is bounded"). A reader
// made with interrupted set is signalled on purpose instead (signalEvery)
// and takes that EAGAIN for what it is there, an interrupted read, and
// counts it.
type blockingReader struct {
	c           *net.TCPConn // keeps the descriptor open
	fd          int
	flags       int
	tid         int
	signalled   bool
	interrupted int // reads that returned EAGAIN, interrupted by a signal
}

// newBlockingReader switches c's descriptor to blocking mode: c must not
// be read through Go any more, and only from the calling goroutine, which
// it locks to its thread for good (the thread ends with the goroutine).
func newBlockingReader(c *net.TCPConn, flags int, signalled bool) (*blockingReader, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	runtime.LockOSThread()
	r := &blockingReader{c: c, flags: flags, tid: unix.Gettid(), signalled: signalled}
	if !signalled {
		var all unix.Sigset_t
		for i := range all.Val {
			all.Val[i] = ^uint64(0)
		}
		if err := unix.PthreadSigmask(unix.SIG_BLOCK, &all, nil); err != nil {
			return nil, fmt.Errorf("blocking signals: %w", err)
		}
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { r.fd, serr = int(fd), unix.SetNonblock(int(fd), false) }); err != nil {
		return nil, err
	}
	return r, serr
}

// signalEvery sends SIGURG (which the Go runtime takes and ignores, with
// SA_RESTART) to the reader's thread every d until stop is called.
func (r *blockingReader) signalEvery(d time.Duration) (stop func()) {
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(d)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				unix.Tgkill(os.Getpid(), r.tid, unix.SIGURG)
			}
		}
	}()
	return func() { close(done) }
}

func (r *blockingReader) Read(buf []byte) (int, error) {
	for {
		n, _, err := unix.Recvfrom(r.fd, buf, r.flags)
		runtime.KeepAlive(r.c)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EAGAIN) && r.signalled:
			r.interrupted++
			continue
		case err != nil:
			return 0, err
		case n == 0:
			return 0, io.EOF
		}
		return n, nil
	}
}

// slowMemory is what a slow exchange held in the kernel at most: the
// reader's receive memory, how far that exceeded its receive buffer, and
// the writer's send queue.
type slowMemory struct{ rmem, overRcvbuf, wqueued int64 }

// slowWrite is the client's side of cmdSlow: it writes n bytes of the
// pattern as fast as the connection takes them, then checks the server's
// answer. It returns the server's and its own memory peaks. With hold, it
// keeps the connection open once every byte is written and acknowledged
// (holdOpen) before it half-closes.
func slowWrite(addr string, n int64, mode byte, stall byte, pause time.Duration, hold bool) (mem slowMemory, err error) {
	c, err := dial(addr)
	if err != nil {
		return mem, err
	}
	defer c.Close()
	req := []byte{cmdSlow, mode, stall, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(req[3:], uint32(pause/time.Microsecond))
	if _, err := c.Write(req); err != nil {
		return mem, err
	}
	if mode == 'g' {
		var g [1]byte
		if _, err := io.ReadFull(c, g[:]); err != nil {
			return mem, fmt.Errorf("reading the server's first byte: %w", err)
		}
	}
	if mode == 'm' {
		return multiWrite(c, n)
	}
	buf := make([]byte, 64<<10)
	for off := int64(0); off < n; {
		k := min(int64(len(buf)), n-off)
		patternAt(buf[:k], off)
		w, err := c.Write(buf[:k])
		off += int64(w)
		if mi, err := sockmem.Read(c); err == nil {
			mem.wqueued = max(mem.wqueued, mi.WmemQueued)
		}
		if err != nil {
			if errors.Is(err, syscall.ENOMEM) {
				return mem, fmt.Errorf("write at offset %d: ENOMEM: the kernel ran out of TCP memory", off)
			}
			return mem, fmt.Errorf("write at offset %d: %w", off, err)
		}
	}
	if hold {
		if err := holdOpen(c); err != nil {
			return mem, err
		}
	}
	return mem, slowAnswer(c, n, &mem)
}

// holdOpen waits until the peer acknowledged every byte c sent by TCP (its
// send queue is empty), prints "held", and waits for a line on stdin: the
// test reads counters meanwhile, of a connection still open.
func holdOpen(c *net.TCPConn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(10 * time.Millisecond) {
		unacked, ierr := 0, error(nil)
		if err := rc.Control(func(fd uintptr) { unacked, ierr = unix.IoctlGetInt(int(fd), unix.TIOCOUTQ) }); err != nil {
			return err
		}
		if ierr != nil {
			return fmt.Errorf("TIOCOUTQ: %w", ierr)
		}
		if unacked == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d bytes still unacknowledged after a minute", unacked)
		}
	}
	fmt.Println("held")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		return fmt.Errorf("waiting for the test's go-ahead: %w", err)
	}
	return nil
}

// slowAnswer half-closes c and checks the server's answer to an n-byte
// slow exchange.
func slowAnswer(c *net.TCPConn, n int64, mem *slowMemory) error {
	if err := c.CloseWrite(); err != nil {
		return err
	}
	c.SetReadDeadline(time.Now().Add(60 * time.Second))
	var ans [32]byte
	if _, err := io.ReadFull(c, ans[:]); err != nil {
		return fmt.Errorf("reading the server's answer: %w", err)
	}
	got, bad := int64(binary.BigEndian.Uint64(ans[0:])), int64(binary.BigEndian.Uint64(ans[8:]))
	mem.rmem, mem.overRcvbuf = int64(binary.BigEndian.Uint64(ans[16:])), int64(binary.BigEndian.Uint64(ans[24:]))
	switch {
	case bad >= 0:
		return fmt.Errorf("the server read a wrong byte at offset %d", bad)
	case got != n:
		return fmt.Errorf("the server read %d bytes, sent %d", got, n)
	}
	return nil
}

// slowWriters is how many threads write one socket at once in mode 'm'.
const slowWriters = 4

// writerSpan is how many byte values each writer of mode 'm' has.
const writerSpan = 256 / slowWriters

// writerByte is byte i of writer w's stream in mode 'm': the writer in the
// high bits, i modulo writerSpan in the rest. Writers interleave anywhere
// (the kernel may cut a send at any byte), yet a lost, repeated or
// reordered byte within one writer's stream shows.
func writerByte(w int, i int64) byte { return byte(w*writerSpan + int(i%writerSpan)) }

// multiWrite writes n bytes from slowWriters threads at once, each with its
// own blocking send(2) on the one socket, so that the kernel runs their
// sends concurrently (Go's own Write would queue them on the descriptor's
// write lock), and checks the server's answer.
func multiWrite(c *net.TCPConn, n int64) (slowMemory, error) {
	var mem slowMemory
	f, err := c.File() // a second descriptor of the same socket
	if err != nil {
		return mem, err
	}
	defer f.Close()
	fd := int(f.Fd())
	// Blocking: each writer waits in the kernel, as a C program's would.
	// (The flag is the socket's, c's too: c is only used below.)
	if err := unix.SetNonblock(fd, false); err != nil {
		return mem, err
	}
	errs := make(chan error, slowWriters)
	for w := range slowWriters {
		go func() {
			share := n / slowWriters
			if w == slowWriters-1 {
				share = n - share*(slowWriters-1)
			}
			buf := make([]byte, 1<<20)
			for off := int64(0); off < share; {
				// Sizes vary so that the writers' sends cut each other
				// at ever other places.
				k := min(int64(4096+(int(off)*7919+w*104729)%(len(buf)-4096)), share-off)
				for i := range k {
					buf[i] = writerByte(w, off+i)
				}
				for p := buf[:k]; len(p) > 0; {
					m, err := unix.Write(fd, p)
					if errors.Is(err, unix.EINTR) {
						continue
					}
					if err != nil {
						errs <- fmt.Errorf("writer %d at offset %d: %w", w, off, err)
						return
					}
					p = p[m:]
				}
				off += k
			}
			errs <- nil
		}()
	}
	for range slowWriters {
		if err := <-errs; err != nil {
			return mem, err
		}
	}
	unix.SetNonblock(fd, true)
	return mem, slowAnswer(c, n, &mem)
}
