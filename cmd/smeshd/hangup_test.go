package main

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestHangupCaughtEarly: smeshd catches SIGHUP before the packages whose
// initialisation takes the time (Kubernetes' client, Prometheus, cilium/ebpf,
// smesh's own) run theirs: the window in which a reload asked for at start
// kills smeshd is what the Go runtime needs to start, not all of smeshd's
// initialisation (see package hangup). Read from the runtime's own trace of
// package initialisation (GODEBUG=inittrace=1).
func TestHangupCaughtEarly(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "version")
	cmd.Env = append(os.Environ(), asSmeshd+"=1", "GODEBUG=inittrace=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("smeshd version: %v\n%s", err, out)
	}
	const self = "github.com/smesh-dev/smesh/cmd/smeshd/internal/hangup"
	heavy := []string{"k8s.io/", "github.com/prometheus/", "github.com/cilium/", "github.com/smesh-dev/smesh/"}
	caught := false
	var before int
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "init" {
			continue
		}
		pkg := f[1]
		if pkg == self {
			caught = true
			break
		}
		before++
		for _, h := range heavy {
			if strings.HasPrefix(pkg, h) {
				t.Errorf("%s initialised before SIGHUP is caught (%s)", pkg, self)
			}
		}
	}
	if !caught {
		t.Fatalf("no init of %s in the trace:\n%s", self, out)
	}
	t.Logf("SIGHUP caught after %d packages' initialisation", before)
}
