package datapath

import (
	"testing"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// TestRedirectedBytesCharged runs the behavioural half of
// probeQueueVisible, which Probe skips on kernels with psock->msg_tot_len:
// since Linux 6.13 (and the stable updates 6.1.123, 6.6.69, 6.12.y)
// redirected bytes count in the receiver's sk_rmem_alloc. make kernel-test
// runs it on Debian 12's 6.1, which has no msg_tot_len.
func TestRedirectedBytesCharged(t *testing.T) {
	testenv.RequirePrivileged(t)
	charged, err := redirectedBytesCharged()
	if err != nil {
		t.Fatal(err)
	}
	field, err := hasMsgTotLen()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Linux %s: redirected bytes charged to the receiver: %v; psock->msg_tot_len: %v", KernelRelease(), charged, field)
	if visible := probeQueueVisible() == nil; visible != (charged || field) {
		t.Errorf("probeQueueVisible says the queue is visible: %v, want %v", visible, charged || field)
	}
}
