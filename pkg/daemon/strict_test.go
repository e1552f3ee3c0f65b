package daemon

import (
	"errors"
	"strings"
	"testing"

	"github.com/smesh-dev/smesh/pkg/config"
)

// TestStrictRefusal: a strict workload where strict inbound cannot load is
// refused (fail closed), naming the workload and why; without strict
// workloads, or where it loads, nothing is refused.
func TestStrictRefusal(t *testing.T) {
	unavailable := errors.New("strict inbound is unavailable on this kernel: loading bpf/strict: verifier says no")
	strict := []config.ResolvedWorkload{{Cgroup: "/sys/fs/cgroup/smesh.slice/payments.service", Strict: true}}
	err := strictRefusal(strict, unavailable)
	if err == nil || !strings.Contains(err.Error(), "payments.service is strict = true") ||
		!errors.Is(err, unavailable) || !strings.Contains(err.Error(), "left open") {
		t.Errorf("strict workload, strict unavailable: %v, want a refusal naming the workload and the reason", err)
	}
	if err := strictRefusal(nil, unavailable); err != nil {
		t.Errorf("no strict workload, strict unavailable: %v, want none", err)
	}
	if err := strictRefusal(strict, nil); err != nil {
		t.Errorf("strict workload, strict available: %v, want none", err)
	}
}
