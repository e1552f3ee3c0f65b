package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/smesh-dev/smesh/hack/internal/gotest"
)

// marker starts the lines init.sh frames the guest's steps with.
const marker = "@@kerneltest "

// guestRun is what came back from the guest.
type guestRun struct {
	kernel string  // uname -r in the guest
	boot   float64 // guest uptime when init started, seconds
	done   float64 // guest uptime at the end, 0 when it never got there
	errors []string
	steps  []*stepRun
}

// stepRun is one step: smeshd check or a test binary.
type stepRun struct {
	name   string
	output []string
	ended  bool
	rc     int
	uptime float64 // guest uptime when the step ended
	tests  []*testResult
}

// testResult is one test or subtest, as test2json reported it.
type testResult struct {
	name    string
	action  string // pass, fail, skip; "" if it never ended
	elapsed float64
	output  []string
}

// topLevelResult is a result line as the guest prints it, after
// test2json's ^V framing byte: --- PASS: TestX/sub (1.00s). Progress shows
// top-level tests, and failed subtests.
var topLevelResult = regexp.MustCompile(`^\x16?--- (PASS|FAIL|SKIP): (\S+) \(([\d.]+)s\)$`)

// collector builds a run from the guest's lines, telling progress as it
// goes.
type collector struct {
	run      guestRun
	cur      *stepRun
	progress func(string, ...any)
}

func (c *collector) line(l string) {
	if rest, ok := strings.CutPrefix(l, marker); ok {
		c.event(strings.Fields(rest))
		return
	}
	if c.cur == nil {
		if strings.TrimSpace(l) != "" {
			c.run.errors = append(c.run.errors, "guest: "+l)
		}
		return
	}
	c.cur.output = append(c.cur.output, l)
	if m := topLevelResult.FindStringSubmatch(l); m != nil && (!strings.Contains(m[2], "/") || m[1] == "FAIL") {
		c.progress("%-4s %s.%s (%ss)", m[1], c.cur.name, m[2], m[3])
	}
}

func (c *collector) event(f []string) {
	if len(f) == 0 {
		return
	}
	arg := func(i int) string {
		if i < len(f) {
			return f[i]
		}
		return ""
	}
	switch f[0] {
	case "boot":
		c.run.boot, _ = strconv.ParseFloat(arg(1), 64)
	case "kernel":
		c.run.kernel = arg(1)
		c.progress("guest up: Linux %s, init started %.1fs after boot", c.run.kernel, c.run.boot)
	case "error":
		c.run.errors = append(c.run.errors, "guest: "+strings.Join(f[1:], " "))
	case "begin":
		c.cur = &stepRun{name: arg(1)}
		c.run.steps = append(c.run.steps, c.cur)
		c.progress("running %s", c.cur.name)
	case "end":
		if c.cur == nil || c.cur.name != arg(1) {
			c.run.errors = append(c.run.errors, "guest: unexpected end of "+arg(1))
			return
		}
		c.cur.ended = true
		c.cur.rc, _ = strconv.Atoi(arg(2))
		c.cur.uptime, _ = strconv.ParseFloat(arg(3), 64)
		c.cur = nil
	case "done":
		c.run.done, _ = strconv.ParseFloat(arg(1), 64)
	}
}

// event is one line of test2json's output.
type event struct {
	Action  string
	Test    string
	Output  string
	Elapsed float64
}

// parseTests runs each test step's output through test2json (`go tool
// test2json`: the testing package's -test.v=test2json framing is its
// input) and keeps the results.
func (r *guestRun) parseTests(ctx context.Context, goBin string) error {
	for _, s := range r.steps {
		if s.name == "check" {
			continue
		}
		cmd := exec.CommandContext(ctx, goBin, "tool", "test2json", "-p", s.name)
		cmd.Stdin = strings.NewReader(strings.Join(s.output, "\n") + "\n")
		out, err := cmd.Output()
		if err != nil {
			return fmt.Errorf("go tool test2json: %w", exitDetail(err))
		}
		s.tests = decodeEvents(bytes.NewReader(out))
		// test2json leaves Elapsed out of the events of a stream in
		// this framing: take it from the result lines themselves.
		elapsed := map[string]float64{}
		for _, l := range s.output {
			if m := anyResult.FindStringSubmatch(l); m != nil {
				elapsed[m[2]], _ = strconv.ParseFloat(m[3], 64)
			}
		}
		for _, t := range s.tests {
			if e, ok := elapsed[t.name]; ok && t.elapsed == 0 {
				t.elapsed = e
			}
		}
	}
	return nil
}

// anyResult is the result line of a test or subtest, at any depth.
var anyResult = regexp.MustCompile(`^\x16?\s*--- (PASS|FAIL|SKIP): (\S+) \(([\d.]+)s\)$`)

func decodeEvents(r io.Reader) []*testResult {
	var order []*testResult
	byName := map[string]*testResult{}
	dec := json.NewDecoder(r)
	for {
		var ev event
		if err := dec.Decode(&ev); err != nil {
			break
		}
		if ev.Test == "" {
			continue
		}
		t := byName[ev.Test]
		if t == nil {
			t = &testResult{name: ev.Test}
			byName[ev.Test] = t
			order = append(order, t)
		}
		switch ev.Action {
		case "output":
			t.output = append(t.output, strings.TrimRight(ev.Output, "\n"))
		case "pass", "fail", "skip":
			t.action, t.elapsed = ev.Action, ev.Elapsed
		}
	}
	return order
}

// verdict is what the report says of one top-level test.
type verdict struct {
	step, test string
	status     string // PASS, FAIL, NOT RUN, N/A
	elapsed    float64
	detail     []string // why: failed subtests and their output, skip reasons
	subtests   int
}

// needsCommand is the skip reason of testenv.RequireCommand.
var needsCommand = regexp.MustCompile(`^test needs the command (\S+)`)

// kernelCannotBound starts the skip reason of a test that needs bounded
// splice on a kernel without it (e2e's requireBoundedSplice).
const kernelCannotBound = "this kernel cannot bound spliced queues"

// judge turns the run into verdicts. Skips are failures unless the guest
// lacks the program the test drives (listed as not run, by name) or the
// test needs bounded splice and smeshd check in the same guest found it
// missing (not applicable). boundedMissing says what check found; left
// are the tests the plan left out, by step, with why (listed as not
// selected); filtered says the plan ran only some tests (-run), so a
// binary may run none.
func (r *guestRun) judge(boundedMissing bool, left map[string]map[string]string, filtered bool) []verdict {
	var vs []verdict
	for _, s := range r.steps {
		if s.name == "check" {
			continue
		}
		tops := map[string]*verdict{}
		var order []string
		for _, t := range s.tests {
			top, _, isSub := strings.Cut(t.name, "/")
			v := tops[top]
			if v == nil {
				v = &verdict{step: s.name, test: top, status: "PASS"}
				tops[top] = v
				order = append(order, top)
			}
			if isSub {
				v.subtests++
			} else {
				v.elapsed = t.elapsed
			}
			switch t.action {
			case "fail":
				// A parent's own output often holds the reason its
				// subtest failed (t.Fatal on the parent from inside it).
				v.status = "FAIL"
				if out := testOutput(t.output); len(out) > 0 || !hasFailedChild(s.tests, t.name) {
					v.detail = append(v.detail, "--- FAIL: "+t.name)
					v.detail = append(v.detail, out...)
				}
			case "skip":
				reason := gotest.SkipReason(t.output)
				switch m := needsCommand.FindStringSubmatch(reason); {
				case m != nil:
					if v.status == "PASS" {
						v.status = "NOT RUN"
					}
					v.detail = append(v.detail, fmt.Sprintf("%s: the guest has no %s", t.name, m[1]))
				case strings.HasPrefix(reason, kernelCannotBound) && boundedMissing:
					if v.status == "PASS" {
						v.status = "N/A"
					}
					v.detail = append(v.detail, fmt.Sprintf("%s: %s", t.name, reason))
				default:
					v.status = "FAIL"
					v.detail = append(v.detail, fmt.Sprintf("%s: skipped, which a kernel test must not be here: %s", t.name, reason))
				}
			case "":
				v.status = "FAIL"
				v.detail = append(v.detail, t.name+": never finished (the binary crashed or timed out)")
			}
		}
		for _, name := range order {
			vs = append(vs, *tops[name])
		}
		for _, name := range slices.Sorted(maps.Keys(left[s.name])) {
			if !filtered {
				vs = append(vs, verdict{step: s.name, test: name, status: "NOT SEL", detail: []string{left[s.name][name]}})
			}
		}
		// A binary that failed without a failed test: a panic, a
		// timeout, a crashed guest.
		failedTest := slices.ContainsFunc(s.tests, func(t *testResult) bool { return t.action == "fail" || t.action == "" })
		switch {
		case !s.ended:
			vs = append(vs, verdict{step: s.name, test: "(binary)", status: "FAIL",
				detail: append([]string{"the guest stopped while it ran; its last lines:"}, tail(s.output, 30)...)})
		case s.rc != 0 && !failedTest:
			vs = append(vs, verdict{step: s.name, test: "(binary)", status: "FAIL",
				detail: append([]string{fmt.Sprintf("exit status %d; its last lines:", s.rc)}, tail(s.output, 30)...)})
		case len(s.tests) == 0 && !filtered:
			vs = append(vs, verdict{step: s.name, test: "(binary)", status: "FAIL", detail: []string{"ran no test"}})
		}
	}
	return vs
}

func hasFailedChild(tests []*testResult, name string) bool {
	return slices.ContainsFunc(tests, func(t *testResult) bool {
		return t.action == "fail" && strings.HasPrefix(t.name, name+"/")
	})
}

// testOutput is a failed test's output without test2json's framing lines
// and without smeshd's debug log lines, which testenv prints for every
// process of a failed test (results.log keeps them).
func testOutput(lines []string) []string {
	var out []string
	for _, l := range lines {
		t := strings.TrimSpace(l)
		if strings.HasPrefix(t, "=== ") || strings.HasPrefix(t, "--- ") || strings.Contains(t, `"level":"debug"`) {
			continue
		}
		out = append(out, "    "+l)
	}
	// The reason comes first (t.Fatal), the processes' output after it.
	if len(out) > 60 {
		out = slices.Concat(out[:45], []string{fmt.Sprintf("    (%d more lines: results.log has them)", len(out)-60)}, out[len(out)-15:])
	}
	return out
}

func tail(lines []string, n int) []string {
	if len(lines) > n {
		return append([]string{fmt.Sprintf("    (%d lines before)", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return lines
}

// kernelTrouble are console lines that say the kernel itself went wrong.
var kernelTrouble = regexp.MustCompile(`\] (BUG|WARNING|Oops|Kernel panic|general protection fault|Call Trace|UBSAN|KASAN|kernel BUG)`)

// consoleTrouble returns the lines of the kernel's console that report a
// kernel bug, warning or panic.
func consoleTrouble(console []byte) []string {
	var out []string
	for l := range strings.Lines(string(console)) {
		if kernelTrouble.MatchString(l) {
			out = append(out, strings.TrimRight(l, "\r\n"))
		}
	}
	return out
}
