package proxy

import (
	"errors"
	"os"
	"sync/atomic"
	"time"
)

// ErrIdle ends a relay whose connection moved nothing for the idle timeout
// (Result.Err).
var ErrIdle = errors.New("idle timeout")

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
	armed time.Time // when the read deadline was last set
	// park, when set, is a Parker relay's request to park: a read the
	// deadline interrupted returns errPark while it holds.
	park *atomic.Bool
	// readPooled reads the wrapped end into a pooled buffer (see
	// pooledReader), resolved once.
	readPooled func() (*[]byte, int, error)
}

// watch wraps c; idle nil or with no timeout (or a c without read
// deadlines) means no timeout. idle, when set, is touched by every read.
func watch(c Conn, count *atomic.Int64, idle *activity) *watched {
	w := &watched{Conn: c, count: count, readPooled: readPooled(c)}
	w.dl, _ = c.(deadliner)
	if idle != nil && (w.dl != nil || idle.timeout == 0) {
		w.idle = idle
	}
	return w
}

func (w *watched) Read(p []byte) (int, error) {
	return w.read(func() (int, error) { return w.Conn.Read(p) })
}

// ReadPooled is Read into a pooled buffer (see pooledReader).
func (w *watched) ReadPooled() (*[]byte, int, error) {
	var bp *[]byte
	n, err := w.read(func() (int, error) {
		var n int
		var err error
		bp, n, err = w.readPooled()
		return n, err
	})
	return bp, n, err
}

// read runs one read of the watched end (f), counting what it read and
// enforcing the idle timeout.
func (w *watched) read(f func() (int, error)) (int, error) {
	for {
		// Re-arming the deadline on every read would cost a timer update
		// per read; an eighth of the timeout late is close enough, and a
		// deadline that fires early is checked against idleFor below.
		if w.idle != nil && w.idle.timeout > 0 {
			if now := time.Now(); now.Sub(w.armed) > w.idle.timeout/8 {
				w.dl.SetReadDeadline(now.Add(w.idle.timeout))
				w.armed = now
			}
		}
		n, err := f()
		if n > 0 {
			w.count.Add(int64(n))
			if w.idle != nil {
				w.idle.touch()
			}
			return n, err
		}
		if w.park != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			if w.park.Load() {
				return 0, errPark
			}
			if w.idle == nil || w.idle.timeout == 0 {
				// A request to park withdrawn before this read saw its
				// deadline: the deadline is no one's.
				w.dl.SetReadDeadline(time.Time{})
				continue
			}
		}
		if w.idle != nil && w.idle.timeout > 0 && errors.Is(err, os.ErrDeadlineExceeded) {
			if w.idle.idleFor() < w.idle.timeout {
				// Something moved since the deadline was set: wait until
				// the timeout after that.
				last := time.Unix(0, w.idle.last.Load())
				w.dl.SetReadDeadline(last.Add(w.idle.timeout))
				w.armed = time.Now()
				continue
			}
			return 0, ErrIdle
		}
		return n, err
	}
}

// RelayIdle is Relay with an idle timeout: when neither direction moved a
// byte for idle, both ends are reset and Result.Err is ErrIdle. 0 is no
// timeout. Ends that cannot take a read deadline are never timed out.
func RelayIdle(a, b Conn, idle time.Duration) Result {
	return relayWait(a, b, RelayOptions{Idle: idle})
}
