package testenv_test

import (
	"errors"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// skipChildEnv tells TestSkipOrFailChild which helper to call; without it
// that test is the parent's helper and does nothing.
const skipChildEnv = "SMESH_TEST_SKIP_CHILD"

// TestSkipOrFailChild calls the skip helper named by skipChildEnv, in a
// test binary that TestSkipOrFail started. Neither helper may return.
func TestSkipOrFailChild(t *testing.T) {
	switch os.Getenv(skipChildEnv) {
	case "":
		return
	case "SkipOrFail":
		testenv.SkipOrFail(t, "test needs %s", "a unicorn")
	case "RequireCommand":
		testenv.RequireCommand(t, "smesh-no-such-command")
	}
	t.Error("the helper returned")
}

// TestSkipOrFail runs this test binary again to see what its skip helpers
// do to a whole run: a skip with the reason, and where skips are not allowed
// (SMESH_REQUIRE_PRIVILEGED=1, as in CI) a failure with the reason, never a
// green run that hides a test that did not run.
func TestSkipOrFail(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ helper, reason string }{
		{"SkipOrFail", "test needs a unicorn"},
		{"RequireCommand", "test needs the command smesh-no-such-command"},
	} {
		for _, require := range []string{"", "0", "1"} {
			cmd := exec.Command(exe, "-test.run=^TestSkipOrFailChild$", "-test.v", "-test.count=1")
			cmd.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool {
				return strings.HasPrefix(kv, testenv.RequirePrivilegedEnv+"=")
			})
			cmd.Env = append(cmd.Env, skipChildEnv+"="+c.helper)
			if require != "" {
				cmd.Env = append(cmd.Env, testenv.RequirePrivilegedEnv+"="+require)
			}
			out, err := cmd.CombinedOutput()
			code := 0
			var exit *exec.ExitError
			if errors.As(err, &exit) {
				code = exit.ExitCode()
			} else if err != nil {
				t.Fatalf("running %s: %v", exe, err)
			}
			what := c.helper + " with " + testenv.RequirePrivilegedEnv + "=" + require
			if require == "1" {
				if code != 1 || !strings.Contains(string(out), "--- FAIL: TestSkipOrFailChild") ||
					!strings.Contains(string(out), c.reason) ||
					!strings.Contains(string(out), "(failing instead of skipping: SMESH_REQUIRE_PRIVILEGED=1)") {
					t.Errorf("%s: exit status %d, want 1, a failure of the test with the reason %q and why it failed; output:\n%s",
						what, code, c.reason, out)
				}
				continue
			}
			if code != 0 || !strings.Contains(string(out), "--- SKIP: TestSkipOrFailChild") ||
				!strings.Contains(string(out), c.reason) || strings.Contains(string(out), "FAIL") {
				t.Errorf("%s: exit status %d, want 0 and a skip of the test with the reason %q; output:\n%s",
					what, code, c.reason, out)
			}
		}
	}
}
