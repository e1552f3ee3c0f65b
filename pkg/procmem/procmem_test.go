package procmem

import "testing"

// TestOf: the calling process is resident, anonymous and file pages both
// (a Go binary), never more than its peak, and its parts add up to RSS.
func TestOf(t *testing.T) {
	m, err := Of(0)
	if err != nil {
		t.Fatal(err)
	}
	if m.Anon <= 0 || m.File <= 0 || m.RSS < m.Anon+m.File || m.Peak < m.RSS {
		t.Errorf("memory of this process: %+v", m)
	}
}
