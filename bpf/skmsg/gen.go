// Package skmsg holds smesh's skmsg BPF program (C source beside this file) and its
// generated Go bindings. Regenerate with "make generate".
package skmsg

//go:generate go tool bpf2go -cc $BPF2GO_CC -cflags "$BPF2GO_CFLAGS" -target bpfel -type sock_key -type splice_stats Skmsg skmsg.c -- -I../include
