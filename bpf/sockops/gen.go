// Package sockops holds smesh's sockops BPF program (C source beside this file) and its
// generated Go bindings. Regenerate with "make generate".
package sockops

// -mcpu=v3: sk_msg and sockops swap sock_state.path with an atomic
// compare-and-swap (BPF_CMPXCHG, Linux 5.12; the floor is 5.15).
//go:generate go tool bpf2go -cc $BPF2GO_CC -cflags "$BPF2GO_CFLAGS -mcpu=v3" -target bpfel -type sock_key -type conn_key -type orig_dst -type addr -type addr_owner -type ns_addr -type splice_stats -type src_id Sockops sockops.c -- -I../include
