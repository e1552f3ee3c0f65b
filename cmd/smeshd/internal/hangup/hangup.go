// Package hangup catches SIGHUP as early as a Go program can: in its
// package initialisation, before the other packages smeshd links in
// initialise (some 240, several milliseconds, longer on a loaded node).
// Until a program asks for SIGHUP, Go's runtime treats it as its default
// action does: the process ends (exit status 129). smeshd is reloaded with
// SIGHUP, so a reload asked for while it starts would otherwise kill it.
//
// Go cannot close the window entirely: from exec until the runtime installs
// its signal handlers SIGHUP still takes its default action, and so it does
// until this package's init runs (Go initialises packages in dependency
// order, then by import path; this one imports only os/signal and syscall,
// whose own initialisation comes first). See TestHangupCaughtEarly (cmd/smeshd) for how short
// what is left is.
package hangup

import (
	"os"
	"os/signal"
	"syscall"
)

// caught holds the SIGHUPs that arrive from initialisation on; main takes
// them over with Caught. Written once, here.
var caught = make(chan os.Signal, 1)

func init() {
	signal.Notify(caught, syscall.SIGHUP)
}

// Caught returns the channel SIGHUPs are delivered to (one is kept while
// nobody reads). Release gives SIGHUP its default action back, for commands
// that a hangup should end.
func Caught() <-chan os.Signal { return caught }

// Release stops catching SIGHUP: a hangup ends the process again.
func Release() { signal.Stop(caught) }
