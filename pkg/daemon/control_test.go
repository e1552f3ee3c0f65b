package daemon

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// TestControlReload: Reload returns once the daemon's loop answered, with
// the reason of a rejection; the socket is for root only.
func TestControlReload(t *testing.T) {
	t.Setenv("RUNTIME_DIRECTORY", t.TempDir())
	path := ControlSocket()
	ctx, cancel := context.WithCancel(context.Background())
	requests := make(chan reloadRequest)
	stop, err := listenControl(ctx, path, &controlLoop{reloads: requests}, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := st.Mode().Perm(); perm != 0o600 {
		t.Errorf("control socket mode %v, want 0600", perm)
	}

	// The loop: the first reload is slow and succeeds, the second is
	// rejected.
	answers := []error{nil, errors.New("capture.cgroups: line 3: bad\nand more")}
	loopDone := make(chan struct{})
	var answered time.Time
	go func() {
		defer close(loopDone)
		for _, a := range answers {
			r := <-requests
			if a == nil {
				time.Sleep(200 * time.Millisecond)
				answered = time.Now()
			}
			r.reply <- a
		}
	}()
	if err := Reload(path, 5*time.Second); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	if answered.IsZero() {
		t.Error("Reload returned before the reload was done")
	}
	err = Reload(path, 5*time.Second)
	if err == nil || !strings.Contains(err.Error(), "capture.cgroups: line 3: bad; and more") {
		t.Errorf("Reload of a rejected configuration: %v, want the reason", err)
	}
	<-loopDone

	// A smeshd that stops answers that it does.
	cancel()
	if err := Reload(path, 5*time.Second); err == nil || !strings.Contains(err.Error(), "stopping") {
		t.Errorf("Reload while smeshd stops: %v", err)
	}
}

// TestControlStopWithRequestWaiting: closing the socket while a request
// waits for a loop that no longer runs answers it instead of hanging.
func TestControlStopWithRequestWaiting(t *testing.T) {
	t.Setenv("RUNTIME_DIRECTORY", t.TempDir())
	path := ControlSocket()
	stop, err := listenControl(context.Background(), path, &controlLoop{reloads: make(chan reloadRequest)}, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	res := make(chan error, 1)
	go func() { res <- Reload(path, 5*time.Second) }()
	time.Sleep(100 * time.Millisecond) // the request is waiting
	stopped := make(chan struct{})
	go func() { stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("closing the control socket hangs while a request waits")
	}
	if err := <-res; err == nil || !strings.Contains(err.Error(), "stopping") {
		t.Errorf("the waiting request got %v, want that smeshd stops", err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("control socket left behind: %v", err)
	}
}

func TestControlSocketPath(t *testing.T) {
	t.Setenv("RUNTIME_DIRECTORY", "")
	if p := ControlSocket(); p != "" {
		t.Errorf("ControlSocket() without RUNTIME_DIRECTORY = %q, want none", p)
	}
	t.Setenv("RUNTIME_DIRECTORY", "/run/smesh:/run/other")
	if p, want := ControlSocket(), filepath.Join("/run/smesh", ControlSocketName); p != want {
		t.Errorf("ControlSocket() = %q, want %q", p, want)
	}
	if err := Reload(filepath.Join(t.TempDir(), "none"), time.Second); err == nil || !strings.Contains(err.Error(), "RuntimeDirectory") {
		t.Errorf("Reload without a smeshd: %v, want a hint", err)
	}
}

// TestControlUpgrade: Upgrade returns the successor's PID, or the reason it
// did not take over. The answer comes after the socket was closed, as when
// smeshd releases to its successor: it must still reach the client. A
// smeshd that cannot upgrade says so.
func TestControlUpgrade(t *testing.T) {
	t.Setenv("RUNTIME_DIRECTORY", t.TempDir())
	path := ControlSocket()
	loop := &controlLoop{reloads: make(chan reloadRequest), upgrades: make(chan upgradeRequest)}
	stop, err := listenControl(context.Background(), path, loop, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		r := <-loop.upgrades
		r.reply <- upgradeResult{err: errors.New("the successor (PID 7) did not take over: exit status 1: bad\nfile")}
		r = <-loop.upgrades
		stop() // release closes the socket first
		r.reply <- upgradeResult{pid: 42}
	}()
	if _, err := Upgrade(path, 5*time.Second); err == nil || err.Error() != "the successor (PID 7) did not take over: exit status 1: bad; file" {
		t.Errorf("a failed upgrade: %v", err)
	}
	if pid, err := Upgrade(path, 5*time.Second); err != nil || pid != 42 {
		t.Errorf("an upgrade answered after the socket closed: %d, %v; want 42", pid, err)
	}
	loop.answers.Wait()

	noUpgrades := &controlLoop{reloads: make(chan reloadRequest)}
	stop, err = listenControl(context.Background(), path, noUpgrades, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	if _, err := Upgrade(path, 5*time.Second); err == nil || !strings.Contains(err.Error(), "cannot upgrade") {
		t.Errorf("an upgrade of a smeshd without a hand-over socket: %v", err)
	}
}
