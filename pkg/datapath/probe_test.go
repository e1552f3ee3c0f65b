package datapath

import (
	"errors"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// TestExplainLoadError: only a kernel that does not know the helper is
// below the floor; any other refusal of a program that calls it (all of
// smesh's do) is reported as what it is.
func TestExplainLoadError(t *testing.T) {
	verifier := func(lines ...string) error {
		return &ebpf.VerifierError{Cause: unix.EINVAL, Log: lines}
	}
	cases := []struct {
		name  string
		err   error
		floor bool
	}{
		{"helper unknown (5.10 sock_ops)", verifier("10: (85) call bpf_get_netns_cookie#122", "unknown func bpf_get_netns_cookie#122"), true},
		{"refused for another reason", verifier("10: (85) call bpf_get_netns_cookie#122", "126: (0f) r3 += r2",
			"R3 has pointer with unsupported alu operation, pointer arithmetic with it prohibited for !root"), false},
		{"not a verifier error", unix.EPERM, false},
	}
	for _, c := range cases {
		if got := errors.Is(explainLoadError(c.err), ErrBelowFloor); got != c.floor {
			t.Errorf("%s: below the floor = %v, want %v", c.name, got, c.floor)
		}
	}
}
