package bench

import (
	"fmt"
	"io"

	"golang.org/x/sys/unix"
)

// progress tells the user what the bench is doing. On a terminal it keeps
// one status line, rewritten in place, as curl and iperf3 do. Anywhere else
// (a file, a pipe, a CI log) carriage returns and erase sequences would pile
// up into one unreadable line, so it writes a plain line when a phase
// starts and nothing for the steps within it.
type progress struct {
	w        io.Writer
	terminal bool
	phase    string
	dirty    bool // the terminal shows a status line that done clears
}

func newProgress(w io.Writer) *progress {
	return &progress{w: w, terminal: isTerminal(w)}
}

// update reports the step the bench is at: detail (a mode, a workload)
// within phase.
func (p *progress) update(phase, detail string) {
	if p.w == nil {
		return
	}
	if p.terminal {
		fmt.Fprintf(p.w, "\r\033[K%s: %s", phase, detail)
		p.dirty = true
		return
	}
	if phase != p.phase {
		fmt.Fprintf(p.w, "smeshd bench: %s\n", phase)
	}
	p.phase = phase
}

// done clears the status line, so that what is printed next (the table, an
// error) starts on a clean line. Calling it again does nothing.
func (p *progress) done() {
	if p.w != nil && p.dirty {
		fmt.Fprint(p.w, "\r\033[K")
		p.dirty = false
	}
}

// isTerminal reports whether w is a terminal (a tty or pty).
func isTerminal(w io.Writer) bool {
	f, ok := w.(interface{ Fd() uintptr })
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
