package handover

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The hand-over between a running smeshd (the predecessor) and one that
// starts (the successor), on a unix seqpacket socket in the runtime
// directory (docs/restart.md, 3.1):
//
//	successor                         predecessor
//	hello {version, pid, layout}  ->
//	                              <-  answer {ok | reason}
//	                              <-  descriptors (Send), if ok
//	... takes them, serves, adopts the capture ...
//	ready                         ->
//	                                  stops accepting, closes its copies
//	                              <-  released
//
// Until "ready" the predecessor serves as before: a successor that dies or
// gives up on the way costs nothing.

// Version is the hand-over protocol's version.
const Version = 1

// Hello is what a successor says first.
type Hello struct {
	Version int `json:"version"`
	PID     int `json:"pid"`
	// Layout identifies the successor's BPF map layout, so that a
	// predecessor can tell an incompatible upgrade (docs/restart.md, 3.6).
	Layout string `json:"layout,omitempty"`
}

type answer struct {
	OK     bool   `json:"ok"`
	PID    int    `json:"pid"`
	Reason string `json:"reason,omitempty"`
}

type step struct {
	Ready    bool `json:"ready,omitempty"`
	Released bool `json:"released,omitempty"`
}

// ErrNoPredecessor: nothing serves the hand-over socket.
var ErrNoPredecessor = errors.New("no running smeshd to take over from")

// RefusedError is a predecessor's refusal.
type RefusedError struct{ Reason string }

func (e *RefusedError) Error() string { return "the running smeshd refused the hand-over: " + e.Reason }

// messageTimeout bounds each message of the exchange but the wait for
// "ready", which the caller bounds.
const messageTimeout = 5 * time.Second

func writeJSON(c *net.UnixConn, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	c.SetWriteDeadline(time.Now().Add(messageTimeout))
	_, err = c.Write(data)
	return err
}

func readJSON(c *net.UnixConn, v any, deadline time.Time) error {
	buf := make([]byte, 4096)
	c.SetReadDeadline(deadline)
	n, err := c.Read(buf)
	if err != nil {
		return err
	}
	if n == 0 {
		return errors.New("hand-over connection closed")
	}
	return json.Unmarshal(buf[:n], v)
}

// Server is the predecessor's end: the listening socket.
type Server struct {
	ln *net.UnixListener
}

// Listen opens the hand-over socket at path, for root only. A socket file
// left by a process that is gone is replaced; one that a live smeshd serves
// is not (ErrInUse).
func Listen(path string) (*Server, error) {
	if c, err := net.Dial("unixpacket", path); err == nil {
		c.Close()
		return nil, fmt.Errorf("%w: %s", ErrInUse, path)
	}
	os.Remove(path)
	old := unix.Umask(0o177)
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listening for a successor on %s: %w", path, err)
	}
	return &Server{ln: ln}, nil
}

// ErrInUse: another live smeshd serves the hand-over socket.
var ErrInUse = errors.New("a running smeshd serves the hand-over socket")

// Close stops listening and removes the socket file.
func (s *Server) Close() error { return s.ln.Close() }

// Request is one successor's hand-over, as the predecessor sees it.
type Request struct {
	Hello Hello
	conn  *net.UnixConn
}

// Accept waits for a successor and reads its hello.
func (s *Server) Accept(ctx context.Context) (*Request, error) {
	stop := context.AfterFunc(ctx, func() { s.ln.SetDeadline(time.Now()) })
	defer stop()
	for {
		c, err := s.ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, err
		}
		var h Hello
		if err := readJSON(c, &h, time.Now().Add(messageTimeout)); err != nil {
			c.Close()
			continue // not a successor that speaks
		}
		return &Request{Hello: h, conn: c}, nil
	}
}

// Refuse turns the successor away with reason.
func (r *Request) Refuse(reason string) error {
	defer r.conn.Close()
	return writeJSON(r.conn, answer{OK: false, PID: os.Getpid(), Reason: reason})
}

// Offer hands files over. The caller keeps its own copies until WaitReady
// returned nil: should the successor fail, it goes on serving with them.
func (r *Request) Offer(files map[string]*os.File) error {
	if err := writeJSON(r.conn, answer{OK: true, PID: os.Getpid()}); err != nil {
		r.conn.Close()
		return err
	}
	r.conn.SetWriteDeadline(time.Now().Add(messageTimeout))
	if err := Send(r.conn, files); err != nil {
		r.conn.Close()
		return err
	}
	return nil
}

// WaitReady waits until the successor serves. An error (the successor
// died, gave up, or ctx ended first) means the predecessor keeps serving.
func (r *Request) WaitReady(ctx context.Context) error {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Time{}
	}
	stop := context.AfterFunc(ctx, func() { r.conn.SetReadDeadline(time.Now()) })
	defer stop()
	var s step
	if err := readJSON(r.conn, &s, deadline); err != nil {
		r.conn.Close()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("the successor did not take over: %w", err)
	}
	if !s.Ready {
		r.conn.Close()
		return errors.New("the successor did not take over")
	}
	return nil
}

// Released tells the successor that the predecessor no longer accepts
// and has closed its copies, and ends the exchange.
func (r *Request) Released() error {
	defer r.conn.Close()
	return writeJSON(r.conn, step{Released: true})
}

// Session is the successor's end of one hand-over.
type Session struct {
	conn *net.UnixConn
	// PID is the predecessor's.
	PID int
	// Files are what it handed over, by name; the successor owns them.
	Files map[string]*os.File
}

// Dial asks the smeshd serving path to hand over. ErrNoPredecessor: none
// does (no socket, or one left by a process that is gone).
func Dial(ctx context.Context, path string, hello Hello) (*Session, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unixpacket", path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, ErrNoPredecessor
		}
		return nil, fmt.Errorf("reaching the running smeshd on %s: %w", path, err)
	}
	uc := c.(*net.UnixConn)
	if hello.Version == 0 {
		hello.Version = Version
	}
	if hello.PID == 0 {
		hello.PID = os.Getpid()
	}
	if err := writeJSON(uc, hello); err != nil {
		uc.Close()
		return nil, err
	}
	var a answer
	if err := readJSON(uc, &a, time.Now().Add(messageTimeout)); err != nil {
		uc.Close()
		return nil, fmt.Errorf("waiting for the running smeshd's answer: %w", err)
	}
	if !a.OK {
		uc.Close()
		return nil, &RefusedError{Reason: a.Reason}
	}
	uc.SetReadDeadline(time.Now().Add(messageTimeout))
	files, err := Receive(uc)
	if err != nil {
		uc.Close()
		return nil, err
	}
	uc.SetReadDeadline(time.Time{})
	return &Session{conn: uc, PID: a.PID, Files: files}, nil
}

// Ready says that the successor serves, and waits until the predecessor
// released (it no longer accepts).
func (s *Session) Ready(ctx context.Context) error {
	defer s.conn.Close()
	if err := writeJSON(s.conn, step{Ready: true}); err != nil {
		return err
	}
	deadline, _ := ctx.Deadline()
	stop := context.AfterFunc(ctx, func() { s.conn.SetReadDeadline(time.Now()) })
	defer stop()
	var st step
	if err := readJSON(s.conn, &st, deadline); err != nil {
		return fmt.Errorf("waiting for the running smeshd to release: %w", err)
	}
	if !st.Released {
		return errors.New("the running smeshd did not release")
	}
	return nil
}

// Abort ends the hand-over without taking over: the predecessor keeps
// serving. The files stay the caller's to close.
func (s *Session) Abort() { s.conn.Close() }
