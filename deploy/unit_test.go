package deploy

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

const (
	unitFile  = "smeshd.service"
	sliceFile = "smesh.slice"
	// binary is where the unit expects smeshd, and what verifyUnit swaps
	// for a stub.
	binary    = "/usr/local/bin/smeshd"
	execStart = "ExecStart=" + binary + " -c /etc/smesh/smesh.toml"
)

func readUnit(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func TestUnitVerifies(t *testing.T) {
	sa := testenv.RequireCommand(t, "systemd-analyze")
	unit := readUnit(t)
	if !strings.Contains(unit, "\n"+execStart+"\n") {
		t.Errorf("%s does not start smeshd with %q", unitFile, execStart)
	}
	if out, err := verifyUnit(t, sa, unit); err != nil {
		t.Errorf("systemd-analyze verify %s: %v\n%s", unitFile, err, out)
	}
}

// TestSliceVerifies: smesh.slice, which smeshd.service wants, is a valid
// slice unit.
func TestSliceVerifies(t *testing.T) {
	sa := testenv.RequireCommand(t, "systemd-analyze")
	slice, err := os.ReadFile(sliceFile)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), sliceFile)
	if err := os.WriteFile(path, slice, 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(sa, "verify", "--man=no", "--generators=no", "--recursive-errors=no", path)
	cmd.Env = append(os.Environ(), "SYSTEMD_COLORS=0", "SYSTEMD_PAGER=cat")
	out, err := cmd.CombinedOutput()
	if err != nil || strings.Contains(string(out), sliceFile) {
		t.Errorf("systemd-analyze verify %s: %v\n%s", sliceFile, err, out)
	}
	if !strings.Contains(readUnit(t), "\nWants=smesh.slice\nAfter=smesh.slice\n") {
		t.Errorf("%s does not want and come after %s", unitFile, sliceFile)
	}
}

// TestVerifyCatchesBrokenUnits proves that TestUnitVerifies would notice a
// broken unit. (Not a misspelt capability: systemd drops unknown capability
// names without a word, which is why TestUnitPrivileges pins the sets.)
func TestVerifyCatchesBrokenUnits(t *testing.T) {
	sa := testenv.RequireCommand(t, "systemd-analyze")
	unit := readUnit(t)
	for _, tc := range []struct {
		name, from, to string
	}{
		{"misspelt key", "\nRestartSec=", "\nRestartSecs="},
		{"bad value", "Restart=on-failure", "Restart=sometimes"},
		{"unknown system call", "@system-service bpf", "@system-service bpff"},
		{"no ExecStart", execStart + "\n", ""},
		{"missing binary", execStart, "ExecStart=/nonexistent/smeshd"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			broken := strings.Replace(unit, tc.from, tc.to, 1)
			if broken == unit {
				t.Fatalf("%q does not occur in %s", tc.from, unitFile)
			}
			out, err := verifyUnit(t, sa, broken)
			if err == nil {
				t.Fatalf("verification passed a unit with %q replaced by %q", tc.from, tc.to)
			}
			t.Logf("rejected as expected: %v\n%s", err, out)
		})
	}
}

// wantCaps is the whole of smeshd's privilege; smeshd.service says why.
var wantCaps = []string{"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"}

// TestUnitPrivileges pins the capabilities and the settings smeshd cannot
// run without, so that hardening the unit further cannot quietly break it.
func TestUnitPrivileges(t *testing.T) {
	unit := readUnit(t)
	if err := checkPrivileges(serviceSettings(unit)); err != nil {
		t.Error(err)
	}
	// A typo in a capability name must not slip through.
	typo := strings.Replace(unit, "CapabilityBoundingSet=CAP_BPF", "CapabilityBoundingSet=CAP_BFP", 1)
	if typo == unit {
		t.Fatal("CapabilityBoundingSet does not start with CAP_BPF")
	}
	if checkPrivileges(serviceSettings(typo)) == nil {
		t.Error("checkPrivileges accepted CAP_BFP")
	}
}

func checkPrivileges(settings map[string][]string) error {
	var errs []error
	for _, key := range []string{"CapabilityBoundingSet", "AmbientCapabilities"} {
		got := strings.Fields(strings.Join(settings[key], " "))
		slices.Sort(got)
		if !slices.Equal(got, wantCaps) {
			errs = append(errs, fmt.Errorf("%s = %v, want %v", key, got, wantCaps))
		}
	}
	// bpf(2) is not in @system-service.
	if filter := strings.Fields(strings.Join(settings["SystemCallFilter"], " ")); !slices.Contains(filter, "bpf") {
		errs = append(errs, fmt.Errorf("SystemCallFilter = %v does not allow bpf", filter))
	}
	// on_failure = "closed" pins in /sys/fs/bpf.
	if v := settings["ProtectKernelTunables"]; len(v) > 0 && v[len(v)-1] != "no" {
		errs = append(errs, fmt.Errorf("ProtectKernelTunables=%s makes /sys/fs/bpf read-only", v[len(v)-1]))
	}
	if rw := strings.Fields(strings.Join(settings["ReadWritePaths"], " ")); !slices.Contains(rw, "-/sys/fs/bpf") {
		errs = append(errs, fmt.Errorf("ReadWritePaths = %v does not include -/sys/fs/bpf", rw))
	}
	// systemd owns the cgroup tree: smeshd must not write to it.
	if v := settings["ProtectControlGroups"]; len(v) == 0 || v[len(v)-1] != "yes" {
		errs = append(errs, fmt.Errorf("ProtectControlGroups = %v, want yes: smeshd only reads the cgroup tree systemd owns", v))
	}
	return errors.Join(errs...)
}

// serviceSettings returns the values of each key in the [Service] section,
// in order. (smeshd.service uses no line continuations.)
func serviceSettings(unit string) map[string][]string {
	settings := make(map[string][]string)
	section := ""
	for line := range strings.Lines(unit) {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[':
			section = line
		case section == "[Service]":
			if k, v, ok := strings.Cut(line, "="); ok {
				settings[strings.TrimSpace(k)] = append(settings[strings.TrimSpace(k)], strings.TrimSpace(v))
			}
		}
	}
	return settings
}

// verifyUnit runs `systemd-analyze verify` on a copy of unit. verify insists
// that ExecStart's program exists, so the copy runs a stub in place of
// /usr/local/bin/smeshd. Any diagnostic about the unit is an error: most
// mistakes (unknown keys, unparsable values) are logged as "..., ignoring"
// while systemd-analyze exits 0. It returns what systemd-analyze printed.
func verifyUnit(t *testing.T, sa, unit string) (string, error) {
	t.Helper()
	dir := t.TempDir()
	stub := filepath.Join(dir, "smeshd")
	if err := os.WriteFile(stub, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, unitFile)
	if err := os.WriteFile(path, []byte(strings.ReplaceAll(unit, binary, stub)), 0o644); err != nil {
		t.Fatal(err)
	}

	// --man=no: Documentation= is a URL, not a man page, and CI images
	// ship without man. --recursive-errors=no: the host's own units
	// (network-online.target, ...) are not under test.
	cmd := exec.Command(sa, "verify", "--man=no", "--generators=no", "--recursive-errors=no", path)
	cmd.Env = append(os.Environ(), "SYSTEMD_COLORS=0", "SYSTEMD_PAGER=cat")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("exit status: %w", err)
	}
	// Ignore what the host's units may log while being loaded as
	// dependencies; every line about this unit names its file or unit.
	var about []string
	for line := range strings.Lines(string(out)) {
		if strings.Contains(line, unitFile) || strings.Contains(line, dir) {
			about = append(about, strings.TrimSpace(line))
		}
	}
	if len(about) > 0 {
		return string(out), errors.New(strings.Join(about, "; "))
	}
	if len(bytes.TrimSpace(out)) > 0 {
		t.Logf("systemd-analyze verify, about other units:\n%s", out)
	}
	return string(out), nil
}
