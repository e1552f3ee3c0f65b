package main

// The master/worker experiment of docs/restart.md (TestSystemdKillMode):
// can connections a process relays outlive `systemctl restart` when that
// process is not the unit's main process?
//
//	fdstoreprobe master ADDR    the unit's main process: takes the listener
//	                            from the fd store (or makes and stores it),
//	                            starts a worker with it; on SIGTERM tells the
//	                            worker to drain (SIGUSR1) and exits at once
//	fdstoreprobe worker         serves the listener on fd 3: each connection
//	                            gets "pid=P", then its lines echoed; on
//	                            SIGUSR1 stops accepting and exits once its
//	                            connections ended (15s at most)
//	fdstoreprobe stream ADDR D  a long-lived connection: one exchange every
//	                            100ms for D, each checked

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"
)

func master(addr string) error {
	files := inherited()
	lf, ok := files["listener"]
	if !ok {
		ln, err := net.Listen("tcp4", addr)
		if err != nil {
			return err
		}
		if lf, err = ln.(*net.TCPListener).File(); err != nil {
			return err
		}
		ln.Close()
		if err := notify("FDSTORE=1\nFDNAME=listener", int(lf.Fd())); err != nil {
			return err
		}
	}
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	w := exec.Command("/proc/self/exe", "worker", "-")
	w.ExtraFiles = []*os.File{lf}
	w.Stdout, w.Stderr = os.Stdout, os.Stderr
	if err := w.Start(); err != nil {
		return err
	}
	fmt.Printf("master %d: worker %d started (listener inherited=%v)\n", os.Getpid(), w.Process.Pid, ok)
	if err := notify("READY=1"); err != nil {
		return err
	}
	<-term
	fmt.Printf("master %d: SIGTERM: worker %d drains, master exits\n", os.Getpid(), w.Process.Pid)
	if os.Getenv("PROBE_SCOPE") != "" {
		// Out of the unit, into a transient scope of its own: systemd then
		// neither kills it with the unit (KillMode=mixed) nor finds it
		// left over at the next start.
		scope := fmt.Sprintf("probe-drain-%d.scope", w.Process.Pid)
		out, err := exec.Command("busctl", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
			"org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
			scope, "fail", "2", "PIDs", "au", "1", fmt.Sprint(w.Process.Pid),
			"RuntimeMaxUSec", "t", "20000000", "0").CombinedOutput()
		fmt.Printf("master %d: worker %d moved to %s: %v %s\n", os.Getpid(), w.Process.Pid, scope, err, strings.TrimSpace(string(out)))
	}
	w.Process.Signal(syscall.SIGUSR1)
	return nil
}

func worker() error {
	ln, err := net.FileListener(os.NewFile(3, "listener"))
	if err != nil {
		return err
	}
	drain := make(chan os.Signal, 1)
	signal.Notify(drain, syscall.SIGUSR1)
	var wg sync.WaitGroup
	go func() {
		<-drain
		fmt.Printf("worker %d: draining\n", os.Getpid())
		ln.Close()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			fmt.Fprintf(c, "pid=%d\n", os.Getpid())
			r := bufio.NewReader(c)
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				c.Write([]byte(line))
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		fmt.Printf("worker %d: drained, exiting\n", os.Getpid())
	case <-time.After(15 * time.Second):
		fmt.Printf("worker %d: drain timeout, exiting\n", os.Getpid())
	}
	return nil
}

func stream(addr, dur string) error {
	d, err := time.ParseDuration(dur)
	if err != nil {
		return err
	}
	c, err := net.DialTimeout("tcp4", addr, 10*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	r := bufio.NewReader(c)
	first, err := r.ReadString('\n')
	if err != nil {
		return err
	}
	n := 0
	for end := time.Now().Add(d); time.Now().Before(end); n++ {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		want := fmt.Sprintf("exchange %d\n", n)
		if _, err := c.Write([]byte(want)); err != nil {
			return fmt.Errorf("stream %s: exchange %d: %w", strings.TrimSpace(first), n, err)
		}
		got, err := r.ReadString('\n')
		if err != nil || got != want {
			return fmt.Errorf("stream %s: exchange %d: got %q, %v", strings.TrimSpace(first), n, got, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	fmt.Printf("stream %s exchanges=%d ok\n", strings.TrimSpace(first), n)
	return nil
}
