package datapath

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/proxy"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

func TestMain(m *testing.M) {
	helpers := map[string]testenv.HelperFunc{
		"connect-loop":    connectLoop,
		"splice-pair":     splicePair,
		"connect-hold":    connectHold,
		"origdst-proxy":   origDstProxy,
		"dial-report":     dialReport,
		"strict-server":   strictServer,
		"strict-dial":     strictDial,
		"resplice-stress": respliceStress,
		"bulk-pair":       bulkPair,
		"keepalive":       keepAlive,
	}
	maps.Copy(helpers, identityHelpers)
	testenv.RunHelpers(helpers)
	os.Exit(m.Run())
}

// connectLoop connects to args[0] over and over (each connection closed at
// once) until "stop" comes on stdin, or for at most a minute and 200,000
// connections, then prints how many connects succeeded and failed.
func connectLoop(args []string) int {
	stop := make(chan struct{})
	go func() {
		bufio.NewScanner(os.Stdin).Scan()
		close(stop)
	}()
	deadline := time.Now().Add(time.Minute)
	ok, failed := 0, 0
	for ok+failed < 200_000 && time.Now().Before(deadline) {
		select {
		case <-stop:
			fmt.Printf("ok %d failed %d\n", ok, failed)
			return 0
		default:
		}
		c, err := net.DialTimeout("tcp", args[0], time.Second)
		if err != nil {
			failed++
			fmt.Fprintln(os.Stderr, err)
			continue
		}
		c.Close()
		ok++
	}
	fmt.Printf("ok %d failed %d\n", ok, failed)
	return 0
}

// goLoopbackPair connects two Go (non-blocking) sockets on 127.0.0.1: in
// an enrolled helper's cgroup, a same-node hop sock_ops splices.
func goLoopbackPair() (client, server net.Conn, err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, nil, err
	}
	defer ln.Close()
	if client, err = net.Dial("tcp", ln.Addr().String()); err != nil {
		return nil, nil, err
	}
	if server, err = ln.Accept(); err != nil {
		client.Close()
		return nil, nil, err
	}
	return client, server, nil
}

// splicePair makes a loopback connection to itself (both ends in the
// helper's cgroup: a same-node hop sock_ops splices), prints "ready", and
// for every "ping" on stdin sends 256 KiB each way over it, checks every
// byte and prints "ok". Any other line ends it.
func splicePair([]string) int {
	client, server, err := goLoopbackPair()
	if err != nil {
		fmt.Println(err)
		return 1
	}
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for round := 0; in.Scan() && in.Text() == "ping"; round++ {
		for _, dir := range [][2]net.Conn{{client, server}, {server, client}} {
			if err := exchange(dir[0], dir[1], byte(round)); err != nil {
				fmt.Println(err)
				return 1
			}
		}
		fmt.Println("ok")
	}
	return 0
}

// exchange sends 256 KiB from w to r and checks that r reads exactly them.
func exchange(w, r net.Conn, seed byte) error {
	want := make([]byte, 256<<10)
	for i := range want {
		want[i] = seed + byte(i*7)
	}
	errc := make(chan error, 1)
	go func() {
		_, err := w.Write(want)
		errc <- err
	}()
	got := make([]byte, len(want))
	r.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(r, got); err != nil {
		return fmt.Errorf("reading: %w", err)
	}
	if err := <-errc; err != nil {
		return fmt.Errorf("writing: %w", err)
	}
	if !bytes.Equal(got, want) {
		return fmt.Errorf("bytes differ")
	}
	return nil
}

// connectHold connects to args[0] from 64 goroutines over and over; each
// connection waits (up to 20 s) for the one byte the proxy sends once it
// has the connection's original destination, then closes (so the
// destination stays recorded until the proxy asked). Until "stop" on
// stdin, or for at most a minute, then prints how many got their byte.
func connectHold(args []string) int {
	stop := make(chan struct{})
	go func() {
		bufio.NewScanner(os.Stdin).Scan()
		close(stop)
	}()
	deadline := time.Now().Add(time.Minute)
	var ok, failed atomic.Int64
	var wg sync.WaitGroup
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) && ok.Load()+failed.Load() < 100_000 {
				select {
				case <-stop:
					return
				default:
				}
				c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
				if err != nil {
					failed.Add(1)
					fmt.Fprintln(os.Stderr, err)
					continue
				}
				c.SetReadDeadline(time.Now().Add(20 * time.Second))
				var b [1]byte
				if _, err := io.ReadFull(c, b[:]); err != nil {
					failed.Add(1)
					fmt.Fprintln(os.Stderr, "waiting for the proxy:", err)
				} else {
					ok.Add(1)
				}
				c.Close()
			}
		}()
	}
	wg.Wait()
	fmt.Printf("ok %d failed %d\n", ok.Load(), failed.Load())
	return 0
}

// origDstProxy listens on 127.0.0.1 (in the helper's cgroup, as smeshd's
// outbound listener is in smeshd's), prints its address, and answers every
// connection whose SO_ORIGINAL_DST is args[0] with one byte; others it
// closes, counted as failed. It asks args[1] (a duration) after it
// accepted, so that connections accepted before a swap of the programs
// ask after it. "pause" stops accepting (connections queue), "resume"
// accepts again, "count" prints "ok N failed M".
func origDstProxy(args []string) int {
	want := netip.MustParseAddrPort(args[0])
	delay, err := time.ParseDuration(args[1])
	if err != nil {
		fmt.Println(err)
		return 1
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println(err)
		return 1
	}
	fmt.Println(ln.Addr())
	var ok, failed atomic.Int64
	var mu sync.Mutex // held while paused
	go func() {
		for {
			mu.Lock()
			c, err := ln.Accept()
			mu.Unlock()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				time.Sleep(delay)
				dst, err := proxy.OriginalDst(c.(*net.TCPConn))
				if err != nil || dst != want {
					failed.Add(1)
					fmt.Fprintln(os.Stderr, dst, err)
					return
				}
				ok.Add(1)
				c.Write([]byte{1})
			}()
		}
	}()
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		switch in.Text() {
		case "pause":
			mu.Lock()
			fmt.Println("paused")
		case "resume":
			mu.Unlock()
			fmt.Println("resumed")
		case "count":
			fmt.Printf("ok %d failed %d\n", ok.Load(), failed.Load())
		}
	}
	return 0
}
