// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* Test harness for the decisions connect4 and sock_ops make (should_capture,
 * peer_netns, smeshd_alive): programs that BPF_PROG_TEST_RUN can run with any input, which
 * connect4 and sock_ops themselves cannot. Never loaded by smeshd. Raw
 * tracepoint programs because test runs take their arguments from user space
 * and they may read LPM tries (a "syscall" program, being sleepable, may
 * not). */

#include "capture.h"
#include "service.h"

/* ctx[0], ctx[1]: the 16 bytes of a struct addr, in memory order. */
static __always_inline void addr_of(__u64 *ctx, struct addr *a)
{
	__builtin_memcpy(&a->ip[0], &ctx[0], 8);
	__builtin_memcpy(&a->ip[2], &ctx[1], 8);
}

/* ctx[2]: port (host byte order), ctx[3]: netns cookie of the caller.
 * Returns 1 when connect4 would capture. */
SEC("raw_tp/smesh_capture_harness")
int run_should_capture(__u64 *ctx)
{
	struct addr ip;

	addr_of(ctx, &ip);
	return should_capture(ctx[3], &ip, (__u16)ctx[2]);
}

/* ctx[2]: the namespace of the socket. Returns the peer's namespace (the
 * tests use cookies below 2^32). */
SEC("raw_tp/smesh_peer_harness")
int run_peer_netns(__u64 *ctx)
{
	struct addr ip;

	addr_of(ctx, &ip);
	return (int)peer_netns(ctx[2], &ip);
}

/* ctx[2]: port (host byte order), ctx[3]: netns cookie of the caller.
 * Returns the enum svc_result of choose_backend << 16 | the chosen backend's
 * port (the tests give every backend a port of its own). */
SEC("raw_tp/smesh_choose_harness")
int run_choose_backend(__u64 *ctx)
{
	struct backend be = {};
	struct addr ip;
	enum svc_result r;

	addr_of(ctx, &ip);
	r = choose_backend(ctx[3], &ip, (__u16)ctx[2], &be);
	return (int)r << 16 | be.port;
}

/* ctx[0]: the time to decide at (bpf_ktime_get_ns's clock), 0 for now.
 * Returns 1 when connect4 would take smeshd for alive, reading this
 * object's smesh_heartbeat as connect4 reads its own. */
SEC("raw_tp/smesh_heartbeat_harness")
int run_smeshd_alive(__u64 *ctx)
{
	__u64 now = ctx[0];

	if (!now)
		now = bpf_ktime_get_ns();
	return smeshd_alive(now);
}

char __license[] SEC("license") = "Dual BSD/GPL";
