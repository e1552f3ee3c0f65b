// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* Test harness for should_capture: a program that BPF_PROG_TEST_RUN can run
 * with any destination, which connect4 itself cannot. Never loaded by
 * smeshd. A raw tracepoint program because test runs take its arguments
 * from user space and it may read LPM tries (a "syscall" program, being
 * sleepable, may not). */

#include "capture.h"

/* ctx[0]: IPv4 address (network byte order), ctx[1]: port (host byte
 * order). Returns 1 when connect4 would capture. */
SEC("raw_tp/smesh_capture_harness")
int run_should_capture(__u64 *ctx)
{
	return should_capture((__u32)ctx[0], (__u16)ctx[1]);
}

char __license[] SEC("license") = "Dual BSD/GPL";
