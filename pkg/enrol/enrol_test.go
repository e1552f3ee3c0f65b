package enrol

import (
	"context"
	"net/netip"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// fakeService is a service whose listeners are always up.
type fakeService struct{}

func (fakeService) SetAddrs([]netip.Addr) {}
func (fakeService) Ready() (v4, v6 bool)  { return true, true }
func (fakeService) Close() error          { return nil }

// readyMaps records which namespaces were published as ready.
type readyMaps struct {
	mu    sync.Mutex
	ready map[uint64]bool
}

func (m *readyMaps) SetNamespace(cookie uint64, _ []netip.Addr, ready4, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.ready[cookie] = ready4
	return nil
}

func (m *readyMaps) RemoveNamespace(cookie uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.ready, cookie)
	return nil
}

func (m *readyMaps) readyCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, r := range m.ready {
		if r {
			n++
		}
	}
	return n
}

// TestSetCgroupsWaitsForListeners: when SetCgroups returns, the namespaces
// of the processes in the new cgroups are served and published ready, so
// that capture attached to those cgroups right after (a reload, a pod that
// joins) finds a listener in each. Opening a service is made slow here; a
// SetCgroups that only handed the cgroups over would return before it.
func TestSetCgroupsWaitsForListeners(t *testing.T) {
	testenv.RequirePrivileged(t)
	const pods = 3
	cg := testenv.NewCgroup(t)
	for range pods {
		startInNewNetns(t, cg)
	}

	maps := &readyMaps{ready: make(map[uint64]bool)}
	tr, err := New(Options{
		Open: func(*Namespace) (Service, error) {
			time.Sleep(100 * time.Millisecond) // a listener that takes its time
			return fakeService{}, nil
		},
		Own:          fakeService{},
		Maps:         maps,
		ScanInterval: time.Hour, // no safety-net scan during the test
		Logger:       zerolog.Nop(),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { tr.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })

	own := maps.readyCount() // smeshd's own namespace
	wait, cancelWait := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancelWait()
	if err := tr.SetCgroups(wait, []string{cg}); err != nil {
		t.Fatalf("SetCgroups: %v", err)
	}
	if got := maps.readyCount() - own; got != pods {
		t.Fatalf("when SetCgroups returned, %d of the new cgroup's %d namespaces were ready", got, pods)
	}

	// Handing the cgroup back also waits: its namespaces are closed.
	if err := tr.SetCgroups(wait, nil); err != nil {
		t.Fatalf("SetCgroups: %v", err)
	}
	if got := maps.readyCount(); got != own {
		t.Fatalf("after the cgroup left, %d namespaces are ready, want %d (smeshd's own)", got, own)
	}
}

// startInNewNetns starts a process in cgroup, in a network namespace of its
// own, and stops it at the end of the test.
func startInNewNetns(t *testing.T, cgroup string) {
	t.Helper()
	dir, err := os.Open(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	cmd := exec.Command("sleep", "600")
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  syscall.CLONE_NEWNET,
		UseCgroupFD: true,
		CgroupFD:    int(dir.Fd()),
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting a process in a network namespace of its own: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
}
