package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/smesh-dev/smesh/hack/internal/gotest"
)

// runAsMain makes the test binary run main (the real command) when a test
// re-executes it.
const runAsMain = "TESTSUMMARY_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runAsMain) == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// module is a small Go module whose tests pass, skip (with reasons, in a
// subtest too) and fail, for testsummary to run.
const module = `
-- go.mod --
module example.com/skippy

go 1.21
-- a_test.go --
package skippy

import "testing"

func TestPass(t *testing.T) { t.Log("fine") }

func TestNeedsRoot(t *testing.T) { t.Skip("kernel test needs root (running as euid 1000)") }

func TestNeedsRootToo(t *testing.T) { t.Log("setting up"); t.Skip("kernel test needs root (running as euid 1000)") }

func TestTools(t *testing.T) {
	t.Run("nginx", func(t *testing.T) { t.Skipf("test needs the command %s:\nnot in PATH", "nginx") })
	t.Run("plain", func(t *testing.T) {})
}

func TestFail(t *testing.T) { t.Error("bytes differ") }
-- notests/x.go --
package notests
`

// TestRealRun runs the command (this binary re-executed as main) on a
// module of its own: real go test, real JSON.
func TestRealRun(t *testing.T) {
	dir := t.TempDir()
	for _, f := range strings.Split(module, "-- ")[1:] {
		name, body, _ := strings.Cut(f, " --\n")
		path := filepath.Join(dir, name)
		os.MkdirAll(filepath.Dir(path), 0o755)
		if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) (string, int) {
		t.Helper()
		cmd := exec.Command(exe, args...)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), runAsMain+"=1", "GO="+goCommand(t), "GOFLAGS=", "GOWORK=off")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		var exit *exec.ExitError
		if err != nil && !errors.As(err, &exit) {
			t.Fatalf("testsummary %v: %v\n%s", args, err, stderr.String())
		}
		// Durations vary; nothing else does.
		return regexp.MustCompile(`\d+\.\d+s`).ReplaceAllString(string(out), "T"), cmd.ProcessState.ExitCode()
	}

	out, code := run("-count=1", "-run", "TestPass|TestNeedsRoot|TestTools", "./...")
	want := `ok  	example.com/skippy	T
?   	example.com/skippy/notests	[no test files]

SKIPPED: 3 of 6 tests did not run:
    2  kernel test needs root (running as euid 1000)
       skippy.TestNeedsRoot, skippy.TestNeedsRootToo
    1  test needs the command nginx: not in PATH
       skippy.TestTools/nginx
Kernel tests need root (sudo make test); ` + "`sudo make test-deps`" + ` installs the programs tests drive.
SMESH_REQUIRE_PRIVILEGED=1 (as in CI) makes these skips failures.
`
	if code != 0 || !sameLines(out, want) {
		t.Errorf("a run that skipped tests: exit status %d, output:\n%s\nwant exit status 0 and:\n%s", code, out, want)
	}

	out, code = run("-count=1", "-run", "TestPass|TestFail", ".")
	want = `    a_test.go:16: bytes differ
--- FAIL: TestFail (T)
FAIL
FAIL	example.com/skippy	T

2 tests ran, none skipped.
`
	if code != 1 || out != want {
		t.Errorf("a run with a failure: exit status %d, output:\n%s\nwant exit status 1 and:\n%s", code, out, want)
	}
}

// sameLines compares outputs whose package lines (before the summary) may
// come in any order.
func sameLines(a, b string) bool {
	headA, tailA, _ := strings.Cut(a, "\n\n")
	headB, tailB, _ := strings.Cut(b, "\n\n")
	la, lb := strings.Split(headA, "\n"), strings.Split(headB, "\n")
	slices.Sort(la)
	slices.Sort(lb)
	return slices.Equal(la, lb) && tailA == tailB
}

// goCommand is the go command that runs this test.
func goCommand(t *testing.T) string {
	g, err := gotest.Command()
	if err != nil {
		t.Fatal(err)
	}
	return g
}
