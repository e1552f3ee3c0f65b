package datapath

import (
	"bytes"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/smesh-dev/smesh/pkg/sockmem"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// The tests of probeQueueVisible compare its answer with what they observe
// themselves, by other means than the probe's: the kernel's BTF read from
// the file, and bytes redirected through a sockhash of the test's own into
// a reader whose memory and queue the test reads with its own calls and
// then drains, checking every byte. Comparing with the probe's own halves
// would pass a probe that always says yes, which enables a bound that
// never sees a queue.

// kernelBTFPath is the kernel's BTF as the kernel exposes it.
const kernelBTFPath = "/sys/kernel/btf/vmlinux"

// TestRedirectedBytesCharged checks probeQueueVisible and its two halves
// against this kernel. On 6.18 both the field and the charge are there; a
// kernel with neither (6.1 before 6.1.123, 6.6 before 6.6.69, 6.12 before
// the stable update) is where a probe that always says yes fails.
// TestQueueProbeWithoutMsgTotLen runs the charge half through the probe as
// a kernel without the field would.
func TestRedirectedBytesCharged(t *testing.T) {
	testenv.RequirePrivileged(t)
	field := btfHasMsgTotLen(t, kernelBTFPath)
	charged := observeCharge(t)
	t.Logf("Linux %s: psock->msg_tot_len: %v; redirected bytes charged to the receiver: %v", KernelRelease(), field, charged)
	checkProbe(t, field, charged)
}

// fakeVmlinuxEnv names, in the process TestQueueProbeWithoutMsgTotLen
// starts, the kernel BTF without msg_tot_len to mount over kernelBTFPath.
const fakeVmlinuxEnv = "SMESH_TEST_FAKE_VMLINUX"

// TestQueueProbeWithoutMsgTotLen runs probeQueueVisible as on a kernel
// without psock->msg_tot_len (before 6.18; Debian 12's 6.1): the test
// binary again, in a mount namespace of its own where kernelBTFPath is this
// kernel's BTF with the field renamed. There the probe must find the field
// missing and answer by the charge, as the test observes it.
func TestQueueProbeWithoutMsgTotLen(t *testing.T) {
	testenv.RequirePrivileged(t)
	if fake := os.Getenv(fakeVmlinuxEnv); fake != "" {
		// The started process: its mounts are its own (CLONE_NEWNS, and
		// Go makes / private in it); they go when it exits.
		if err := unix.Mount(fake, kernelBTFPath, "", unix.MS_BIND, ""); err != nil {
			t.Fatalf("mounting %s over %s: %v", fake, kernelBTFPath, err)
		}
		if btfHasMsgTotLen(t, kernelBTFPath) {
			t.Fatalf("%s still has psock->msg_tot_len after mounting %s over it", kernelBTFPath, fake)
		}
		checkProbe(t, false, observeCharge(t))
		return
	}

	fake := filepath.Join(t.TempDir(), "vmlinux")
	writeVmlinuxWithoutMsgTotLen(t, fake)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^TestQueueProbeWithoutMsgTotLen$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), fakeVmlinuxEnv+"="+fake)
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestQueueProbeWithoutMsgTotLen") {
		t.Fatalf("the probe with a kernel BTF without msg_tot_len: %v\n%s", err, out)
	}
	t.Logf("the probe with a kernel BTF without msg_tot_len:\n%s", out)
}

// checkProbe compares the probe and its halves with what the test
// observed: whether the kernel has psock->msg_tot_len and whether it
// charges redirected bytes to the receiver.
func checkProbe(t *testing.T, field, charged bool) {
	t.Helper()
	if got, err := hasMsgTotLen(); err != nil || got != field {
		t.Errorf("hasMsgTotLen() = %v, %v; the kernel's BTF says %v", got, err, field)
	}
	if got, err := redirectedBytesCharged(); err != nil || got != charged {
		t.Errorf("redirectedBytesCharged() = %v, %v; redirected bytes were observed charged: %v", got, err, charged)
	}
	err := probeQueueVisible()
	if visible := err == nil; visible != (field || charged) {
		t.Errorf("probeQueueVisible says the queue is visible: %v (%v), want %v (msg_tot_len: %v, charged: %v)",
			visible, err, field || charged, field, charged)
	}
}

// btfHasMsgTotLen reads BTF from path and says whether its struct
// sk_psock has msg_tot_len.
func btfHasMsgTotLen(t *testing.T, path string) bool {
	t.Helper()
	psock := psockType(t, path)
	for _, m := range psock.Members {
		if m.Name == "msg_tot_len" {
			return true
		}
	}
	return false
}

func psockType(t *testing.T, path string) *btf.Struct {
	t.Helper()
	spec, err := btf.LoadSpec(path)
	if err != nil {
		t.Fatalf("reading BTF from %s: %v", path, err)
	}
	var psock *btf.Struct
	if err := spec.TypeByName("sk_psock", &psock); err != nil {
		t.Fatalf("struct sk_psock in %s: %v", path, err)
	}
	return psock
}

// writeVmlinuxWithoutMsgTotLen writes to path a raw BTF blob with this
// kernel's struct sk_psock (and what it refers to) in which msg_tot_len is
// renamed.
func writeVmlinuxWithoutMsgTotLen(t *testing.T, path string) {
	t.Helper()
	psock := btf.Copy(psockType(t, kernelBTFPath)).(*btf.Struct)
	for i := range psock.Members {
		if psock.Members[i].Name == "msg_tot_len" {
			psock.Members[i].Name = "smesh_test_renamed"
		}
	}
	b, err := btf.NewBuilder([]btf.Type{psock}, nil)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := b.Marshal(nil, nil)
	if err != nil {
		t.Fatalf("marshalling BTF: %v", err)
	}
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if btfHasMsgTotLen(t, path) {
		t.Fatalf("%s still has psock->msg_tot_len", path)
	}
}

// observedBytes is how much observeCharge redirects: not the probe's
// amount, and less than a receive buffer.
const observedBytes = 100_000

// observeCharge connects a TCP pair on loopback, puts both ends in a
// sockhash whose sk_msg program redirects every send into the receive
// queue of the socket at key 0, sends observedBytes of a pattern, and reads
// the reader's sk_rmem_alloc and FIONREAD; then it reads the bytes back,
// checks them, and reads sk_rmem_alloc again. Redirected bytes are charged
// when sk_rmem_alloc held them while they waited and let go of them once
// read; they are not when it never held them. Anything else fails the
// test: the observation would not be telling.
func observeCharge(t *testing.T) bool {
	t.Helper()
	hash, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.SockHash, KeySize: 4, ValueSize: 4, MaxEntries: 2})
	if err != nil {
		t.Fatalf("creating a sockhash: %v", err)
	}
	defer hash.Close()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.SkMsg,
		License: "Dual BSD/GPL",
		Instructions: asm.Instructions{
			// u32 key = 0;
			// return bpf_msg_redirect_hash(msg, hash, &key, BPF_F_INGRESS)
			asm.StoreImm(asm.RFP, -4, 0, asm.Word),
			asm.LoadMapPtr(asm.R2, hash.FD()),
			asm.Mov.Reg(asm.R3, asm.RFP),
			asm.Add.Imm(asm.R3, -4),
			asm.Mov.Imm(asm.R4, 1),
			asm.FnMsgRedirectHash.Call(),
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatalf("loading the test's sk_msg program: %v", err)
	}
	defer prog.Close()
	attach := link.RawAttachProgramOptions{Target: hash.FD(), Program: prog, Attach: ebpf.AttachSkMsgVerdict}
	if err := link.RawAttachProgram(attach); err != nil {
		t.Fatalf("attaching the test's sk_msg program: %v", err)
	}
	defer link.RawDetachProgram(link.RawDetachProgramOptions(attach))

	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	writer, err := net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer writer.Close()
	ln.SetDeadline(time.Now().Add(10 * time.Second))
	reader, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	if reader.RemoteAddr().String() != writer.LocalAddr().String() {
		t.Fatalf("the test's connection was captured (%s reached the listener as %s): run it outside enrolled cgroups",
			writer.LocalAddr(), reader.RemoteAddr())
	}
	for key, c := range []*net.TCPConn{reader, writer} {
		fd, err := connFD(c)
		if err != nil {
			t.Fatalf("the descriptor of a test socket: %v", err)
		}
		if err := hash.Update(uint32(key), uint32(fd), ebpf.UpdateAny); err != nil {
			t.Fatalf("adding a socket to the sockhash: %v", err)
		}
	}

	sent := make([]byte, observedBytes)
	for i := range sent {
		sent[i] = byte(i*131 + i>>8)
	}
	writer.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := writer.Write(sent); err != nil {
		t.Fatalf("sending through the redirect: %v", err)
	}
	tcpSent, err := bytesSent(writer)
	if err != nil {
		t.Fatal(err)
	}
	if tcpSent != 0 {
		t.Fatalf("the redirect did not take the bytes: TCP sent %d", tcpSent)
	}
	waiting := rmemAlloc(t, reader)
	var inq int
	control(t, reader, func(fd int) (err error) {
		inq, err = unix.IoctlGetInt(fd, unix.SIOCINQ)
		return err
	})

	got := make([]byte, observedBytes)
	reader.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := io.ReadFull(reader, got); err != nil {
		t.Fatalf("reading the redirected bytes back: %d of %d: %v", n, observedBytes, err)
	}
	if !bytes.Equal(got, sent) {
		t.Fatal("the reader read other bytes than were redirected to it")
	}
	read := rmemAlloc(t, reader)
	t.Logf("the reader with %d redirected bytes waiting: sk_rmem_alloc %d, FIONREAD %d; once read: sk_rmem_alloc %d",
		observedBytes, waiting, inq, read)
	switch {
	case waiting >= observedBytes && read < observedBytes/4:
		return true
	case waiting < observedBytes/4:
		return false
	}
	t.Fatalf("sk_rmem_alloc %d with %d redirected bytes waiting, %d once read: neither charged nor uncharged",
		waiting, observedBytes, read)
	return false
}

// rmemAlloc is the socket's sk_rmem_alloc (SO_MEMINFO).
func rmemAlloc(t *testing.T, c *net.TCPConn) int64 {
	t.Helper()
	mi, err := sockmem.Read(c)
	if err != nil {
		t.Fatal(err)
	}
	return mi.RmemAlloc
}

// control runs fn on the socket's descriptor and fails the test on its
// error.
func control(t *testing.T, c *net.TCPConn, fn func(fd int) error) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		t.Fatal(err)
	}
	if ferr != nil {
		t.Fatal(ferr)
	}
}
