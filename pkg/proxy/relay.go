package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
)

// bufSize is the relay's read size: large enough that bulk transfers cost few
// syscalls, small enough that many idle connections stay cheap.
const bufSize = 64 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, bufSize); return &b }}

// Result is what one relayed connection moved.
type Result struct {
	// AtoB and BtoA count the bytes written in each direction.
	AtoB, BtoA int64
	// Err is the first error other than a clean end of stream.
	Err error
}

// Relay moves bytes both ways between a and b until both directions end,
// then closes both. A clean end of stream on one side becomes a half-close
// (CloseWrite) on the other, so protocols that half-close keep working; an
// error on one side resets the other, so a reset reaches the far end as a
// reset, not as a clean close.
//
// It reads and writes with plain read(2)/write(2) through its own buffers.
// io.Copy between two TCPConns would use splice(2), which sees none of the
// bytes sk_msg redirects into a spliced socket.
func Relay(a, b *net.TCPConn) Result {
	var res Result
	var wg sync.WaitGroup
	var once sync.Once
	fail := func(err error) {
		once.Do(func() {
			res.Err = err
			// Abort both: SO_LINGER 0 makes Close send a reset.
			a.SetLinger(0)
			b.SetLinger(0)
			a.Close()
			b.Close()
		})
	}
	wg.Add(2)
	go func() { defer wg.Done(); res.AtoB = pipe(b, a, fail) }()
	go func() { defer wg.Done(); res.BtoA = pipe(a, b, fail) }()
	wg.Wait()
	a.Close()
	b.Close()
	return res
}

// pipe copies src to dst until src ends, then half-closes dst.
func pipe(dst, src *net.TCPConn, fail func(error)) int64 {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	var n int64
	for {
		nr, rerr := src.Read(buf)
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			n += int64(nw)
			if werr != nil {
				fail(werr)
				return n
			}
		}
		if errors.Is(rerr, io.EOF) {
			if err := dst.CloseWrite(); err != nil {
				fail(err)
			}
			return n
		}
		if rerr != nil {
			fail(rerr)
			return n
		}
	}
}
