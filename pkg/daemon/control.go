package daemon

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
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
// line each way: "reload" and then "ok" or "error: REASON".

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

// listenControl opens the control socket at path, readable and writable by
// root only, and serves it until ctx ends: each request goes to requests
// and its answer back to the client.
func listenControl(ctx context.Context, path string, requests chan<- reloadRequest, log zerolog.Logger) (func(), error) {
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
			serveControl(ctx, c, requests, log)
		}
	}()
	return func() {
		cancel()
		ln.Close()
		<-done
		os.Remove(path)
	}, nil
}

// serveControl answers one client. Requests are served one at a time.
func serveControl(ctx context.Context, c net.Conn, requests chan<- reloadRequest, log zerolog.Logger) {
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(controlTimeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		log.Debug().Err(err).Msg("reading a control request")
		return
	}
	var answer string
	switch strings.TrimSpace(line) {
	case "reload":
		r := reloadRequest{reply: make(chan error, 1)}
		select {
		case requests <- r:
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
