package daemon

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// The control socket makes a reload synchronous: `smeshd reload` (the
// unit's ExecReload) asks the running smeshd to reload and waits for the
// outcome, so `systemctl reload smeshd` returns once the new configuration
// is in force, and fails, with the reason, when it was rejected. A signal
// cannot do that: `kill -HUP` returns before smeshd even saw it.
//
// The socket is RUNTIME_DIRECTORY/control (systemd's RuntimeDirectory=,
// which only root can enter), and exists only there. The protocol is one
// line each way: "reload" and then "ok" or "error: REASON"; "upgrade"
// (upgrade.go) and then "ok PID" (the successor's) or "error: REASON".

// ControlSocketName is the control socket's name in the runtime directory.
const ControlSocketName = "control"

// DefaultRuntimeDir is the unit's RuntimeDirectory= (/run/smesh), where
// `smeshd reload` looks when RUNTIME_DIRECTORY is not set.
const DefaultRuntimeDir = "/run/smesh"

// controlTimeout bounds how long one request may take to arrive.
const controlTimeout = 5 * time.Second

// ControlSocket is the path of the control socket: in RUNTIME_DIRECTORY
// (the first, if systemd set several), or "" when it is not set.
func ControlSocket() string {
	dir := runtimeDir()
	if dir == "" {
		return ""
	}
	return filepath.Join(dir, ControlSocketName)
}

// runtimeDir is RUNTIME_DIRECTORY (the first, if systemd set several), or
// "".
func runtimeDir() string {
	dir, _, _ := strings.Cut(os.Getenv("RUNTIME_DIRECTORY"), ":")
	return dir
}

// reloadRequest is a reload asked for on the control socket; the daemon's
// loop answers on reply.
type reloadRequest struct {
	reply chan error
}

// controlLoop is where the control socket's requests go: the daemon's
// loop.
type controlLoop struct {
	reloads chan reloadRequest
	// upgrades: nil refuses them.
	upgrades chan upgradeRequest
	// answers counts upgrade answers not yet written. They outlive the
	// socket: the socket closes when this smeshd releases to the
	// successor, and the answer comes after that; the daemon waits for
	// them before it exits.
	answers sync.WaitGroup
}

// listenControl opens the control socket at path, readable and writable by
// root only, and serves it until ctx ends: each request goes to loop and
// its answer back to the client.
func listenControl(ctx context.Context, path string, loop *controlLoop, log zerolog.Logger) (func(), error) {
	os.Remove(path) // a socket left by a process that is gone
	old := unix.Umask(0o177)
	ln, err := net.Listen("unix", path)
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	log = log.With().Str("component", "control").Str("socket", path).Logger()
	// Its own context: a request waiting for a loop that is gone is
	// answered when the socket closes.
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return // closed
			}
			serveControl(ctx, c, loop, log)
		}
	}()
	return func() {
		cancel()
		ln.Close()
		<-done
		os.Remove(path)
	}, nil
}

// serveControl answers one client. Requests are served one at a time; an
// upgrade's answer is written by a goroutine of its own once the loop
// gave it, so that closing the socket need not wait for it.
func serveControl(ctx context.Context, c net.Conn, loop *controlLoop, log zerolog.Logger) {
	c.SetReadDeadline(time.Now().Add(controlTimeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		log.Debug().Err(err).Msg("reading a control request")
		c.Close()
		return
	}
	if strings.TrimSpace(line) == "upgrade" && loop.upgrades != nil {
		r := upgradeRequest{reply: make(chan upgradeResult, 1)}
		select {
		case loop.upgrades <- r:
		case <-ctx.Done():
			answerControl(c, "error: smeshd is stopping")
			return
		}
		// The loop answers every upgrade it took, whatever happens.
		loop.answers.Add(1)
		go func() {
			defer loop.answers.Done()
			res := <-r.reply
			if res.err != nil {
				answerControl(c, "error: "+strings.ReplaceAll(res.err.Error(), "\n", "; "))
				return
			}
			answerControl(c, fmt.Sprintf("ok %d", res.pid))
		}()
		return
	}
	var answer string
	switch strings.TrimSpace(line) {
	case "upgrade":
		answer = "error: this smeshd cannot upgrade itself (it serves no hand-over socket: is RUNTIME_DIRECTORY set?)"
	case "reload":
		r := reloadRequest{reply: make(chan error, 1)}
		select {
		case loop.reloads <- r:
			if err := <-r.reply; err != nil {
				answer = "error: configuration rejected, the running one stays in force: " + strings.ReplaceAll(err.Error(), "\n", "; ")
			} else {
				answer = "ok"
			}
		case <-ctx.Done():
			answer = "error: smeshd is stopping"
		}
	default:
		answer = fmt.Sprintf("error: unknown request %q", strings.TrimSpace(line))
	}
	answerControl(c, answer)
}

// answerControl writes the one line of answer and closes c.
func answerControl(c net.Conn, answer string) {
	defer c.Close()
	c.SetWriteDeadline(time.Now().Add(controlTimeout))
	fmt.Fprintln(c, answer)
}

// Reload asks the smeshd listening on the control socket at path to reload
// its configuration, and returns once it has: nil when the new
// configuration is in force, the reason when it was rejected (the running
// configuration then stays).
func Reload(path string, timeout time.Duration) error {
	c, err := net.DialTimeout("unix", path, timeout)
	if err != nil {
		return fmt.Errorf("asking smeshd to reload: %w (is smeshd running under systemd, with RuntimeDirectory=smesh?)", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprintln(c, "reload"); err != nil {
		return fmt.Errorf("asking smeshd to reload: %w", err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("waiting for smeshd to reload: %w", err)
	}
	line = strings.TrimSpace(line)
	if line == "ok" {
		return nil
	}
	if reason, ok := strings.CutPrefix(line, "error: "); ok {
		return errors.New(reason)
	}
	return fmt.Errorf("unexpected answer from smeshd: %q", line)
}

// Upgrade asks the smeshd listening on the control socket at path to start
// its successor (the binary now at the path it was started from) and to
// hand over to it, and returns once it has: the successor's PID, or why it
// did not take over (the running smeshd then goes on serving).
func Upgrade(path string, timeout time.Duration) (int, error) {
	c, err := net.DialTimeout("unix", path, timeout)
	if err != nil {
		return 0, fmt.Errorf("asking smeshd to upgrade: %w (is smeshd running, with RUNTIME_DIRECTORY set, e.g. by systemd's RuntimeDirectory=smesh?)", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprintln(c, "upgrade"); err != nil {
		return 0, fmt.Errorf("asking smeshd to upgrade: %w", err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return 0, fmt.Errorf("waiting for smeshd to upgrade (it may still be going on: see its log): %w", err)
	}
	line = strings.TrimSpace(line)
	if pid, ok := strings.CutPrefix(line, "ok "); ok {
		n, err := strconv.Atoi(pid)
		if err != nil {
			return 0, fmt.Errorf("unexpected answer from smeshd: %q", line)
		}
		return n, nil
	}
	if reason, ok := strings.CutPrefix(line, "error: "); ok {
		return 0, errors.New(reason)
	}
	return 0, fmt.Errorf("unexpected answer from smeshd: %q", line)
}
