package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// holdEcho connects to args[0], checks one echo, prints "ok" and keeps the
// connection open until a line comes on stdin.
func holdEcho(args []string) int {
	c, err := net.DialTimeout("tcp4", args[0], 5*time.Second)
	if err != nil {
		fmt.Println("error", err)
		return 1
	}
	defer c.Close()
	want := []byte("who am i\n")
	c.SetDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len(want))
	if _, err := c.Write(want); err != nil {
		fmt.Println("error", err)
		return 1
	}
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, want) {
		fmt.Println("error", err, string(got))
		return 1
	}
	fmt.Println("ok")
	bufio.NewScanner(os.Stdin).Scan()
	return 0
}

// waitStdin prints "ok" and waits for a line on stdin.
func waitStdin([]string) int {
	fmt.Println("ok")
	bufio.NewScanner(os.Stdin).Scan()
	return 0
}

// adminGet is the body of GET path on smeshd's admin endpoint in node's
// namespace.
func adminGet(t *testing.T, node *testenv.Node, path string) []byte {
	t.Helper()
	var body []byte
	if err := node.Do(func() error {
		c, err := net.DialTimeout("tcp4", "127.0.0.1:15000", 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, "GET "+path+" HTTP/1.0\r\n\r\n"); err != nil {
			return err
		}
		body, err = io.ReadAll(c)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	_, b, ok := bytes.Cut(body, []byte("\r\n\r\n"))
	if !ok {
		t.Fatalf("GET %s: %q", path, body)
	}
	return b
}

// TestIdentitiesThroughSmeshd: smeshd numbers the identities of its
// [capture] cgroup and of two [[capture.workloads]] below it (one named,
// one by default), shows them on /debug/identities, and the connections it
// relays from each workload carry that workload's identity (the dialer's
// context; /debug/connections shows it), bytes through the mesh. A
// workload in a network namespace of its own (as a pod is) is known by its
// address there (smesh_addr_ids, for same-node policy); the node's own
// namespace, shared by the others, names none.
func TestIdentitiesThroughSmeshd(t *testing.T) {
	w := newSmeshdWorld(t)
	pay, web := filepath.Join(w.enrolled, "pay.service"), filepath.Join(w.enrolled, "web.service")
	srv := filepath.Join(w.enrolled, "srv.service")
	for _, cg := range []string{pay, web, srv} {
		if err := os.Mkdir(cg, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	const payID = "spiffe://smesh.local/ns/prod/sa/payments"
	host, _ := os.Hostname()
	webID := "spiffe://smesh.local/node/" + host + "/unit/web.service"
	enrolledID := "spiffe://smesh.local/node/" + host + "/unit/" + filepath.Base(w.enrolled)
	// Copy mode: smeshd relays same-node connections, so it accepts them.
	conf := w.conf + fmt.Sprintf("[datapath]\nmode = \"copy\"\n[[capture.workloads]]\ncgroup = %q\nidentity = %q\n[[capture.workloads]]\ncgroup = %q\n[[capture.workloads]]\ncgroup = %q\n",
		pay, payID, web, srv)
	if err := os.WriteFile(w.path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	smeshd := testenv.StartProcess(t, w.smeshCg, w.node.Name, w.exe, "-c", w.path)
	waitStderr(t, smeshd, "smeshd ready", 1)

	var doc struct {
		Node       string
		Identities []struct {
			Cgroup   string
			CgroupID uint64
			Identity string
			Number   uint32
			From     string
		}
	}
	body := adminGet(t, w.node, "/debug/identities")
	if err := json.Unmarshal(body, &doc); err != nil {
		t.Fatalf("/debug/identities: %v: %s", err, body)
	}
	srvID := "spiffe://smesh.local/node/" + host + "/unit/srv.service"
	want := map[string]string{pay: payID, web: webID, srv: srvID, w.enrolled: enrolledID}
	numbers := make(map[uint32]bool)
	for _, e := range doc.Identities {
		if want[e.Cgroup] != e.Identity || e.Number < 2 || e.CgroupID == 0 || numbers[e.Number] {
			t.Errorf("/debug/identities: %+v", e)
		}
		numbers[e.Number] = true
		delete(want, e.Cgroup)
	}
	if len(want) > 0 {
		t.Errorf("/debug/identities lacks %v: %s", want, body)
	}

	echo := w.echoServer(t)
	other := filepath.Join(w.enrolled, "other")
	if err := os.Mkdir(other, 0o755); err != nil {
		t.Fatal(err)
	}
	wantFrom := map[string]string{pay: payID, web: webID, other: enrolledID}
	for cg := range wantFrom {
		h := testenv.StartHelper(t, cg, w.node.Name, "hold-echo", echo)
		if line, err := h.ReadLine(10 * time.Second); err != nil || line != "ok" {
			t.Fatalf("from %s: %q, %v (%s)", cg, line, err, h.Stderr())
		}
	}
	var conns struct {
		Connections []struct {
			SourceIdentity string `json:"source_identity"`
			OriginalDst    string `json:"original_dst"`
			Path           string
		}
	}
	body = adminGet(t, w.node, "/debug/connections")
	if err := json.Unmarshal(body, &conns); err != nil {
		t.Fatalf("/debug/connections: %v: %s", err, body)
	}
	got := make(map[string]int)
	for _, c := range conns.Connections {
		if c.OriginalDst == echo {
			got[c.SourceIdentity]++
		}
	}
	for _, id := range wantFrom {
		if got[id] != 1 {
			t.Errorf("connections from %s: %d, want 1 (/debug/connections: %s)", id, got[id], body)
		}
	}

	// A workload in a namespace of its own: its address there names it.
	var srvNum uint32
	for _, e := range doc.Identities {
		if e.Cgroup == srv {
			srvNum = e.Number
		}
	}
	pod := testenv.NewNode(t)
	nodeAddr, podAddr := testenv.Link(t, w.node, pod)
	h := testenv.StartHelper(t, srv, pod.Name, "wait")
	if line, err := h.ReadLine(10 * time.Second); err != nil || line != "ok" {
		t.Fatalf("in %s: %q, %v", pod.Name, line, err)
	}
	var addrs struct{ Addresses map[string]uint32 }
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		body = adminGet(t, w.node, "/debug/identities")
		if err := json.Unmarshal(body, &addrs); err != nil {
			t.Fatalf("/debug/identities: %v: %s", err, body)
		}
		if addrs.Addresses[podAddr.String()] == srvNum || time.Now().After(deadline) {
			break
		}
	}
	if n, ok := addrs.Addresses[podAddr.String()]; !ok || n != srvNum {
		t.Errorf("address %s of %s's namespace: number %d, %v; want %d (/debug/identities: %s)", podAddr, srv, n, ok, srvNum, body)
	}
	if n, ok := addrs.Addresses[nodeAddr.String()]; ok {
		t.Errorf("the node's own address %s names workload %d", nodeAddr, n)
	}
	if t.Failed() {
		t.Log(strings.TrimSpace(smeshd.Stderr()))
	}
}
