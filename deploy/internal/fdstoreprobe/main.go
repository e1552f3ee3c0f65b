// Command fdstoreprobe is the experiment of docs/restart.md on systemd's file
// descriptor store (TestSystemdFDStore runs it as a unit in a container):
// does a listening socket, and a BPF object, given to systemd with
// FDSTORE=1 come back to the next process of the unit after `systemctl
// restart`, after a crash restart (Restart=on-failure), after `systemctl
// stop` + start, and does the socket queue connections meanwhile?
//
//	fdstoreprobe serve ADDR     the unit's process: takes "listener" and
//	                            "bpfmap" from LISTEN_FDS/LISTEN_FDNAMES or
//	                            makes them and stores them (FDSTORE=1), then
//	                            answers each connection with one line
//	fdstoreprobe client ADDR    prints that line (or the error)
//
// The line: "pid=P gen=G listener=INODE inherited=BOOL map=BOOL". gen counts
// the processes that held the BPF map (its one value, incremented by each).
package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: fdstoreprobe serve|client|master ADDR | worker - | stream ADDR DURATION")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2])
	case "client":
		err = client(os.Args[2])
	case "master":
		err = master(os.Args[2])
	case "worker":
		err = worker()
	case "stream":
		if len(os.Args) != 4 {
			err = fmt.Errorf("stream ADDR DURATION")
		} else {
			err = stream(os.Args[2], os.Args[3])
		}
	default:
		err = fmt.Errorf("unknown mode %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "fdstoreprobe:", err)
		os.Exit(1)
	}
}

func client(addr string) error {
	start := time.Now()
	c, err := net.DialTimeout("tcp4", addr, 10*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	fmt.Printf("%s waited=%dms\n", strings.TrimSpace(line), time.Since(start).Milliseconds())
	return nil
}

// inherited returns the descriptors systemd passed, by name (sd_listen_fds).
func inherited() map[string]*os.File {
	out := make(map[string]*os.File)
	if os.Getenv("LISTEN_PID") != strconv.Itoa(os.Getpid()) {
		return out
	}
	n, _ := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	names := strings.Split(os.Getenv("LISTEN_FDNAMES"), ":")
	for i := 0; i < n; i++ {
		fd := 3 + i
		unix.CloseOnExec(fd)
		name := "unknown"
		if i < len(names) {
			name = names[i]
		}
		out[name] = os.NewFile(uintptr(fd), name)
	}
	return out
}

// notify sends state to systemd, with fds as SCM_RIGHTS.
func notify(state string, fds ...int) error {
	sock := os.Getenv("NOTIFY_SOCKET")
	if sock == "" {
		return fmt.Errorf("no NOTIFY_SOCKET")
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	// x/sys/unix makes a leading '@' an abstract address, as systemd means it.
	return unix.Sendmsg(fd, []byte(state), oob, &unix.SockaddrUnix{Name: sock}, 0)
}

func serve(addr string) error {
	files := inherited()
	fmt.Printf("inherited: %v (LISTEN_FDNAMES=%q)\n", keys(files), os.Getenv("LISTEN_FDNAMES"))
	var ln net.Listener
	var err error
	lf, wasInherited := files["listener"]
	if wasInherited {
		ln, err = net.FileListener(lf)
	} else {
		ln, err = net.Listen("tcp4", addr)
		if err == nil {
			lf, err = ln.(*net.TCPListener).File()
		}
		if err == nil {
			err = notify("FDSTORE=1\nFDNAME=listener", int(lf.Fd()))
		}
	}
	if err != nil {
		return fmt.Errorf("listener: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(lf.Fd()), &st); err != nil {
		return err
	}

	var m *ebpf.Map
	mapInherited := false
	if mf, ok := files["bpfmap"]; ok {
		m, err = ebpf.NewMapFromFD(int(mf.Fd()))
		mapInherited = err == nil
	} else {
		m, err = ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
		if err == nil {
			// systemd polls stored descriptors for POLLHUP to drop them;
			// a BPF map cannot be polled (epoll_ctl: EPERM) unless FDPOLL=0.
			err = notify("FDSTORE=1\nFDNAME=bpfmap"+os.Getenv("PROBE_FDPOLL"), m.FD())
		}
	}
	if err != nil {
		return fmt.Errorf("bpf map: %w", err)
	}
	// A second map, stored without FDPOLL=0: does systemd keep it?
	_, polledKept := files["bpfmap-polled"]
	if !polledKept {
		if m2, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1}); err == nil {
			if err := notify("FDSTORE=1\nFDNAME=bpfmap-polled", m2.FD()); err != nil {
				return err
			}
			m2.Close()
		}
	}
	linkKept, err := cgroupLink(files["link"])
	if err != nil {
		return fmt.Errorf("cgroup link: %w", err)
	}
	var gen uint64
	m.Lookup(uint32(0), &gen)
	gen++
	if err := m.Put(uint32(0), gen); err != nil {
		return err
	}

	if d, err := time.ParseDuration(os.Getenv("PROBE_START_DELAY")); err == nil {
		time.Sleep(d) // a slow start: connections wait in the queue meanwhile
	}
	if err := notify("READY=1"); err != nil {
		return err
	}
	fmt.Printf("serving: listener inode %d inherited=%v, map gen %d inherited=%v\n", st.Ino, wasInherited, gen, mapInherited)
	term := make(chan os.Signal, 1)
	signalNotify(term)
	go func() { <-term; os.Exit(0) }()
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		fmt.Fprintf(c, "pid=%d gen=%d listener=%d inherited=%v map=%v polledmap=%v link=%v\n", os.Getpid(), gen, st.Ino, wasInherited, mapInherited, polledKept, linkKept)
		c.Close()
	}
}

func keys(m map[string]*os.File) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func signalNotify(c chan os.Signal) { signal.Notify(c, syscall.SIGTERM) }

// cgroupLink adopts the stored cgroup/connect4 link (kept: true), or
// attaches a program that allows every connect to the unit's own cgroup and
// stores the link with FDPOLL=0.
func cgroupLink(f *os.File) (kept bool, err error) {
	if f != nil {
		l, err := link.NewFromFD(int(f.Fd()))
		if err != nil {
			return false, err
		}
		info, err := l.Info()
		if err != nil {
			return false, err
		}
		if info.Type != link.CgroupType {
			return false, fmt.Errorf("stored link of type %v", info.Type)
		}
		return true, nil // held for the life of the process
	}
	data, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return false, err
	}
	_, path, _ := strings.Cut(strings.TrimSpace(string(data)), "::")
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.CGroupSockAddr,
		AttachType:   ebpf.AttachCGroupInet4Connect,
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()},
		License:      "GPL",
	})
	if err != nil {
		return false, err
	}
	defer prog.Close()
	l, err := link.AttachCgroup(link.CgroupOptions{Path: "/sys/fs/cgroup" + path, Attach: ebpf.AttachCGroupInet4Connect, Program: prog})
	if err != nil {
		return false, err
	}
	fd := l.(interface{ FD() int }).FD()
	return false, notify("FDSTORE=1\nFDNAME=link\nFDPOLL=0", fd)
}
