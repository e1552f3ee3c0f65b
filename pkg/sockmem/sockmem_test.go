package sockmem

import (
	"net"
	"testing"
	"time"
)

// TestRead: bytes sent to a socket that does not read them show in its
// receive memory; a closed socket's cannot be read.
func TestRead(t *testing.T) {
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	sender, err := net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer sender.Close()
	receiver, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	defer receiver.Close()

	before, err := Read(receiver)
	if err != nil {
		t.Fatal(err)
	}
	if before.RmemAlloc != 0 || before.Rcvbuf <= 0 {
		t.Fatalf("a fresh socket: %+v", before)
	}
	const n = 32 << 10
	if _, err := sender.Write(make([]byte, n)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		got, err := Read(receiver)
		if err != nil {
			t.Fatal(err)
		}
		if got.RmemAlloc >= n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d bytes sent, the receiver holds %d", n, got.RmemAlloc)
		}
		time.Sleep(time.Millisecond)
	}
	ln.Close()
	if _, err := Read(ln); err != nil {
		t.Logf("a closed listener: %v", err)
	} else {
		t.Error("reading a closed socket's memory did not fail")
	}
}
