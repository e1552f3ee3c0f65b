// Package gotest reads what `go test -v` prints, for the commands in hack/
// that summarise test runs (testsummary, kerneltest).
package gotest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
)

// logLine is the start of a t.Log, t.Skip or t.Error line: "    file.go:12: ".
var logLine = regexp.MustCompile(`^\s*[^\s:]+\.go:\d+: `)

// SkipReason is the last message a test logged before it was skipped, given
// its output lines: what t.Skip was given (continuation lines joined).
func SkipReason(lines []string) string {
	var msgs []string
	for _, l := range lines {
		l = strings.TrimRight(l, "\n")
		switch {
		case strings.HasPrefix(strings.TrimSpace(l), "--- "), strings.HasPrefix(l, "=== "):
		case logLine.MatchString(l):
			msgs = append(msgs, logLine.ReplaceAllString(l, ""))
		case len(msgs) > 0 && strings.TrimSpace(l) != "":
			msgs[len(msgs)-1] += " " + strings.TrimSpace(l)
		}
	}
	if len(msgs) == 0 {
		return "(no reason given)"
	}
	return msgs[len(msgs)-1]
}

// Command is the go command to run: $GO, else go in PATH, else the one of
// the Go installation this program was built with.
func Command() (string, error) {
	if g := os.Getenv("GO"); g != "" {
		return g, nil
	}
	if g, err := exec.LookPath("go"); err == nil {
		return g, nil
	}
	g := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(g); err != nil {
		return "", fmt.Errorf("no go command: not in $GO, not in PATH, not in %s", g)
	}
	return g, nil
}
