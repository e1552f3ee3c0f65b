// Package sockops holds smesh's sockops BPF program (C source beside this file) and its
// generated Go bindings. Regenerate with "make generate".
package sockops

//go:generate go tool bpf2go -cc $BPF2GO_CC -cflags "$BPF2GO_CFLAGS" -target bpfel -type sock_key -type conn_key -type orig_dst -type addr -type addr_owner -type ns_addr -type splice_stats Sockops sockops.c -- -I../include
