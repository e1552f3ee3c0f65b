// Package strict holds smesh's strict-inbound BPF programs (C source beside
// this file) and their generated Go bindings. Regenerate with "make generate".
package strict

//go:generate go tool bpf2go -cc $BPF2GO_CC -cflags "$BPF2GO_CFLAGS -mcpu=v3" -target bpfel -type strict_key -type strict_opts -type mesh_syn Strict strict.c -- -I../include
