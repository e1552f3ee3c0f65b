package bench

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// steps drives a progress the way Run does: several steps per phase.
func steps(p *progress) {
	p.update("setting up namespaces, cgroups and smeshd", "direct")
	p.update("setting up namespaces, cgroups and smeshd", "copy")
	p.update("warm-up round (discarded)", "direct bulk")
	p.update("warm-up round (discarded)", "copy bulk")
	p.update("round 1/1", "direct bulk")
	p.update("round 1/1", "copy rr")
	p.done()
}

// Piped, redirected to a file or read by CI, progress is a plain line per
// phase: no carriage returns, no escape sequences.
func TestProgressNotATerminal(t *testing.T) {
	want := "smeshd bench: setting up namespaces, cgroups and smeshd\n" +
		"smeshd bench: warm-up round (discarded)\n" +
		"smeshd bench: round 1/1\n"

	var buf bytes.Buffer
	steps(newProgress(&buf))
	if buf.String() != want {
		t.Errorf("progress into a buffer:\n%q\nwant\n%q", buf.String(), want)
	}

	path := filepath.Join(t.TempDir(), "bench.log")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	steps(newProgress(f))
	f.Close()
	got, _ := os.ReadFile(path)
	if string(got) != want {
		t.Errorf("progress into a file:\n%q\nwant\n%q", got, want)
	}

	steps(newProgress(nil)) // silence, no panic
}

// On a terminal, progress is one status line rewritten in place, cleared
// at the end.
func TestProgressTerminal(t *testing.T) {
	master, slave := openPty(t)
	steps(newProgress(slave))
	want := "\r\033[Ksetting up namespaces, cgroups and smeshd: direct" +
		"\r\033[Ksetting up namespaces, cgroups and smeshd: copy" +
		"\r\033[Kwarm-up round (discarded): direct bulk" +
		"\r\033[Kwarm-up round (discarded): copy bulk" +
		"\r\033[Kround 1/1: direct bulk" +
		"\r\033[Kround 1/1: copy rr" +
		"\r\033[K"
	got := readN(t, master, len(want))
	if got != want {
		t.Errorf("progress on a terminal:\n%q\nwant\n%q", got, want)
	}
}

// openPty opens a new pseudo-terminal pair (posix_openpt, unlockpt,
// ptsname).
func openPty(t *testing.T) (master, slave *os.File) {
	t.Helper()
	fd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		testenv.SkipOrFail(t, "no pseudo-terminals here: %v", err)
	}
	master = os.NewFile(uintptr(fd), "/dev/ptmx")
	t.Cleanup(func() { master.Close() })
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		t.Fatalf("unlockpt: %v", err)
	}
	n, err := unix.IoctlGetInt(fd, unix.TIOCGPTN)
	if err != nil {
		t.Fatalf("ptsname: %v", err)
	}
	slave, err = os.OpenFile("/dev/pts/"+strconv.Itoa(n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatalf("opening the pty: %v", err)
	}
	t.Cleanup(func() { slave.Close() })
	return master, slave
}

// readN reads n bytes of what the terminal output (the pty passes them on
// asynchronously).
func readN(t *testing.T, f *os.File, n int) string {
	t.Helper()
	f.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, n)
	got, err := io.ReadFull(f, buf)
	if err != nil {
		t.Fatalf("reading the terminal's output: %d of %d bytes: %v (%q)", got, n, err, buf[:got])
	}
	return string(buf)
}
