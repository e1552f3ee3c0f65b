// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* cgroup/connect4 decides which outbound TCP connections of enrolled workloads
 * smeshd captures; cgroup/getsockopt answers SO_ORIGINAL_DST for the sockets
 * smeshd accepts, so the proxy learns where a captured connection was going. */

#include "smesh.h"

#define SOL_IP 0
#define SO_ORIGINAL_DST 80
#define PAGE_SIZE 4096

#include "capture.h"

SEC("cgroup/connect4")
int smesh_connect4(struct bpf_sock_addr *ctx)
{
	struct sock_state *st;
	__u32 ip4 = ctx->user_ip4;
	__u16 port = bpf_ntohs(ctx->user_port);

	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 1;
	if (bpf_get_current_cgroup_id() == proxy_cgroup)
		return 1;
	if (!should_capture(ip4, port))
		return 1;

	st = bpf_sk_storage_get(&smesh_sk_state, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return 1; /* out of memory: let the connection go direct */
	st->orig.ip4 = ip4;
	st->orig.port = port;
	st->captured = 1;

	ctx->user_ip4 = proxy_ip4;
	ctx->user_port = bpf_htons(proxy_port);
	return 1;
}

/* A captured app asking for its peer gets the destination it connected to,
 * not smeshd's listener: capture stays invisible to the app. */
SEC("cgroup/getpeername4")
int smesh_getpeername4(struct bpf_sock_addr *ctx)
{
	struct sock_state *st;

	st = bpf_sk_storage_get(&smesh_sk_state, ctx->sk, 0, 0);
	if (st && st->captured) {
		ctx->user_ip4 = st->orig.ip4;
		ctx->user_port = bpf_htons(st->orig.port);
	}
	return 1;
}

SEC("cgroup/getsockopt")
int smesh_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct sockaddr_in *sin = ctx->optval;
	struct orig_dst *orig;
	struct sock_key key;

	if (ctx->level != SOL_IP || ctx->optname != SO_ORIGINAL_DST || !sk) {
		/* Not ours: leave the kernel's answer as it is. A buffer larger
		 * than a page is only partly visible here; optlen 0 tells the
		 * kernel to return its own result unchanged. */
		if (ctx->optlen > PAGE_SIZE)
			ctx->optlen = 0;
		return 1;
	}
	if (sk->family != AF_INET)
		return 1;

	/* The accepted socket's remote end is the captured client: look the
	 * connection up the way the client sees it. */
	key.local_ip4 = sk->dst_ip4;
	key.local_port = bpf_ntohs(sk->dst_port);
	key.remote_ip4 = sk->src_ip4;
	key.remote_port = sk->src_port;
	orig = bpf_map_lookup_elem(&smesh_orig_dst, &key);
	if (!orig)
		return 1;
	if ((void *)(sin + 1) > ctx->optval_end)
		return 1; /* buffer too small: the kernel's error stands */

	sin->sin_family = AF_INET;
	sin->sin_port = bpf_htons(orig->port);
	sin->sin_addr.s_addr = orig->ip4;
	ctx->optlen = sizeof(*sin);
	ctx->retval = 0;
	return 1;
}

char __license[] SEC("license") = "Dual BSD/GPL";
