package datapath

import (
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/smesh-dev/smesh/pkg/sockmem"
	"golang.org/x/sys/unix"
)

// The bounded sk_msg program (skmsg.c) reads how many bytes wait at the
// peer from psock->msg_tot_len (Linux 6.18; in Debian's 6.12 since 6.12.75)
// or, without that field, from the peer's sk_rmem_alloc, which counts
// redirected bytes only on kernels that charge them to the receiver (Linux
// 6.13; stable updates 6.1.123, 6.6.69, 6.12.y). On a kernel with neither,
// the program loads and verifies but always reads 0, and the bound never
// triggers: loading it proves nothing. probeQueueVisible tells such a
// kernel apart, by BTF for the field and, without it, by redirecting bytes
// and looking at the receiver.

// probeQueueVisible returns nil when the bounded program can see a peer's
// queue on this kernel.
func probeQueueVisible() error {
	field, err := hasMsgTotLen()
	if err != nil || field {
		return err
	}
	charged, err := redirectedBytesCharged()
	if err != nil {
		return fmt.Errorf("checking whether redirected bytes count in the receiver's sk_rmem_alloc: %w", err)
	}
	if !charged {
		return errors.New("this kernel neither has psock->msg_tot_len (Linux 6.18, 6.12.75) nor charges redirected bytes " +
			"to the receiver's sk_rmem_alloc (6.13, 6.1.123, 6.6.69): the bound would never see a queue")
	}
	return nil
}

// hasMsgTotLen says whether the kernel's struct sk_psock has msg_tot_len.
func hasMsgTotLen() (bool, error) {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return false, err
	}
	var psock *btf.Struct
	if err := spec.TypeByName("sk_psock", &psock); err != nil {
		return false, fmt.Errorf("kernel BTF: %w", err)
	}
	for _, m := range psock.Members {
		if m.Name == "msg_tot_len" {
			return true, nil
		}
	}
	return false, nil
}

// chargeProbeBytes is how much redirectedBytesCharged sends.
const chargeProbeBytes = 64 << 10

// redirectedBytesCharged connects a TCP socket pair on loopback, puts both
// in a sockmap of its own whose sk_msg program redirects every send into
// the receive queue of the socket at key 0 (as smesh's splice does), sends
// chargeProbeBytes that nobody reads, and reports whether the receiver's
// sk_rmem_alloc (SO_MEMINFO) grew by them.
func redirectedBytesCharged() (bool, error) {
	sockmap, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.SockMap, KeySize: 4, ValueSize: 4, MaxEntries: 2})
	if err != nil {
		return false, fmt.Errorf("creating a sockmap: %w", err)
	}
	defer sockmap.Close()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.SkMsg,
		License: "Dual BSD/GPL",
		Instructions: asm.Instructions{
			// return bpf_msg_redirect_map(msg, sockmap, 0, BPF_F_INGRESS)
			asm.LoadMapPtr(asm.R2, sockmap.FD()),
			asm.Mov.Imm(asm.R3, 0),
			asm.Mov.Imm(asm.R4, 1),
			asm.FnMsgRedirectMap.Call(),
			asm.Return(),
		},
	})
	if err != nil {
		return false, fmt.Errorf("loading the probe's sk_msg program: %w", err)
	}
	defer prog.Close()
	attach := link.RawAttachProgramOptions{Target: sockmap.FD(), Program: prog, Attach: ebpf.AttachSkMsgVerdict}
	if err := link.RawAttachProgram(attach); err != nil {
		return false, fmt.Errorf("attaching the probe's sk_msg program: %w", err)
	}
	defer link.RawDetachProgram(link.RawDetachProgramOptions(attach))

	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return false, err
	}
	defer ln.Close()
	sender, err := net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		return false, err
	}
	defer sender.Close()
	ln.SetDeadline(time.Now().Add(5 * time.Second))
	receiver, err := ln.AcceptTCP()
	if err != nil {
		return false, err
	}
	defer receiver.Close()
	if receiver.RemoteAddr().String() != sender.LocalAddr().String() {
		// connect4 sent the connection elsewhere: this process is in an
		// enrolled cgroup.
		return false, fmt.Errorf("the probe's own connection was captured (%s reached the listener as %s): run it outside the enrolled cgroups",
			sender.LocalAddr(), receiver.RemoteAddr())
	}
	for key, c := range []*net.TCPConn{receiver, sender} {
		fd, err := connFD(c)
		if err != nil {
			return false, err
		}
		if err := sockmap.Update(uint32(key), uint32(fd), ebpf.UpdateAny); err != nil {
			return false, fmt.Errorf("adding a socket to the sockmap: %w", err)
		}
	}
	sender.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := sender.Write(make([]byte, chargeProbeBytes)); err != nil {
		return false, fmt.Errorf("sending through the redirect: %w", err)
	}
	// The redirect queues the bytes at the receiver within the send, and
	// TCP carries none of them: were it otherwise, the receiver's
	// sk_rmem_alloc would count TCP's bytes.
	if sent, err := bytesSent(sender); err != nil {
		return false, err
	} else if sent > 0 {
		return false, fmt.Errorf("the sk_msg redirect did not take the bytes: TCP sent %d", sent)
	}
	mem, err := sockmem.Read(receiver)
	if err != nil {
		return false, err
	}
	return mem.RmemAlloc >= chargeProbeBytes/2, nil
}

// bytesSent is TCP_INFO's tcpi_bytes_sent: what TCP itself transmitted.
func bytesSent(c *net.TCPConn) (uint64, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var info *unix.TCPInfo
	var serr error
	err = rc.Control(func(fd uintptr) { info, serr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) })
	if err == nil {
		err = serr
	}
	if err != nil {
		return 0, fmt.Errorf("TCP_INFO: %w", err)
	}
	return info.Bytes_sent, nil
}

func connFD(c *net.TCPConn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var fd int
	err = rc.Control(func(f uintptr) { fd = int(f) })
	return fd, err
}
