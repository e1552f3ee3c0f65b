package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/handover"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// fakeStore plays systemd's side of NOTIFY_SOCKET: it records who said
// what, and keeps what is stored (FDSTORE=1, FDNAME=) until removed
// (FDSTOREREMOVE=1).
type fakeStore struct {
	mu     sync.Mutex
	states []string // "PID: state"
	files  map[string][]*os.File
}

func newFakeStore(t *testing.T) (*fakeStore, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := c.SyscallConn()
	raw.Control(func(fd uintptr) { unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1) })
	s := &fakeStore{files: make(map[string][]*os.File)}
	t.Cleanup(func() {
		c.Close()
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, fs := range s.files {
			for _, f := range fs {
				f.Close()
			}
		}
	})
	go func() {
		buf, oob := make([]byte, 4096), make([]byte, 4096)
		for {
			n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
			pid := 0
			var fds []int
			for _, m := range msgs {
				if cred, err := unix.ParseUnixCredentials(&m); err == nil {
					pid = int(cred.Pid)
				} else if got, err := unix.ParseUnixRights(&m); err == nil {
					fds = append(fds, got...)
				}
			}
			s.handle(pid, string(buf[:n]), fds)
		}
	}()
	return s, path
}

func (s *fakeStore) handle(pid int, state string, fds []int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.states = append(s.states, fmt.Sprintf("%d: %s", pid, state))
	kv := map[string]string{}
	for line := range strings.Lines(state) {
		k, v, _ := strings.Cut(strings.TrimSpace(line), "=")
		kv[k] = v
	}
	name, _ := handover.DecodeFDName(kv["FDNAME"])
	switch {
	case kv["FDSTORE"] == "1":
		for _, fd := range fds {
			unix.CloseOnExec(fd)
			s.files[name] = append(s.files[name], os.NewFile(uintptr(fd), name))
		}
		return
	case kv["FDSTOREREMOVE"] == "1":
		for _, f := range s.files[name] {
			f.Close()
		}
		delete(s.files, name)
	}
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// said reports the PID that sent state first, 0 if none did.
func (s *fakeStore) said(state string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, st := range s.states {
		pid, rest, _ := strings.Cut(st, ": ")
		if rest == state {
			var n int
			fmt.Sscan(pid, &n)
			return n
		}
	}
	return 0
}

func (s *fakeStore) names() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for n, fs := range s.files {
		for range fs {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
}

// take moves every stored file out of the store, as systemd passes them on.
func (s *fakeStore) take() (names []string, files []*os.File) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for n, fs := range s.files {
		for _, f := range fs {
			names = append(names, handover.EncodeFDName(n))
			files = append(files, f)
		}
	}
	s.files = make(map[string][]*os.File)
	return names, files
}

// TestMasterStore: `smeshd -c FILE` as a systemd service (NOTIFY_SOCKET,
// INVOCATION_ID, RUNTIME_DIRECTORY) is a master whose worker, another
// process, says READY=1 and stores every listener, map and link in the
// descriptor store (played here by the test). A SIGTERM that is no restart
// job (no systemd here to say otherwise) empties the store and the master
// exits 0 with its worker. A master given the stored descriptors back, as
// systemd gives them after a restart (LISTEN_PID, LISTEN_FDS,
// LISTEN_FDNAMES), takes everything over from them: a connection made to
// the admin listener while no smeshd ran is answered by the new worker.
func TestMasterStore(t *testing.T) {
	w := newSmeshdWorld(t)
	store, notify := newFakeStore(t)
	t.Setenv("NOTIFY_SOCKET", notify)
	t.Setenv("INVOCATION_ID", "smesh-test")
	// systemd executes the service's process itself: SYSTEMD_EXEC_PID is
	// its PID (the shell's, which it execs).
	first := testenv.StartProcess(t, w.smeshCg, w.node.Name, "sh", "-c", `SYSTEMD_EXEC_PID=$$ exec "$0" "$@"`, w.exe, "-c", w.path)
	waitStderr(t, first, "smeshd ready", 1)
	// The namespaces' listeners are stored once smeshd serves them, which
	// may come after it said ready (an emulated guest takes seconds).
	prefixes := []string{"admin", "out4/", "out6/", "tun/", "map/smesh_sockhash", "link/CGroupInet4Connect/", "link/CGroupSockOps/"}
	missing := func(names []string) []string {
		var out []string
		for _, prefix := range prefixes {
			if !slices.ContainsFunc(names, func(n string) bool { return strings.HasPrefix(n, prefix) }) {
				out = append(out, prefix)
			}
		}
		return out
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(missing(store.names())) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	worker := store.said("READY=1")
	if worker == 0 || worker == first.PID() {
		t.Errorf("READY=1 came from PID %d, want the worker (the master is %d)", worker, first.PID())
	}
	names := store.names()
	for _, prefix := range missing(names) {
		t.Errorf("nothing stored as %s* within 10s: %v", prefix, names)
	}
	if slices.ContainsFunc(names, func(n string) bool { return n == "lock" }) {
		t.Errorf("a lock stored in on_failure = \"open\": %v", names)
	}
	for i := 1; i < len(names); i++ {
		if names[i] == names[i-1] {
			t.Errorf("%s stored twice", names[i])
		}
	}
	// What systemd would keep across a restart: the test's copies.
	var kept []*os.File
	var keptNames []string
	store.mu.Lock()
	for n, fs := range store.files {
		for _, f := range fs {
			// Control, never Fd: Fd would make a listener blocking.
			raw, err := f.SyscallConn()
			if err != nil {
				t.Fatal(err)
			}
			d := -1
			raw.Control(func(fd uintptr) { d, err = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 3) })
			if err != nil {
				t.Fatal(err)
			}
			kept = append(kept, os.NewFile(uintptr(d), n))
			keptNames = append(keptNames, handover.EncodeFDName(n))
		}
	}
	store.mu.Unlock()
	defer func() {
		for _, f := range kept {
			f.Close()
		}
	}()

	if err := first.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := first.Wait(); err != nil {
		t.Errorf("the master exited with %v after SIGTERM:\n%s", err, first.Stderr())
	}
	if alive(worker) {
		t.Errorf("the worker %d outlived its master's stop", worker)
	}
	// The reader may not have read the last datagrams yet.
	for deadline := time.Now().Add(5 * time.Second); len(store.names()) > 0 && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	if left := store.names(); len(left) > 0 {
		t.Errorf("a stop left %v in the store", left)
	}

	// No smeshd runs: a request to the admin listener waits in its queue.
	answer := make(chan string, 1)
	go w.node.Do(func() error {
		c, err := net.DialTimeout("tcp4", "127.0.0.1:15000", 5*time.Second)
		if err != nil {
			answer <- err.Error()
			return nil
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		// /healthz: the next worker may answer before it says ready.
		io.WriteString(c, "GET /healthz HTTP/1.0\r\n\r\n")
		line, err := bufio.NewReader(c).ReadString('\n')
		answer <- fmt.Sprintf("%s%v", line, err)
		return nil
	})
	time.Sleep(500 * time.Millisecond)

	// The next master, given the store as systemd gives it.
	cg, err := os.Open(w.smeshCg)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()
	cmd := exec.Command("nsenter", "--net=/run/netns/"+w.node.Name, "sh", "-c", `LISTEN_PID=$$ SYSTEMD_EXEC_PID=$$ exec "$0" "$@"`, w.exe, "-c", w.path)
	cmd.Env = append(os.Environ(), fmt.Sprintf("LISTEN_FDS=%d", len(kept)), "LISTEN_FDNAMES="+strings.Join(keptNames, ":"))
	cmd.ExtraFiles = kept
	var errOut strings.Builder
	var mu sync.Mutex
	cmd.Stderr = writerFunc(func(p []byte) (int, error) { mu.Lock(); defer mu.Unlock(); return errOut.Write(p) })
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd()), Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited, done := make(chan error, 1), make(chan struct{})
	go func() { exited <- cmd.Wait(); close(done) }()
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
		}
	}()
	select {
	case got := <-answer:
		if !strings.Contains(got, " 200 ") {
			t.Errorf("the request made while no smeshd ran got %q, want 200 from the next worker", got)
		}
	case <-time.After(30 * time.Second):
		t.Error("the request made while no smeshd ran was not answered")
	}
	mu.Lock()
	out := errOut.String()
	mu.Unlock()
	if !strings.Contains(out, "took over what systemd's descriptor store kept") {
		t.Errorf("the next worker did not start from the store:\n%s", out)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("the second master exited with %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Error("the second master did not exit after SIGTERM")
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// crashedStore runs a master under a fake systemd until it is ready and its
// store holds everything, then kills master and worker (a crash: the store
// keeps all) and returns what the store held, as LISTEN_FDNAMES names and
// files, with the store.
func crashedStore(t *testing.T, w smeshdWorld) (*fakeStore, []string, []*os.File) {
	t.Helper()
	store, notify := newFakeStore(t)
	t.Setenv("NOTIFY_SOCKET", notify)
	t.Setenv("INVOCATION_ID", "smesh-test")
	first := testenv.StartProcess(t, w.smeshCg, w.node.Name, "sh", "-c", `SYSTEMD_EXEC_PID=$$ exec "$0" "$@"`, w.exe, "-c", w.path)
	waitStderr(t, first, "smeshd ready", 1)
	deadline := time.Now().Add(10 * time.Second)
	for !slices.Contains(store.names(), "admin") && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	names, kept := store.take()
	t.Cleanup(func() {
		for _, f := range kept {
			f.Close()
		}
	})
	if len(kept) == 0 {
		t.Fatal("nothing was stored")
	}
	worker := store.said("READY=1")
	first.Signal(syscall.SIGKILL)
	first.Wait()
	if worker != 0 {
		syscall.Kill(worker, syscall.SIGKILL)
		for i := 0; i < 100 && alive(worker); i++ {
			time.Sleep(50 * time.Millisecond)
		}
	}
	return store, names, kept
}

// startFromStore starts a master as systemd would after a crash: with what
// the store held in LISTEN_FDS, and the configuration conf.
func startFromStore(t *testing.T, w smeshdWorld, conf string, names []string, kept []*os.File) *exec.Cmd {
	t.Helper()
	path := filepath.Join(t.TempDir(), "smesh.toml")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	cg, err := os.Open(w.smeshCg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cg.Close() })
	cmd := exec.Command("nsenter", "--net=/run/netns/"+w.node.Name, "sh", "-c", `LISTEN_PID=$$ SYSTEMD_EXEC_PID=$$ exec "$0" "$@"`, w.exe, "-c", path)
	cmd.Env = append(os.Environ(), fmt.Sprintf("LISTEN_FDS=%d", len(kept)), "LISTEN_FDNAMES="+strings.Join(names, ":"))
	cmd.ExtraFiles = kept
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd()), Pdeathsig: syscall.SIGKILL}
	return cmd
}

// TestMasterStoreFailedStart: a start from the store that fails (here the
// tunnel's certificates are missing) empties the store, so that systemd's
// next start is a fresh one instead of failing the same way for ever.
func TestMasterStoreFailedStart(t *testing.T) {
	w := newSmeshdWorld(t)
	store, names, kept := crashedStore(t, w)
	conf := strings.Replace(w.conf, `mode = "disabled"`,
		"mode = \"mtls\"\ncert = \"/nonexistent/a.crt\"\nkey = \"/nonexistent/a.key\"\nca = \"/nonexistent/ca.crt\"", 1)
	out, err := startFromStore(t, w, conf, names, kept).CombinedOutput()
	if err == nil {
		t.Fatalf("a worker started without its certificates exited 0:\n%s", out)
	}
	if !strings.Contains(string(out), "emptied it: the next start is a fresh one") {
		t.Errorf("the failed start does not say it emptied the store:\n%s", out)
	}
	time.Sleep(500 * time.Millisecond) // the reader may lag behind
	for _, want := range []string{"admin", "map/smesh_sockhash"} {
		if store.said("FDSTOREREMOVE=1\nFDNAME="+want) == 0 {
			t.Errorf("%s was not removed from the store", want)
		}
	}
}

// TestMasterStoreMapSizeChanged: a start from the store with another
// [datapath] map_size (a restart into maps of another layout) takes the
// store's maps over per map (docs/restart.md 3.6): it gets ready, says
// which maps it made anew, and serves bytes through the mesh.
func TestMasterStoreMapSizeChanged(t *testing.T) {
	w := newSmeshdWorld(t)
	// Copy mode: the exchanges below are relayed by the new worker.
	w.conf += "[datapath]\nmode = \"copy\"\n"
	if err := os.WriteFile(w.path, []byte(w.conf), 0o644); err != nil {
		t.Fatal(err)
	}
	store, names, kept := crashedStore(t, w)
	first := store.said("READY=1")
	cmd := startFromStore(t, w, w.conf+"map_size = 4096\n", names, kept)
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		<-exited
	})
	deadline := time.Now().Add(30 * time.Second)
	for !readyAgain(store, first) {
		select {
		case err := <-exited:
			t.Fatalf("the start from the store with another map_size exited (%v):\n%s", err, out.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("the start from the store with another map_size did not get ready:\n%s", out.String())
		}
	}
	for _, m := range []string{"smesh_sockhash", "smesh_orig_dst", "smesh_dirs"} {
		if !strings.Contains(out.String(), `"map":"`+m+`"`) {
			t.Errorf("the start does not say it made %s anew:\n%s", m, out.String())
		}
	}

	stopLoop := w.echoLoop(t, w.echoServer(t))
	time.Sleep(time.Second)
	stopLoop()
	if n := testenv.Metric(t, metricsIn(t, w.node), "smesh_connections_total", map[string]string{"path": "copy"}); n == 0 {
		t.Errorf("the new worker relayed no connection")
	}
}

// syncBuffer is a strings.Builder a process may write to while the test
// reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// readyAgain: a process other than first said READY=1.
func readyAgain(s *fakeStore, first int) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, st := range s.states {
		pid, rest, _ := strings.Cut(st, ": ")
		if rest == "READY=1" && pid != strconv.Itoa(first) {
			return true
		}
	}
	return false
}
