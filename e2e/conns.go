package e2e

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

// conns is the "conns" helper: it holds connections open across commands
// read from stdin, one per line, so that a test can interleave the opening,
// sending and closing of connections in several namespaces at will. Each
// command is answered on stdout with "ok CMD ID" or "err CMD ID: reason".
//
//	dial ID SRC DST   connect from SRC (ip:port) to DST and send cmdHold
//	send ID N SEED    send N bytes of stream(SEED)
//	check ID          half-close, then check the server's count and digest
//	close ID          close the connection
func conns(args []string) int {
	held := make(map[string]*heldConn)
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) < 2 {
			fmt.Println("err ? ?: want CMD ID ...")
			continue
		}
		cmd, id := f[0], f[1]
		err := func() error {
			if cmd == "dial" {
				if len(f) != 4 {
					return errors.New("want dial ID SRC DST")
				}
				c, err := dialFrom(f[2], f[3])
				if err != nil {
					return err
				}
				if _, err := c.Write([]byte{cmdHold}); err != nil {
					return err
				}
				held[id] = &heldConn{c: c, h: sha256.New()}
				return nil
			}
			hc := held[id]
			if hc == nil {
				return errors.New("no such connection")
			}
			switch cmd {
			case "send":
				if len(f) != 4 {
					return errors.New("want send ID N SEED")
				}
				n, err1 := strconv.ParseInt(f[2], 10, 64)
				seed, err2 := strconv.ParseUint(f[3], 10, 64)
				if err := errors.Join(err1, err2); err != nil {
					return err
				}
				_, err := io.CopyN(plainWriter{io.MultiWriter(hc.c, hc.h)}, stream(seed), n)
				hc.n += n
				return err
			case "check":
				return hc.check()
			case "close":
				delete(held, id)
				return hc.c.Close()
			}
			return errors.New("unknown command")
		}()
		if err != nil {
			fmt.Printf("err %s %s: %v\n", cmd, id, err)
		} else {
			fmt.Printf("ok %s %s\n", cmd, id)
		}
	}
	return 0
}

type heldConn struct {
	c *net.TCPConn
	h hash.Hash // of everything sent
	n int64
}

// check half-closes and compares the server's answer with what was sent.
func (hc *heldConn) check() error {
	if err := hc.c.CloseWrite(); err != nil {
		return err
	}
	hc.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var ans [8 + sha256.Size]byte
	if _, err := io.ReadFull(hc.c, ans[:]); err != nil {
		return fmt.Errorf("reading the server's digest: %w", err)
	}
	if got := int64(binary.BigEndian.Uint64(ans[:8])); got != hc.n {
		return fmt.Errorf("server received %d bytes, sent %d", got, hc.n)
	}
	if !bytes.Equal(ans[8:], hc.h.Sum(nil)) {
		return errors.New("server received different bytes than sent")
	}
	return nil
}

// dialFrom connects from a fixed local address: tests need the same
// 4-tuple in several namespaces.
func dialFrom(src, dst string) (*net.TCPConn, error) {
	laddr, err := net.ResolveTCPAddr("tcp", src)
	if err != nil {
		return nil, err
	}
	d := net.Dialer{LocalAddr: laddr, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", dst)
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// pause is the "pause" helper: it waits until killed, like a pod's pause
// container, so that a pod's namespace has a process in it. It sleeps
// rather than blocking on nothing: a statically linked Go program (as in
// make kernel-test's guest) with every goroutine blocked for good dies of
// "all goroutines are asleep".
func pause(args []string) int {
	for {
		time.Sleep(time.Hour)
	}
}
