package gotest

import "testing"

func TestSkipReason(t *testing.T) {
	for _, c := range []struct {
		lines []string
		want  string
	}{
		{[]string{"=== RUN   TestA\n", "    env.go:61: kernel test needs root (running as euid 1000)\n", "--- SKIP: TestA (0.00s)\n"},
			"kernel test needs root (running as euid 1000)"},
		// The last message is the one t.Skip logged; a multi-line one is
		// joined.
		{[]string{"=== RUN   TestB\n", "    b_test.go:5: starting\n", "    b_test.go:9: needs nginx:\n", "        not in PATH\n", "--- SKIP: TestB (0.00s)\n"},
			"needs nginx: not in PATH"},
		{[]string{"=== RUN   TestC/sub\n", "        c_test.go:3: sub reason\n", "    --- SKIP: TestC/sub (0.00s)\n"},
			"sub reason"},
		{[]string{"=== RUN   TestD\n", "--- SKIP: TestD (0.00s)\n"}, "(no reason given)"},
	} {
		if got := SkipReason(c.lines); got != c.want {
			t.Errorf("SkipReason(%q) = %q, want %q", c.lines, got, c.want)
		}
	}
}
