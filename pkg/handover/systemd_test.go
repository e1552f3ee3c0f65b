package handover

import (
	"net"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func TestFDNameRoundTrip(t *testing.T) {
	for _, name := range []string{
		"admin", "out4/4096", "tun/12", "map/smesh_sockhash", "link/CGroupInet4Connect/1234", "lock",
		"a:b", "100%", "with space", "tab\there", "\x00\xff",
	} {
		enc := EncodeFDName(name)
		if !ValidFDName(enc) {
			t.Errorf("EncodeFDName(%q) = %q, not a valid FDNAME", name, enc)
		}
		got, err := DecodeFDName(enc)
		if err != nil || got != name {
			t.Errorf("DecodeFDName(%q) = %q, %v; want %q", enc, got, err, name)
		}
	}
	// The hand-over's names travel unchanged: '/' is valid.
	if got := EncodeFDName("link/CGroupSockOps/77"); got != "link/CGroupSockOps/77" {
		t.Errorf("EncodeFDName changed a valid name: %q", got)
	}
	for _, bad := range []string{"%", "%4", "%zz"} {
		if _, err := DecodeFDName(bad); err == nil {
			t.Errorf("DecodeFDName(%q) accepted it", bad)
		}
	}
}

// FuzzDecodeFDName: whatever LISTEN_FDNAMES holds, decoding never panics,
// and what decodes encodes back to a valid name that decodes the same.
func FuzzDecodeFDName(f *testing.F) {
	f.Add("out4/1")
	f.Add("a%3Ab")
	f.Fuzz(func(t *testing.T, s string) {
		name, err := DecodeFDName(s)
		if err != nil {
			return
		}
		enc := EncodeFDName(name)
		if again, err := DecodeFDName(enc); err != nil || again != name {
			t.Fatalf("%q: decoded %q, re-encoded %q, decoded %q, %v", s, name, enc, again, err)
		}
	})
}

// TestStoreSendsDescriptors: Store sends what systemd's sd_pid_notify_with_fds
// would: the state and the descriptor, one per message, FDPOLL=0 when asked;
// a listener stays non-blocking.
func TestStoreSendsDescriptors(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "notify")
	srv, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	t.Setenv("NOTIFY_SOCKET", path)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if !IsSocket(f) {
		t.Error("IsSocket(listener) = false")
	}
	if err := Store("out4/7:x", f, false); err != nil {
		t.Fatal(err)
	}
	buf, oob := make([]byte, 512), make([]byte, unix.CmsgSpace(4*4))
	n, oobn, _, _, err := srv.ReadMsgUnix(buf, oob)
	if err != nil {
		t.Fatal(err)
	}
	if got := string(buf[:n]); got != "FDSTORE=1\nFDNAME=out4/7%3Ax\nFDPOLL=0" {
		t.Errorf("state %q", got)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		t.Fatalf("control messages %v, %v", msgs, err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		t.Fatalf("fds %v, %v", fds, err)
	}
	got := os.NewFile(uintptr(fds[0]), "got")
	defer got.Close()
	var a, b unix.Stat_t
	unix.Fstat(fds[0], &a)
	raw, _ := f.SyscallConn()
	raw.Control(func(fd uintptr) { unix.Fstat(int(fd), &b) })
	if a.Ino != b.Ino {
		t.Error("the descriptor sent is not the listener")
	}
	if fl, _ := unix.FcntlInt(uintptr(fds[0]), unix.F_GETFL, 0); fl&unix.O_NONBLOCK == 0 {
		t.Error("the listener was made blocking")
	}
	if err := Unstore("map/x"); err != nil {
		t.Fatal(err)
	}
	n, _, _, _, _ = srv.ReadMsgUnix(buf, oob)
	if got := string(buf[:n]); got != "FDSTOREREMOVE=1\nFDNAME=map/x" {
		t.Errorf("state %q", got)
	}
	t.Setenv("NOTIFY_SOCKET", "")
	if err := Store("x", f, true); err != nil {
		t.Errorf("Store without NOTIFY_SOCKET: %v", err)
	}
}

// TestFromMasterDecodes: what the master passes (fd 3 on, names encoded)
// comes back under the hand-over's names; the variables are gone after.
func TestFromMasterDecodes(t *testing.T) {
	var pipes []*os.File
	for range 2 {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		pipes = append(pipes, r, w)
	}
	defer func() {
		for _, p := range pipes {
			p.Close()
		}
	}()
	// fromEnv reads descriptors first, first+1: dup the two read ends there.
	fdA, err := unix.FcntlInt(pipes[0].Fd(), unix.F_DUPFD_CLOEXEC, 100)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Dup3(int(pipes[2].Fd()), fdA+1, unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	files, err := fromMaster("2", EncodeFDName("a:1")+":link/X/2", fdA)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for n, f := range files {
		names = append(names, n)
		defer f.Close()
	}
	if len(names) != 2 || files["a:1"] == nil || files["link/X/2"] == nil {
		t.Errorf("names %v", names)
	}
	t.Setenv(WorkerFDsEnv, "")
	if got, err := FromMaster(); got != nil || err != nil {
		t.Errorf("FromMaster with nothing passed: %v, %v", got, err)
	}
	if _, ok := os.LookupEnv(WorkerFDsEnv); ok {
		t.Error("FromMaster left the variable set")
	}
}
