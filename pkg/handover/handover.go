// Package handover passes smeshd's open listening sockets (and any other
// descriptor, BPF links and maps included) from one smeshd process to the
// next over a unix socket, with SCM_RIGHTS, each under a name.
//
// A listening socket is a kernel object: while any process holds a
// descriptor to it (or one is in flight in a unix socket) it stays bound and
// the kernel keeps completing handshakes into its accept queue. Handing it
// over instead of closing it and listening again turns a restart's window
// from "refused" (or "let out uncaptured") into "waits in the accept queue"
// (docs/restart.md; experiments in handover_test.go).
//
// The wire format is one or more messages, each a JSON array of names as
// the data and the descriptors of those names, in order, as SCM_RIGHTS; the
// last message's array is empty. A message carries at most maxPerMessage
// descriptors (the kernel's SCM_MAX_FD is 253).
package handover

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"

	"golang.org/x/sys/unix"
)

// maxPerMessage stays below SCM_MAX_FD (253).
const maxPerMessage = 200

// maxNamesBytes bounds one message's JSON: 200 names of up to ~300 bytes.
const maxNamesBytes = 64 << 10

// Send sends files, by name, over c. The caller keeps its own copies: it
// closes them once the receiver confirmed (or when it no longer needs them),
// which is what keeps a listener bound if the receiver dies in between.
func Send(c *net.UnixConn, files map[string]*os.File) error {
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	for len(names) > 0 {
		batch := names[:min(len(names), maxPerMessage)]
		names = names[len(batch):]
		if err := sendBatch(c, batch, files); err != nil {
			return err
		}
	}
	return sendBatch(c, nil, nil)
}

func sendBatch(c *net.UnixConn, names []string, files map[string]*os.File) error {
	if names == nil {
		names = []string{}
	}
	data, err := json.Marshal(names)
	if err != nil {
		return err
	}
	fds := make([]int, len(names))
	for i, n := range names {
		// Not Fd(): it puts the file into blocking mode, and O_NONBLOCK
		// belongs to the open file description, which the dup of a
		// listener (TCPListener.File) shares with the listener itself:
		// its Accept would then block in accept4, past Close, and take
		// one more connection after the hand-over
		// (TestSessionHandsOver).
		raw, err := files[n].SyscallConn()
		if err != nil {
			return fmt.Errorf("descriptor %q: %w", n, err)
		}
		if err := raw.Control(func(fd uintptr) { fds[i] = int(fd) }); err != nil {
			return fmt.Errorf("descriptor %q: %w", n, err)
		}
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n, oobn, err := c.WriteMsgUnix(data, oob, nil)
	if err != nil {
		return fmt.Errorf("sending %d descriptors: %w", len(fds), err)
	}
	if n != len(data) || oobn != len(oob) {
		return fmt.Errorf("sending %d descriptors: short write", len(fds))
	}
	return nil
}

// Receive reads what Send sent. The descriptors are close-on-exec.
// On error, every descriptor received so far is closed.
func Receive(c *net.UnixConn) (_ map[string]*os.File, err error) {
	out := make(map[string]*os.File)
	defer func() {
		if err != nil {
			for _, f := range out {
				f.Close()
			}
		}
	}()
	buf := make([]byte, maxNamesBytes)
	oob := make([]byte, unix.CmsgSpace(maxPerMessage*4))
	for {
		n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
		if err != nil {
			return nil, fmt.Errorf("receiving descriptors: %w", err)
		}
		var fds []int
		if oobn > 0 {
			msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
			if err != nil {
				return nil, fmt.Errorf("parsing control message: %w", err)
			}
			for _, m := range msgs {
				got, err := unix.ParseUnixRights(&m)
				if err != nil {
					return nil, fmt.Errorf("parsing SCM_RIGHTS: %w", err)
				}
				fds = append(fds, got...)
			}
		}
		closeFds := func() {
			for _, fd := range fds {
				unix.Close(fd)
			}
		}
		if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
			closeFds()
			return nil, errors.New("receiving descriptors: message truncated")
		}
		if n == 0 {
			closeFds()
			return nil, errors.New("receiving descriptors: connection closed before the end")
		}
		var names []string
		if err := json.Unmarshal(buf[:n], &names); err != nil {
			closeFds()
			return nil, fmt.Errorf("decoding names: %w", err)
		}
		if len(names) != len(fds) {
			closeFds()
			return nil, fmt.Errorf("got %d names for %d descriptors", len(names), len(fds))
		}
		if len(names) == 0 {
			return out, nil
		}
		for i, name := range names {
			unix.CloseOnExec(fds[i])
			if _, dup := out[name]; dup {
				unix.Close(fds[i])
				err = fmt.Errorf("descriptor %q sent twice", name)
				continue
			}
			out[name] = os.NewFile(uintptr(fds[i]), name)
		}
		if err != nil {
			return nil, err
		}
	}
}
