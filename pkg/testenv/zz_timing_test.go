package testenv

import (
	"testing"
	"time"
)

func TestZZTiming(t *testing.T) {
	for i := 0; i < 8; i++ {
		var t0 time.Time
		t.Run("x", func(t *testing.T) {
			mark := func(s string) { t.Cleanup(func() { if d := time.Since(t0); d > 200*time.Millisecond { t.Logf("after %s cleanup: %v", s, d) } }) }
			mark("cgroup")
			cg := NewCgroup(t)
			mark("nodes")
			a := NewNode(t)
			b := NewNode(t)
			mark("link")
			Link(t, a, b)
			mark("proc")
			h := StartProcess(t, cg, a.Name, "true")
			h.Wait()
			t0 = time.Now()
		})
	}
}
