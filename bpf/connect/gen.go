// Package connect holds smesh's connect BPF program (C source beside this file) and its
// generated Go bindings. Regenerate with "make generate".
package connect

//go:generate go tool bpf2go -cc $BPF2GO_CC -cflags "$BPF2GO_CFLAGS" -target bpfel -type sock_key -type conn_key -type orig_dst -type addr -type addr_owner -type ns_addr -type netns_event -type splice_stats -type svc_key -type svc -type backend_key -type backend -type member_key -type affinity_key -type affinity -type heartbeat -type src_id -type ident_cfg -type policy_key -type policy_verdict Connect connect.c -- -I../include
//go:generate go tool bpf2go -cc $BPF2GO_CC -cflags "$BPF2GO_CFLAGS" -target bpfel -type lpm_key CaptureHarness capture_harness.c -- -I../include
