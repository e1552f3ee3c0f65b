package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// TestHandoverMapSizeChanged: a successor whose [datapath] map_size
// differs from the running smeshd's (so the sockhash, smesh_orig_dst and
// smesh_dirs it was handed have another size than its programs want)
// takes over all the same: it makes those maps anew, copies what it can,
// says so in its log, and the predecessor exits. Meanwhile a workload in
// the enrolled cgroup exchanges bytes without pause with a server in the
// node, through smeshd (copy mode: every connection captured, relayed by
// the proxy after SO_ORIGINAL_DST): every byte comes back, before, during
// and after the hand-over.
func TestHandoverMapSizeChanged(t *testing.T) {
	w := newSmeshdWorld(t)
	conf := w.conf + "[datapath]\nmode = \"copy\"\n"
	if err := os.WriteFile(w.path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(t.TempDir(), "smesh.toml")
	if err := os.WriteFile(other, []byte(conf+"map_size = 4096\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	addr := w.echoServer(t)

	first := testenv.StartProcess(t, w.smeshCg, w.node.Name, w.exe, "-c", w.path)
	waitStderr(t, first, "smeshd ready", 1)
	stopLoop := w.echoLoop(t, addr)
	time.Sleep(500 * time.Millisecond)

	second := testenv.StartProcess(t, w.smeshCg, w.node.Name, w.exe, "-c", other)
	waitStderr(t, second, "smeshd ready", 1)
	select {
	case <-first.Exited():
	case <-time.After(30 * time.Second):
		t.Fatalf("the predecessor did not exit after the hand-over:\n%s", first.Stderr())
	}
	if err := first.Wait(); err != nil {
		t.Errorf("the predecessor exited with %v", err)
	}
	log := second.Stderr()
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, "made anew") || strings.Contains(l, "smesh_orig_dst") {
			t.Log(l)
		}
	}
	for _, m := range []string{"smesh_sockhash", "smesh_orig_dst", "smesh_dirs"} {
		if !strings.Contains(log, `"map":"`+m+`"`) || !strings.Contains(log, "map made anew") {
			t.Errorf("the successor's log does not say it made %s anew:\n%s", m, log)
		}
	}
	time.Sleep(500 * time.Millisecond)

	stopLoop()
	// Relayed by smeshd, not direct: the successor's /metrics count them.
	if n := testenv.Metric(t, metricsIn(t, w.node), "smesh_connections_total", map[string]string{"path": "copy"}); n == 0 {
		t.Errorf("the successor relayed no connection")
	}
	if err := second.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := second.Wait(); err != nil {
		t.Errorf("the successor's exit: %v", err)
	}
}

// echoLoop connects to args[0] over and over, sends 4 KiB on each
// connection and checks that exactly those come back, until "stop" on
// stdin or for at most a minute, then prints how many exchanges
// succeeded and failed.
func echoLoop(args []string) int {
	stop := make(chan struct{})
	go func() {
		bufio.NewScanner(os.Stdin).Scan()
		close(stop)
	}()
	deadline := time.Now().Add(time.Minute)
	ok, failed := 0, 0
	want := make([]byte, 4096)
	got := make([]byte, len(want))
	for i := 0; time.Now().Before(deadline); i++ {
		select {
		case <-stop:
			fmt.Printf("ok %d failed %d\n", ok, failed)
			return 0
		default:
		}
		for j := range want {
			want[j] = byte(i + j*7)
		}
		err := func() error {
			c, err := net.DialTimeout("tcp4", args[0], 5*time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := c.Write(want); err != nil {
				return err
			}
			if _, err := io.ReadFull(c, got); err != nil {
				return err
			}
			if !bytes.Equal(got, want) {
				return fmt.Errorf("bytes differ")
			}
			return nil
		}()
		if err != nil {
			failed++
			fmt.Fprintln(os.Stderr, err)
			continue
		}
		ok++
	}
	fmt.Printf("ok %d failed %d\n", ok, failed)
	return 0
}

// metricsIn is the body of smeshd's /metrics in node's namespace.
func metricsIn(t *testing.T, node *testenv.Node) string {
	t.Helper()
	var body []byte
	if err := node.Do(func() error {
		c, err := net.DialTimeout("tcp4", "127.0.0.1:15000", 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, "GET /metrics HTTP/1.0\r\n\r\n"); err != nil {
			return err
		}
		body, err = io.ReadAll(c)
		return err
	}); err != nil {
		t.Fatalf("smeshd's admin: %v", err)
	}
	_, text, _ := strings.Cut(string(body), "\r\n\r\n")
	return text
}
