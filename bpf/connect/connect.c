// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* cgroup/connect4 decides which outbound TCP connections of enrolled workloads
 * smeshd captures; cgroup/getsockopt answers SO_ORIGINAL_DST for the sockets
 * smeshd accepts, so the proxy learns where a captured connection was going. */

#include "smesh.h"

#define SOL_IP 0
#define SO_ORIGINAL_DST 80
#define PAGE_SIZE 4096

/* Set by smeshd before load. */
volatile const __u32 proxy_ip4 = 0;     /* [outbound] listen address, network byte order */
volatile const __u16 proxy_port = 0;    /* [outbound] listen port, host byte order */
volatile const __u64 proxy_cgroup = 0;  /* cgroup id of smeshd itself: never captured */
volatile const bool capture_local = 0;  /* copy mode: same-node destinations go through smeshd too */

struct lpm_v4_key {
	__u32 prefixlen;
	__u32 ip4; /* network byte order */
};

/* Written by smeshd from [capture] include_cidrs; read by connect4. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4_key);
	__type(value, __u8);
} smesh_include SEC(".maps");

/* Written by smeshd from [capture] exclude_cidrs; read by connect4. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4_key);
	__type(value, __u8);
} smesh_exclude SEC(".maps");

/* Written by smeshd from [capture] exclude_ports (index: port, value 1 =
 * excluded); read by connect4. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u8);
} smesh_exclude_ports SEC(".maps");

static __always_inline bool in_trie(void *trie, __u32 ip4)
{
	struct lpm_v4_key key = { .prefixlen = 32, .ip4 = ip4 };

	return bpf_map_lookup_elem(trie, &key) != NULL;
}

static __always_inline bool port_excluded(__u16 port)
{
	__u32 key = port;
	__u8 *v = bpf_map_lookup_elem(&smesh_exclude_ports, &key);

	return v && *v;
}

/* should_capture holds the whole decision, so it reads top to bottom. */
static __always_inline bool should_capture(__u32 ip4, __u16 port)
{
	if (ip4 == proxy_ip4 && port == proxy_port)
		return false;
	if (port_excluded(port))
		return false;
	/* Splice mode leaves same-node connections alone: sockops splices them
	 * from the first byte without a proxy hop. */
	if (!capture_local && is_local(ip4))
		return false;
	if (!in_trie(&smesh_include, ip4) || in_trie(&smesh_exclude, ip4))
		return false;
	return true;
}

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
