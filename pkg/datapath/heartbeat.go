package datapath

import (
	"fmt"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/bpf/connect"
)

// HeartbeatInterval is how often a Heartbeat writes: restart_hold must
// leave room for a few beats.
const HeartbeatInterval = time.Second

// Heartbeat keeps smesh_heartbeat (capture.h) current: connect4/6 stop
// capturing (on_failure decides) once the beat is older than its hold,
// so a listener that outlives smeshd (pinned, or held by a successor or
// systemd's store) is not waited on for ever when no smeshd comes back.
// It writes through its own descriptor of the map, so it can be stopped
// after, or independently of, the Datapath's Release or Close.
type Heartbeat struct {
	log  zerolog.Logger
	m    *ebpf.Map
	mu   sync.Mutex
	hold time.Duration
	stop chan struct{}
	done chan struct{}
	once sync.Once
}

// StartHeartbeat writes the heartbeat once, with hold as the bound (0: no
// bound), then every HeartbeatInterval until Stop. Call it right after Load,
// before any namespace is marked ready and before SetCapture: adopted
// programs (a predecessor's, pinned ones of a smeshd that died) read the
// same map, and its last beat may be long stale.
func (d *Datapath) StartHeartbeat(hold time.Duration) (*Heartbeat, error) {
	m, err := d.connect.SmeshHeartbeat.Clone()
	if err != nil {
		return nil, fmt.Errorf("duplicating smesh_heartbeat: %w", err)
	}
	h := &Heartbeat{log: d.log, m: m, hold: hold, stop: make(chan struct{}), done: make(chan struct{})}
	if err := h.beat(); err != nil {
		m.Close()
		return nil, err
	}
	go h.run()
	return h, nil
}

func (h *Heartbeat) run() {
	defer close(h.done)
	t := time.NewTicker(HeartbeatInterval)
	defer t.Stop()
	failing := false
	for {
		select {
		case <-h.stop:
			return
		case <-t.C:
			// A failed write is logged once until one succeeds: the
			// beat grows stale, and after restart_hold capture
			// follows on_failure, which is what should happen to a
			// smeshd that cannot write its maps.
			if err := h.beat(); err != nil && !failing {
				h.log.Error().Err(err).Msg("writing the heartbeat")
				failing = true
			} else if err == nil {
				failing = false
			}
		}
	}
}

func (h *Heartbeat) beat() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return WriteHeartbeat(h.m, h.hold)
}

// Stop ends the beats and closes the Heartbeat's descriptor; the last
// beat stays in the map. Idempotent.
func (h *Heartbeat) Stop() {
	if h == nil {
		return
	}
	h.once.Do(func() {
		close(h.stop)
		<-h.done
		h.m.Close()
	})
}

// WriteHeartbeat writes the current time and hold into m, a smesh_heartbeat
// (connect4's, or the test harness's).
func WriteHeartbeat(m *ebpf.Map, hold time.Duration) error {
	now, err := MonotonicNow()
	if err != nil {
		return err
	}
	return writeHeartbeat(m, now, hold)
}

func writeHeartbeat(m *ebpf.Map, beat uint64, hold time.Duration) error {
	if hold < 0 {
		hold = 0
	}
	v := connect.ConnectHeartbeat{BeatNs: beat, HoldNs: uint64(hold)}
	if err := m.Update(uint32(0), &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("writing the heartbeat: %w", err)
	}
	return nil
}

// MonotonicNow is CLOCK_MONOTONIC in nanoseconds: bpf_ktime_get_ns's
// clock (bpf-helpers(7)), which Go's time package does not expose.
func MonotonicNow() (uint64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, fmt.Errorf("reading CLOCK_MONOTONIC: %w", err)
	}
	return uint64(ts.Nano()), nil
}
