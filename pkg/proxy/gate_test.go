package proxy

import (
	"testing"
	"time"
)

func TestGate(t *testing.T) {
	var none *Gate
	if !none.Wait() {
		t.Error("a nil Gate holds back")
	}
	none.Cancel() // no panic
	if !NewGate(true).Wait() {
		t.Error("an open Gate holds back")
	}
	for _, open := range []bool{true, false} {
		g := NewGate(false)
		got := make(chan bool)
		go func() { got <- g.Wait() }()
		select {
		case <-got:
			t.Fatal("a closed Gate let a loop through")
		case <-time.After(50 * time.Millisecond):
		}
		if open {
			g.Open()
			g.Cancel() // too late: it opened
		} else {
			g.Cancel()
			g.Open() // too late: it was cancelled
		}
		if v := <-got; v != open {
			t.Errorf("Wait after %v = %v", map[bool]string{true: "Open", false: "Cancel"}[open], v)
		}
		if v := g.Wait(); v != open {
			t.Errorf("a later Wait = %v, want %v", v, open)
		}
	}
}
