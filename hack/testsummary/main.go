// Command testsummary is `make test`: it runs `go test -json` with its
// arguments, prints what plain `go test` prints (a line per package, the
// output of failed tests, build errors), and ends with a summary that says
// how many tests were skipped and why.
//
// smesh's kernel tests skip without root, and the tests that drive real
// programs (nginx, iperf3, curl, ...) skip where those are not installed. A
// plain `go test ./...` then ends in a column of "ok" that hides it: the
// summary makes a run that skipped tests say so. (With
// SMESH_REQUIRE_PRIVILEGED=1, as CI runs, those skips are failures instead.)
//
// Usage: testsummary [go test flags] [packages]. The go command is $GO, or
// go from PATH. The exit status is go test's.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strings"
	"syscall"

	"github.com/smesh-dev/smesh/hack/internal/gotest"
)

func main() {
	goCmd := os.Getenv("GO")
	if goCmd == "" {
		goCmd = "go"
	}
	cmd := exec.Command(goCmd, append([]string{"test", "-json"}, os.Args[1:]...)...)
	cmd.Stdin, cmd.Stderr = os.Stdin, os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		fatal(err)
	}
	if err := cmd.Start(); err != nil {
		fatal(err)
	}
	// Ctrl-C reaches go test through the terminal's process group; this
	// process stays to print the summary of what ran. SIGTERM is passed on.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		for s := range sigs {
			if s == syscall.SIGTERM {
				cmd.Process.Signal(s)
			}
		}
	}()

	s := newSummary(os.Stdout)
	readErr := s.read(stdout)
	waitErr := cmd.Wait()
	s.print()
	if readErr != nil {
		fatal(readErr)
	}
	var exit *exec.ExitError
	if errors.As(waitErr, &exit) {
		os.Exit(exit.ExitCode())
	}
	if waitErr != nil {
		fatal(waitErr)
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "testsummary:", err)
	os.Exit(2)
}

// event is one line of `go test -json` (cmd/test2json), with the build
// events of Go 1.24 and later.
type event struct {
	Action     string
	Package    string
	Test       string
	Output     string
	ImportPath string // build-output
}

// summary renders a `go test -json` stream as plain go test output and
// collects the skipped tests.
type summary struct {
	out     io.Writer
	pending map[string][]string // output of tests still running, by package and test
	ran     int                 // tests and subtests that passed, failed or skipped
	failed  int
	skipped []skip
}

type skip struct {
	pkg, test, reason string
}

func newSummary(out io.Writer) *summary {
	return &summary{out: out, pending: make(map[string][]string)}
}

func (s *summary) read(r io.Reader) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		var ev event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil || ev.Action == "" {
			// Not an event (go vet, a stray print): pass it on.
			fmt.Fprintln(s.out, sc.Text())
			continue
		}
		s.event(ev)
	}
	return sc.Err()
}

func (s *summary) event(ev event) {
	key := ev.Package + " " + ev.Test
	switch {
	case ev.Action == "build-output":
		fmt.Fprint(s.out, ev.Output)
	case ev.Test == "":
		// Package level: "ok  pkg 1.2s", "FAIL pkg", "? pkg [no test
		// files]", panics outside tests. Plain go test prints no PASS.
		if ev.Action == "output" && ev.Output != "PASS\n" {
			fmt.Fprint(s.out, ev.Output)
		}
	case ev.Action == "output":
		s.pending[key] = append(s.pending[key], ev.Output)
	case ev.Action == "pass" || ev.Action == "fail" || ev.Action == "skip":
		lines := s.pending[key]
		delete(s.pending, key)
		s.ran++
		switch ev.Action {
		case "fail":
			s.failed++
			for _, l := range lines {
				if !strings.HasPrefix(l, "=== ") {
					fmt.Fprint(s.out, l)
				}
			}
		case "skip":
			s.skipped = append(s.skipped, skip{ev.Package, ev.Test, gotest.SkipReason(lines)})
		}
	}
}

// maxNames bounds the test names listed under one reason.
const maxNames = 6

// print writes the summary: how many tests ran and, when some were
// skipped, how many for each reason and which.
func (s *summary) print() {
	if s.ran == 0 {
		return
	}
	fmt.Fprintln(s.out)
	if len(s.skipped) == 0 {
		fmt.Fprintf(s.out, "%s ran, none skipped.\n", plural(s.ran, "test"))
		return
	}
	fmt.Fprintf(s.out, "SKIPPED: %d of %s did not run:\n", len(s.skipped), plural(s.ran, "test"))
	byReason := make(map[string][]skip)
	var reasons []string
	for _, sk := range s.skipped {
		if _, ok := byReason[sk.reason]; !ok {
			reasons = append(reasons, sk.reason)
		}
		byReason[sk.reason] = append(byReason[sk.reason], sk)
	}
	// Most frequent first; ties in the order they were met.
	slices.SortStableFunc(reasons, func(a, b string) int { return len(byReason[b]) - len(byReason[a]) })
	for _, r := range reasons {
		sks := byReason[r]
		fmt.Fprintf(s.out, "%5d  %s\n", len(sks), r)
		var names []string
		for i, sk := range sks {
			if i == maxNames {
				names = append(names, fmt.Sprintf("and %d more", len(sks)-maxNames))
				break
			}
			names = append(names, shortPkg(sk.pkg)+"."+sk.test)
		}
		fmt.Fprintf(s.out, "       %s\n", strings.Join(names, ", "))
	}
	fmt.Fprintln(s.out, "Kernel tests need root (sudo make test); `sudo make test-deps` installs the programs tests drive.")
	fmt.Fprintln(s.out, "SMESH_REQUIRE_PRIVILEGED=1 (as in CI) makes these skips failures.")
}

// shortPkg is the last element of an import path: "e2e", "tunnel".
func shortPkg(p string) string {
	return p[strings.LastIndex(p, "/")+1:]
}

func plural(n int, word string) string {
	if n == 1 {
		return "1 " + word
	}
	return fmt.Sprintf("%d %ss", n, word)
}
