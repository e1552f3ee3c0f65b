package hangup

import (
	"syscall"
	"testing"
	"time"
)

// TestCaughtFromInit: a SIGHUP that arrives before anyone asked for it
// (this test's process never calls Notify itself) is caught, not fatal:
// without the package's init the hangup would end this test binary.
func TestCaughtFromInit(t *testing.T) {
	if err := syscall.Kill(syscall.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	select {
	case <-Caught():
	case <-time.After(10 * time.Second):
		t.Fatal("SIGHUP not delivered to Caught")
	}
}
