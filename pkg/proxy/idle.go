package proxy

import (
	"errors"
	"os"
	"sync/atomic"
	"time"
)

// errIdle ends a relay whose connection moved nothing for the idle timeout.
var errIdle = errors.New("idle timeout")

// activity is when either direction of one relayed connection last moved a
// byte. A direction waiting for data is not idle while the other one moves:
// a long download has a silent upload side.
type activity struct {
	timeout time.Duration
	last    atomic.Int64 // unix nanoseconds
}

func (a *activity) touch() { a.last.Store(time.Now().UnixNano()) }

func (a *activity) idleFor() time.Duration { return time.Since(time.Unix(0, a.last.Load())) }

// deadliner is what the idle timeout needs of a connection.
type deadliner interface{ SetReadDeadline(time.Time) error }

// watched counts what is read from a relay end and enforces the idle
// timeout on it.
type watched struct {
	Conn
	count *atomic.Int64
	idle  *activity // nil: no timeout
	dl    deadliner
}

// watch wraps c; idle nil (or a c without read deadlines) means no timeout.
func watch(c Conn, count *atomic.Int64, idle *activity) Conn {
	w := &watched{Conn: c, count: count}
	if dl, ok := c.(deadliner); ok && idle != nil {
		w.idle, w.dl = idle, dl
	}
	return w
}

func (w *watched) Read(p []byte) (int, error) {
	for {
		if w.idle != nil {
			w.dl.SetReadDeadline(time.Now().Add(w.idle.timeout))
		}
		n, err := w.Conn.Read(p)
		if n > 0 {
			w.count.Add(int64(n))
			if w.idle != nil {
				w.idle.touch()
			}
			return n, err
		}
		if w.idle != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			if w.idle.idleFor() < w.idle.timeout {
				continue // the other direction moved: not idle
			}
			return 0, errIdle
		}
		return n, err
	}
}
