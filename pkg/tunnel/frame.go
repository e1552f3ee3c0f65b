package tunnel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/rawio"
)

// Frames of wire protocol v2 (drawn in header.go).
const (
	frameHeaderSize = 4
	frameData       = 'D'
	frameFin        = 'F'
	// maxFrameData is the most one 'D' frame carries: the relay's read
	// size, so that one read is one frame.
	maxFrameData = 64 << 10
	// smallFrame: a frame of up to this much data is copied behind its
	// header and sent as one TLS record; larger ones send the header as a
	// record of its own rather than copy the data.
	smallFrame = 4 << 10
)

// frameError is a frame that breaks the rules of protocol v2.
type frameError struct{ detail string }

func (e *frameError) Error() string { return "tunnel frame: " + e.detail }

func putFrameHeader(h []byte, typ byte, n int) {
	h[0] = typ
	h[1] = byte(n >> 16)
	binary.BigEndian.PutUint16(h[2:4], uint16(n))
}

// parseFrameHeader returns a frame's type and length, or a *frameError.
func parseFrameHeader(h []byte) (typ byte, n int, err error) {
	n = int(h[1])<<16 | int(binary.BigEndian.Uint16(h[2:4]))
	switch h[0] {
	case frameData:
		if n == 0 || n > maxFrameData {
			return 0, 0, &frameError{fmt.Sprintf("data frame of %d bytes (1 to %d)", n, maxFrameData)}
		}
	case frameFin:
		if n != 0 {
			return 0, 0, &frameError{fmt.Sprintf("end frame with a length of %d", n)}
		}
	default:
		return 0, 0, &frameError{fmt.Sprintf("frame type %#x", h[0])}
	}
	return h[0], n, nil
}

// smallPool holds the buffers small frames are copied into with their
// header, one while a frame is encrypted.
var smallPool = sync.Pool{New: func() any { return new([frameHeaderSize + smallFrame]byte) }}

// writeData sends p as 'D' frames, each with one write(2). One goroutine
// at a time writes to a link (wh).
func (c *link) writeData(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		chunk := p[:min(len(p), maxFrameData)]
		c.raw.startBatch()
		err := c.appendData(chunk)
		if ferr := c.raw.flushBatch(); err == nil {
			err = ferr
		}
		if err != nil {
			return written, err
		}
		written += len(chunk)
		p = p[len(chunk):]
	}
	return written, nil
}

// appendData encrypts one 'D' frame of p (at most maxFrameData) into the
// open batch.
func (c *link) appendData(p []byte) error {
	if len(p) <= smallFrame {
		b := smallPool.Get().(*[frameHeaderSize + smallFrame]byte)
		buf := b[:frameHeaderSize+len(p)]
		putFrameHeader(buf, frameData, len(p))
		copy(buf[frameHeaderSize:], p)
		_, err := c.tls.Write(buf) // encrypted into the batch: b is free again
		smallPool.Put(b)
		return err
	}
	h := c.wh[:]
	putFrameHeader(h, frameData, len(p))
	if _, err := c.tls.Write(h); err != nil {
		return err
	}
	_, err := c.tls.Write(p)
	return err
}

// open sends the header of a tunnelled connection and its first bytes, if
// any, with one write(2).
func (c *link) open(hdr, first []byte) error {
	c.raw.startBatch()
	_, err := c.tls.Write(hdr)
	if err == nil && len(first) > 0 {
		err = c.appendData(first)
	}
	if ferr := c.raw.flushBatch(); err == nil {
		err = ferr
	}
	return err
}

// writeFin sends an 'F' frame: this direction of the tunnelled connection
// ends.
func (c *link) writeFin() error {
	h := c.wh[:]
	putFrameHeader(h, frameFin, 0)
	_, err := c.Write(h)
	return err
}

// readData reads data of the current tunnelled connection into p: fin
// when its 'F' frame came. A link that ends inside a tunnelled connection,
// even with close_notify, is cut short: io.ErrUnexpectedEOF.
func (c *link) readData(p []byte) (n int, fin bool, err error) {
	if c.rem == 0 {
		// A read deadline (the idle timeout) may end a read inside the
		// frame header: what was read of it stays for the next call.
		for c.fhn < frameHeaderSize {
			m, err := c.Read(c.fh[c.fhn:])
			c.fhn += m
			if err != nil {
				return 0, false, unexpected(err)
			}
		}
		c.fhn = 0
		typ, size, err := parseFrameHeader(c.fh[:])
		if err != nil {
			return 0, false, err
		}
		if typ == frameFin {
			return 0, true, nil
		}
		c.rem = size
	}
	if len(p) > c.rem {
		p = p[:c.rem]
	}
	n, err = c.Read(p)
	c.rem -= n
	if err != nil && c.rem > 0 {
		err = unexpected(err)
	} else if err == io.EOF {
		err = nil // the frame is complete; the end shows at the next
	}
	return n, false, err
}

// unexpected turns an end of stream inside a tunnelled connection into the
// error it is.
func unexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// alive reports whether an idle pooled link can carry another tunnelled
// connection: nothing may arrive on one (a peer that retires it sends
// close_notify, one that died a FIN or a reset), so anything readable, an
// end or an error means no.
func (c *link) alive() bool {
	if c.raw.rbuf != nil || c.raw.eof.Load() {
		return false
	}
	p, err := c.raw.peeker()
	if err != nil {
		return false
	}
	wait, looked := p.look()
	return looked && wait
}

// peeker looks whether a read of a socket would return at once, without
// reading: one recv(MSG_PEEK|MSG_DONTWAIT), no waiting. It is made once per
// socket, so that a look allocates nothing.
type peeker struct {
	rc  syscall.RawConn
	fn  func(fd uintptr) bool
	b   [1]byte
	err error
}

func newPeeker(rc syscall.RawConn) *peeker {
	p := &peeker{rc: rc}
	p.fn = func(fd uintptr) bool {
		p.err = rawio.PeekNoWait(fd, &p.b)
		return true
	}
	return p
}

// look reports whether a read would wait: nothing to read, no end of
// stream, no error. looked is false when the socket could not be asked
// (it is closed).
func (p *peeker) look() (wait, looked bool) {
	if err := p.rc.Read(p.fn); err != nil {
		return false, false
	}
	return p.err == unix.EAGAIN, true
}
