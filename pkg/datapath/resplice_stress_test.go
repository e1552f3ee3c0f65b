package datapath

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// The helper of TestRespliceStress (resplice_test.go): one spliced
// loopback connection, a writer that sends in bursts and a reader that
// alternates fast and slow phases, so that the direction is demoted (the
// reader's queue passes splice_queue_limit) and, with resplice, spliced
// again once it caught up, over and over. Every byte is checked.
//
// Encoding: writer w (0 or 1) sends byte w<<7 | n%127, n its own byte
// count; a reader checks that the bytes of each writer follow each other.
// A reorder or a loss shows as a break (unless it moves a multiple of 127
// bytes: sizes are random). With two reader threads only each read is
// checked on its own (which thread got which bytes first is theirs to race).

// stressDir is one direction of the connection: its writers and readers.
type stressDir struct {
	written, read atomic.Int64
	// inRead is when each reader's current read began (unix ns), 0 when
	// it is not in a read.
	inRead [2]atomic.Int64
	// target is what the current read waits for before it returns: 1,
	// its size with MSG_WAITALL, SO_RCVLOWAT (capped by its size).
	target    [2]atomic.Int64
	lowat     int64
	breaks    atomic.Int64
	mu        sync.Mutex
	next      [2]int64 // per writer: its byte count expected next
	stalls    atomic.Int64
	maxBlock  atomic.Int64 // longest read in ns while bytes were owed
	name      string
	perRead   bool // two readers: check each read on its own
	firstBrk  atomic.Int64
	stopWrite atomic.Bool
	// eagain counts blocking reads that returned EAGAIN: tcp_bpf_recvmsg
	// takes a wake-up without data as "no data" (README), not an end.
	eagain atomic.Int64
}

// check checks the bytes one read returned.
func (d *stressDir) check(b []byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var local [2]int64
	var seen [2]bool
	for _, c := range b {
		w := c >> 7
		got := int64(c & 0x7f)
		exp := &d.next[w]
		if d.perRead {
			if !seen[w] {
				seen[w] = true
				local[w] = got
			}
			exp = &local[w]
		}
		if *exp%127 != got {
			if d.breaks.Add(1) == 1 {
				d.firstBrk.Store(time.Now().UnixNano())
			}
			*exp += (got - *exp%127 + 127) % 127
		}
		*exp++
	}
	d.read.Add(int64(len(b)))
}

// writeLoop sends in bursts on fd as writer w: a burst of 1/2 to 4 queue
// limits in writes of 1 B to 64 KiB, then (one burst in two) waits until
// the reader read everything, at most 1.5 s, as a request-response
// exchange would.
func (d *stressDir) writeLoop(fd, w int, limit int, seed uint64) error {
	runtime.LockOSThread()
	r := rand.New(rand.NewPCG(seed, uint64(w)))
	buf := make([]byte, 64<<10)
	var n int64
	send := func(size int) error {
		for i := range size {
			buf[i] = byte(w<<7) | byte((n+int64(i))%127)
		}
		sent := 0
		for sent < size {
			m, err := unix.Write(fd, buf[sent:size])
			if err != nil {
				return fmt.Errorf("%s writer %d: %w", d.name, w, err)
			}
			sent += m
		}
		n += int64(size)
		d.written.Add(int64(size))
		return nil
	}
	for !d.stopWrite.Load() {
		burst := limit/2 + r.IntN(4*limit)
		for burst > 0 && !d.stopWrite.Load() {
			size := 1 + r.IntN(len(buf))
			if r.IntN(4) == 0 {
				size = 1 + r.IntN(512)
			}
			size = min(size, burst)
			if err := send(size); err != nil {
				return err
			}
			burst -= size
		}
		if r.IntN(2) == 0 {
			deadline := time.Now().Add(1500 * time.Millisecond)
			for d.read.Load() < d.written.Load() && !d.needsMore() && time.Now().Before(deadline) && !d.stopWrite.Load() {
				time.Sleep(100 * time.Microsecond)
			}
		}
	}
	// Stopped: complete the read a reader waits in (MSG_WAITALL,
	// SO_RCVLOWAT), for up to 3 s, so that every byte written is read.
	deadline := time.Now().Add(3 * time.Second)
	for w == 0 && d.read.Load() < d.written.Load() && time.Now().Before(deadline) {
		if more := d.needed(); more > 0 {
			if err := send(int(min(more, int64(len(buf))))); err != nil {
				return err
			}
		}
		time.Sleep(time.Millisecond)
	}
	return nil
}

// needsMore says whether a reader waits in a read that the bytes written
// so far cannot complete (MSG_WAITALL, SO_RCVLOWAT): the writer must go on.
func (d *stressDir) needsMore() bool {
	avail := d.written.Load() - d.read.Load()
	for i := range d.inRead {
		if d.inRead[i].Load() != 0 && avail < d.target[i].Load() {
			return true
		}
	}
	return false
}

// needed is how many more bytes the read reader 0 waits in needs.
func (d *stressDir) needed() int64 {
	if d.inRead[0].Load() == 0 {
		return 0
	}
	return d.target[0].Load() - (d.written.Load() - d.read.Load())
}

// startRead records that reader i begins a read of size bytes.
func (d *stressDir) startRead(i, size, flags int) {
	target := int64(1)
	if flags&unix.MSG_WAITALL != 0 {
		target = int64(size)
	} else if d.lowat > 1 {
		// tcp_data_ready wakes a reader only once SO_RCVLOWAT bytes
		// are queued beyond what its read already copied
		// (tcp_epollin_ready compares rcv_nxt - copied_seq with
		// sk_rcvlowat, not with what the read still needs): without
		// any mesh, a read that copied part of its target waits for a
		// whole SO_RCVLOWAT more.
		target = min(int64(size), d.lowat) + d.lowat - 1
	}
	d.target[i].Store(target)
	d.inRead[i].Store(time.Now().UnixNano())
}

// readLoop reads fd (blocking) as reader i: flags MSG_WAITALL or 0; fast
// phases (5 ms of reads of up to 64 KiB) alternate with slow ones (5 ms
// of 4 KiB reads 500 us apart). Returns at EOF or error.
func (d *stressDir) readLoop(fd, i, flags int, seed uint64) {
	runtime.LockOSThread()
	r := rand.New(rand.NewPCG(seed, uint64(i)+10))
	buf := make([]byte, 64<<10)
	for {
		phase := time.Now()
		slow := r.IntN(2) == 0
		for time.Since(phase) < 5*time.Millisecond {
			size := 1 + r.IntN(len(buf))
			if slow {
				size = 4 << 10
			}
			d.startRead(i, size, flags)
			n, _, err := unix.Recvfrom(fd, buf[:size], flags)
			d.inRead[i].Store(0)
			if err == unix.EINTR {
				continue
			}
			if err == unix.EAGAIN {
				d.eagain.Add(1)
				continue
			}
			if err != nil || n == 0 {
				if err != nil && !d.stopWrite.Load() {
					fmt.Printf("read error %s reader %d: %v\n", d.name, i, err)
				}
				return
			}
			d.check(buf[:n])
			if slow {
				time.Sleep(500 * time.Microsecond)
			}
		}
	}
}

// goReadLoop is readLoop for a Go (non-blocking, netpoller) reader.
func (d *stressDir) goReadLoop(c net.Conn, seed uint64) {
	r := rand.New(rand.NewPCG(seed, 20))
	buf := make([]byte, 64<<10)
	for {
		phase := time.Now()
		slow := r.IntN(2) == 0
		for time.Since(phase) < 5*time.Millisecond {
			size := 1 + r.IntN(len(buf))
			if slow {
				size = 4 << 10
			}
			d.startRead(0, size, 0)
			n, err := c.Read(buf[:size])
			d.inRead[0].Store(0)
			if n > 0 {
				d.check(buf[:n])
			}
			if err != nil {
				return
			}
			if slow {
				time.Sleep(500 * time.Microsecond)
			}
		}
	}
}

// watch is the watchdog: a read blocked for more than 1 s while the bytes
// owed would complete it (its target) is a stall (counted once per read).
func (d *stressDir) watch(now int64, flagged *[2]int64) {
	owed := d.written.Load() - d.read.Load()
	for i := range d.inRead {
		since := d.inRead[i].Load()
		if since == 0 || owed < d.target[i].Load() || owed <= 0 {
			continue
		}
		blocked := now - since
		if blocked > d.maxBlock.Load() {
			d.maxBlock.Store(blocked)
		}
		if blocked > int64(time.Second) && flagged[i] != since {
			flagged[i] = since
			d.stalls.Add(1)
			fmt.Printf("stall %s reader %d at %d: blocked %v, %d bytes owed\n", d.name, i, now, time.Duration(blocked), owed)
		}
	}
}

// loopbackPair connects two blocking sockets on 127.0.0.1 with raw
// syscalls (the helper's cgroup is enrolled: sock_ops splices them).
func loopbackPair() (client, server int, err error) {
	ln, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, 0, err
	}
	defer unix.Close(ln)
	if err := unix.Bind(ln, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		return 0, 0, err
	}
	if err := unix.Listen(ln, 1); err != nil {
		return 0, 0, err
	}
	sa, err := unix.Getsockname(ln)
	if err != nil {
		return 0, 0, err
	}
	if client, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0); err != nil {
		return 0, 0, err
	}
	if err := unix.Connect(client, sa); err != nil {
		return 0, 0, err
	}
	if server, _, err = unix.Accept4(ln, unix.SOCK_CLOEXEC); err != nil {
		return 0, 0, err
	}
	return client, server, nil
}

// respliceStress runs scenario args[0] for args[1] seconds with queue
// limit args[2], and prints "stall ..." lines as they happen and one
// "result ..." line per direction, then "done". Scenarios: nonblock (a
// Go reader), plain (a blocking reader, target 1), waitall (MSG_WAITALL),
// lowat (SO_RCVLOWAT 4 KiB), tworeaders (two blocking threads, target
// 1), twowriters (two writer threads, a plain reader), duplex (plain
// readers and a writer on both sockets), duplex-waitall.
func respliceStress(args []string) int {
	scenario := args[0]
	secs, _ := strconv.Atoi(args[1])
	limit, _ := strconv.Atoi(args[2])
	client, server, err := loopbackPair()
	if err != nil {
		fmt.Println("pair:", err)
		return 1
	}
	// One byte each way first: both directions splice, so a demoted
	// socket is released to plain TCP only once the other direction has
	// closed too, which takes a send of its own (close_own in skmsg.c,
	// release() in sockops.c): in the duplex scenarios.
	for _, fds := range [][2]int{{server, client}, {client, server}} {
		if _, err := unix.Write(fds[0], []byte{0}); err != nil {
			fmt.Println("hello:", err)
			return 1
		}
		if _, _, err := unix.Recvfrom(fds[1], make([]byte, 1), 0); err != nil {
			fmt.Println("hello:", err)
			return 1
		}
	}
	seed := uint64(time.Now().UnixNano())
	fmt.Printf("seed %d\n", seed)

	up := &stressDir{name: "up"}
	dirs := []*stressDir{up}
	var writers sync.WaitGroup
	var werr atomic.Value
	write := func(d *stressDir, fd, w int) {
		writers.Add(1)
		go func() {
			defer writers.Done()
			if err := d.writeLoop(fd, w, limit, seed); err != nil {
				werr.Store(err)
			}
		}()
	}
	switch scenario {
	case "nonblock":
		f := os.NewFile(uintptr(server), "server")
		c, err := net.FileConn(f) // a dup, non-blocking, in the netpoller
		f.Close()
		if err != nil {
			fmt.Println(err)
			return 1
		}
		go up.goReadLoop(c, seed)
		write(up, client, 0)
	case "plain", "waitall", "lowat", "tworeaders", "twowriters":
		flags := 0
		if scenario == "waitall" {
			flags = unix.MSG_WAITALL
		}
		if scenario == "lowat" {
			up.lowat = 4 << 10
			if err := unix.SetsockoptInt(server, unix.SOL_SOCKET, unix.SO_RCVLOWAT, int(up.lowat)); err != nil {
				fmt.Println(err)
				return 1
			}
		}
		go up.readLoop(server, 0, flags, seed)
		if scenario == "tworeaders" {
			up.perRead = true
			go up.readLoop(server, 1, flags, seed)
		}
		write(up, client, 0)
		if scenario == "twowriters" {
			write(up, client, 1)
		}
	case "duplex", "duplex-waitall":
		flags := 0
		if scenario == "duplex-waitall" {
			flags = unix.MSG_WAITALL
		}
		down := &stressDir{name: "down"}
		dirs = append(dirs, down)
		go up.readLoop(server, 0, flags, seed)
		go down.readLoop(client, 0, flags, seed+1)
		write(up, client, 0)
		write(down, server, 0)
	default:
		fmt.Println("unknown scenario", scenario)
		return 1
	}

	start := time.Now()
	flagged := make([][2]int64, len(dirs))
	stuck := false
	for time.Since(start) < time.Duration(secs)*time.Second && !stuck {
		time.Sleep(50 * time.Millisecond)
		now := time.Now().UnixNano()
		for i, d := range dirs {
			d.watch(now, &flagged[i])
			// Blocked 5 s with bytes owed: the writer's gate gave up
			// long ago and more bytes did not free the reader.
			if s := d.inRead[0].Load(); s != 0 && now-s > int64(5*time.Second) && d.written.Load()-d.read.Load() >= d.target[0].Load() {
				stuck = true
			}
		}
	}
	for _, d := range dirs {
		d.stopWrite.Store(true)
	}
	writers.Wait()
	// Drain: every byte written must arrive.
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		done := true
		for _, d := range dirs {
			done = done && d.read.Load() == d.written.Load()
		}
		if done {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	for i, d := range dirs {
		d.watch(time.Now().UnixNano(), &flagged[i])
		brk := int64(0)
		if d.breaks.Load() > 0 {
			brk = d.firstBrk.Load()
		}
		fmt.Printf("result %s written=%d read=%d breaks=%d first_break=%d stalls=%d max_block_ms=%d stuck=%v elapsed_ms=%d start=%d eagain=%d\n",
			d.name, d.written.Load(), d.read.Load(), d.breaks.Load(), brk, d.stalls.Load(),
			d.maxBlock.Load()/int64(time.Millisecond), stuck, time.Since(start).Milliseconds(), start.UnixNano(), d.eagain.Load())
	}
	if err, ok := werr.Load().(error); ok {
		fmt.Println("write error:", err)
	}
	fmt.Println("done")
	// Threads blocked in recv stay there: the process exits under them.
	unix.Shutdown(client, unix.SHUT_RDWR)
	unix.Shutdown(server, unix.SHUT_RDWR)
	return 0
}
