package daemon

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"runtime/debug"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rs/zerolog"
	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

func TestResolveMode(t *testing.T) {
	all := []datapath.Feature{
		{Name: "sock_ops programs", NeededFor: "capture"},
		{Name: "sk_msg programs (CONFIG_NET_SOCK_MSG)", NeededFor: "splice"},
	}
	noSkMsg := []datapath.Feature{
		{Name: "sock_ops programs", NeededFor: "capture"},
		{Name: "sk_msg programs (CONFIG_NET_SOCK_MSG)", NeededFor: "splice", Err: errors.New("not supported")},
	}
	noCapture := []datapath.Feature{
		{Name: "sock_ops programs", NeededFor: "capture", Err: errors.New("not supported")},
	}
	// Without CAP_BPF every probe fails, with EPERM: the error must name
	// the capability, not blame the kernel.
	noCapBPF := []datapath.Feature{
		{Name: "CAP_BPF", NeededFor: "capture", Privilege: true, Err: errors.New("missing capability CAP_BPF")},
		{Name: "CAP_NET_ADMIN", NeededFor: "capture", Privilege: true},
		{Name: "sock_ops programs", NeededFor: "capture", Err: fmt.Errorf("load: %w", unix.EPERM)},
	}
	eperm := []datapath.Feature{
		{Name: "CAP_BPF", NeededFor: "capture", Privilege: true},
		{Name: "sock_ops programs", NeededFor: "capture", Err: fmt.Errorf("load: %w", unix.EPERM)},
	}
	// Linux 6.1: everything but the bounded sk_msg program.
	noBound := append(all[:len(all):len(all)],
		datapath.Feature{Name: "bounded splice", NeededFor: "bounded splice", Err: errors.New(`kfunc "bpf_cast_to_kern_ctx": not supported`)})
	// Linux 5.10: smesh_sockops does not load.
	belowFloor := []datapath.Feature{
		{Name: "program smesh_sockops", NeededFor: "capture", Err: fmt.Errorf("%w: unknown func bpf_get_netns_cookie#122", datapath.ErrBelowFloor)},
	}
	cases := []struct {
		mode     string
		features []datapath.Feature
		want     datapath.Mode
		errWants string // substring of the error, "" for none
	}{
		{"auto", all, datapath.ModeSplice, ""},
		{"auto", noSkMsg, datapath.ModeCopy, ""},
		{"splice", all, datapath.ModeSplice, ""},
		{"splice", noSkMsg, "", "CONFIG_NET_SOCK_MSG"},
		{"copy", noSkMsg, datapath.ModeCopy, ""},
		{"copy", noCapture, "", "sock_ops"},
		{"auto", noCapBPF, "", "missing capability CAP_BPF: smeshd needs CAP_BPF and CAP_NET_ADMIN"},
		{"auto", eperm, "", "the kernel refuses smesh's capture (operation not permitted)"},
		{"auto", noBound, datapath.ModeCopy, ""},
		{"splice", noBound, datapath.ModeSplice, ""},
		{"copy", noBound, datapath.ModeCopy, ""},
		{"auto", belowFloor, "", "below smesh's floor"},
		{"copy", belowFloor, "", "Linux 5.15 or later"},
		{"turbo", all, "", "want auto, splice or copy"},
	}
	for _, c := range cases {
		got, err := ResolveMode(c.mode, c.features)
		switch {
		case c.errWants == "" && err != nil:
			t.Errorf("ResolveMode(%q): %v", c.mode, err)
		case c.errWants != "" && (err == nil || !strings.Contains(err.Error(), c.errWants)):
			t.Errorf("ResolveMode(%q) error = %v, want one naming %q", c.mode, err, c.errWants)
		case err != nil && strings.Contains(err.Error(), "this kernel cannot") && datapath.MissingPrivileges(c.features) != nil:
			t.Errorf("ResolveMode(%q) error = %v blames the kernel for a missing capability", c.mode, err)
		case got != c.want:
			t.Errorf("ResolveMode(%q) = %q, want %q", c.mode, got, c.want)
		}
	}
}

// TestSwitchover: a reload's changes are done in order; when one fails,
// those done before it are undone, last first, and the later ones are not
// done at all.
func TestSwitchover(t *testing.T) {
	var log []string
	step := func(name string, fail bool) change {
		return change{
			what: name,
			do: func() error {
				log = append(log, "do "+name)
				if fail {
					return errors.New("refused")
				}
				return nil
			},
			undo: func() { log = append(log, "undo "+name) },
		}
	}
	err := switchover([]change{step("a", false), step("b", false), step("c", true), step("d", false)})
	if err == nil || !strings.Contains(err.Error(), "applying c: refused") {
		t.Errorf("error %v, want one naming c", err)
	}
	if want := []string{"do a", "do b", "do c", "undo b", "undo a"}; !slices.Equal(log, want) {
		t.Errorf("steps %q, want %q", log, want)
	}
	log = nil
	if err := switchover([]change{step("a", false), {what: "b", do: func() error { return nil }}}); err != nil {
		t.Errorf("switchover without a failure: %v", err)
	}
	if want := []string{"do a"}; !slices.Equal(log, want) {
		t.Errorf("steps %q, want %q", log, want)
	}
}

// TestResolveCgroups: what start, reload and `smeshd check` accept as
// [capture] cgroups, on a directory tree standing in for the cgroup v2
// mount.
func TestResolveCgroups(t *testing.T) {
	mount := t.TempDir()
	for _, dir := range []string{"smesh.slice", "smesh.slice/app.scope"} {
		if err := os.Mkdir(filepath.Join(mount, dir), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(mount, "smesh.slice", "cgroup.procs"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name    string
		cgroups []string
		want    Cgroups
		wantErr string
	}{
		{"existing", []string{"smesh.slice"}, Cgroups{Paths: []string{mount + "/smesh.slice"}}, ""},
		{"missing, created at start", []string{"new.slice"},
			Cgroups{Paths: []string{mount + "/new.slice"}, Missing: []string{mount + "/new.slice"}}, ""},
		{"the mount itself", []string{mount}, Cgroups{}, "is the cgroup v2 root"},
		{"outside the mount", []string{"/etc/passwd"}, Cgroups{}, "is not below the cgroup v2 mount"},
		{"a cgroup with its own child", []string{"smesh.slice", "smesh.slice/app.scope"}, Cgroups{}, "is below"},
		{"a file inside a cgroup", []string{"smesh.slice/cgroup.procs"}, Cgroups{}, "is a file, not a cgroup"},
		{"below a file", []string{"smesh.slice/cgroup.procs/x"}, Cgroups{}, "not a cgroup directory"},
		{"two levels missing", []string{"a/b"}, Cgroups{}, "creates only its last directory"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := config.Default()
			cfg.Capture.Cgroups = tc.cgroups
			got, err := ResolveCgroups(cfg, mount)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Errorf("ResolveCgroups(%q) error %v, want one containing %q", tc.cgroups, err, tc.wantErr)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Errorf("ResolveCgroups(%q) = %+v, %v; want %+v", tc.cgroups, got, err, tc.want)
			}
		})
	}
}

// TestConsoleColourOnlyOnTerminal: the console format writes escape
// sequences to a terminal only, never to the journal, a pipe or a buffer.
func TestConsoleColourOnlyOnTerminal(t *testing.T) {
	logLine := func(w io.Writer) {
		t.Helper()
		log, err := NewLogger(config.Log{Level: "info", Format: "console"}, w)
		if err != nil {
			t.Fatal(err)
		}
		log.Info().Str("component", "test").Msg("hello")
	}
	var buf bytes.Buffer
	logLine(&buf)
	if strings.Contains(buf.String(), "\x1b[") || !strings.Contains(buf.String(), "hello") {
		t.Errorf("console log to a buffer: %q, want plain text", buf.String())
	}

	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	logLine(w)
	w.Close()
	out, _ := io.ReadAll(r)
	r.Close()
	if strings.Contains(string(out), "\x1b[") {
		t.Errorf("console log to a pipe (as under systemd): %q, want plain text", out)
	}

	// A pseudo-terminal gets colours.
	ptm, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		testenv.SkipOrFail(t, "no pseudo-terminal to test colours on: %v", err)
	}
	defer ptm.Close()
	if err := unix.IoctlSetPointerInt(int(ptm.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(int(ptm.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	pts, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer pts.Close()
	t.Setenv("NO_COLOR", "")
	logLine(pts)
	got := make([]byte, 4096)
	ptm.SetReadDeadline(time.Now().Add(5 * time.Second))
	k, err := ptm.Read(got)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(got[:k]), "\x1b[") {
		t.Errorf("console log to a terminal: %q, want colours", got[:k])
	}
}

// TestAdoptMemoryLimit: a memory limit on smeshd's cgroup (or above it)
// becomes the Go runtime's soft limit at three quarters; GOMEMLIMIT, or no
// limit, leaves the runtime as it is.
func TestAdoptMemoryLimit(t *testing.T) {
	before := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(before) })
	mount := t.TempDir()
	limited := filepath.Join(mount, "pod", "ctr")
	free := filepath.Join(mount, "free")
	for _, d := range []string{limited, free} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(mount, "pod", "memory.max"), []byte("1073741824\n"), 0o644)
	os.WriteFile(filepath.Join(limited, "memory.max"), []byte("max\n"), 0o644)
	os.WriteFile(filepath.Join(free, "memory.max"), []byte("max\n"), 0o644)
	log := zerolog.Nop()

	t.Setenv("GOMEMLIMIT", "")
	adoptMemoryLimit(mount, free, log)
	if got := debug.SetMemoryLimit(-1); got != before {
		t.Errorf("no limit: the runtime's soft limit became %d", got)
	}
	adoptMemoryLimit(mount, limited, log)
	if got, want := debug.SetMemoryLimit(-1), int64(3<<30/4); got != want {
		t.Errorf("under a 1 GiB limit: the runtime's soft limit is %d, want %d", got, want)
	}
	debug.SetMemoryLimit(before)
	t.Setenv("GOMEMLIMIT", "100MiB")
	adoptMemoryLimit(mount, limited, log)
	if got := debug.SetMemoryLimit(-1); got != before {
		t.Errorf("with GOMEMLIMIT set: the runtime's soft limit became %d", got)
	}
}
