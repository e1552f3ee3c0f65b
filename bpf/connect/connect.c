// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* cgroup/connect4 and cgroup/connect6 decide which outbound TCP connections
 * of enrolled workloads smeshd captures; cgroup/getsockopt answers
 * SO_ORIGINAL_DST for the sockets smeshd accepts, so the proxy learns where a
 * captured connection was going.
 *
 * A captured connection is sent to [outbound] listen (IPv4, and v4-mapped
 * destinations of dual-stack sockets) or listen6 (IPv6) in the caller's own
 * network namespace (every pod has its own 127.0.0.1), where smeshd keeps
 * its listeners for every enrolled namespace. Until the listener is up,
 * and when smeshd's heartbeat is older than [daemon] restart_hold, capture
 * in that namespace follows [capture] on_failure.
 *
 * A dual-stack (AF_INET6) socket connecting to ::ffff:a.b.c.d goes through
 * connect6, not connect4: it is decided as the IPv4 address it carries, and
 * sent to the IPv4 listener as ::ffff:127.0.0.1, so nothing an enrolled
 * workload connects to leaves uncaptured by being written another way. */

#include "smesh.h"

#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80
#define IP6T_SO_ORIGINAL_DST 80
#define PAGE_SIZE 4096
/* smesh's own getsockopt option at SOL_IP: the source identity number of a
 * connection smeshd accepted (a __u32, 0 unknown). No kernel option has this
 * number (SOL_IP's run below 100, netfilter's 64-99, IPVS's from 0x480);
 * the kernel answers ENOPROTOOPT, which cgroup/getsockopt replaces. "SMI1".
 * pkg/proxy.OriginalSource asks it. */
#define SMESH_SO_SRC_ID 0x534d4931

#include "capture.h"
#include "service.h"
#include "identity.h"

/* Set by smeshd before load: [capture] on_failure = "closed". */
volatile const bool fail_closed = 0;
/* Set by smeshd before load: this kernel lets cgroup/connect4 call
 * bpf_set_retval. A constant, so that the verifier of a kernel without the
 * helper never sees the call (it prunes the branch) and the program still
 * loads there, refusing with EPERM instead of ECONNREFUSED. */
volatile const bool have_set_retval = 0;

struct netns_event {
	__u64 netns;
	__u32 pid; /* a process that connected from that namespace */
	__u32 pad;
};

/* Makes clang emit struct netns_event into BTF, for the generated Go type
 * smeshd reads the ring buffer with. */
const struct netns_event *unused_netns_event __attribute__((unused));

/* Written by connect4: a namespace it would capture in but where smeshd has
 * no listener; read by smeshd, which then looks for new namespaces at once
 * instead of waiting for its next scan. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} smesh_netns_events SEC(".maps");

/* Written and read by connect4: when it last told smeshd about a namespace,
 * so that a busy namespace without a listener raises an event a second, not
 * one per connect(). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u64);
} smesh_netns_told SEC(".maps");

#define TELL_INTERVAL_NS 1000000000ULL

static __always_inline void tell_smeshd(__u64 netns)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 *last = bpf_map_lookup_elem(&smesh_netns_told, &netns);
	struct netns_event *ev;

	if (last && now - *last < TELL_INTERVAL_NS)
		return;
	bpf_map_update_elem(&smesh_netns_told, &netns, &now, BPF_ANY);
	ev = bpf_ringbuf_reserve(&smesh_netns_events, sizeof(*ev), 0);
	if (!ev)
		return; /* smeshd is behind: its periodic scan finds the namespace */
	ev->netns = netns;
	ev->pid = bpf_get_current_pid_tgid() >> 32;
	ev->pad = 0;
	bpf_ringbuf_submit(ev, 0);
}

enum verdict {
	VERDICT_PASS,    /* leave the connection alone */
	VERDICT_CAPTURE, /* rewrite its destination to smeshd's listener */
	VERDICT_REFUSE,  /* fail connect() (EPERM): on_failure = "closed" */
};

/* decide makes the capture decision for one connect() to ip:port and, when
 * it captures, remembers the original destination on the socket. need is
 * the NETNS_READY* bit of the listener the connection would go to. */
static __always_inline enum verdict decide(struct bpf_sock_addr *ctx, const struct addr *ip,
					   __u16 port, __u16 family, __u8 need)
{
	struct sock_state *st;
	__u8 *ready;
	__u64 netns;

	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return VERDICT_PASS;
	if (bpf_get_current_cgroup_id() == proxy_cgroup)
		return VERDICT_PASS;
	netns = bpf_get_netns_cookie(ctx);
	if (!should_capture(netns, ip, port))
		return VERDICT_PASS;
	ready = bpf_map_lookup_elem(&smesh_netns, &netns);
	if (!ready || !(*ready & need)) {
		tell_smeshd(netns);
		counter_inc(fail_closed ? COUNTER_UNREADY_CLOSED : COUNTER_UNREADY_OPEN);
		return fail_closed ? VERDICT_REFUSE : VERDICT_PASS;
	}
	/* The listener is there but smeshd has not beaten for restart_hold
	 * (crashed, stopped, a crash loop): nobody may ever accept, so it
	 * counts as no ready listener. Counted alike: smesh_counters keeps its
	 * layout, so a predecessor's map is handed over as it is. */
	if (!smeshd_alive(bpf_ktime_get_ns())) {
		counter_inc(fail_closed ? COUNTER_UNREADY_CLOSED : COUNTER_UNREADY_OPEN);
		return fail_closed ? VERDICT_REFUSE : VERDICT_PASS;
	}
	st = bpf_sk_storage_get(&smesh_sk_state, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) /* out of memory */
		return fail_closed ? VERDICT_REFUSE : VERDICT_PASS;
	st->orig.ip = *ip;
	st->orig.port = port;
	st->orig.family = family;
	st->captured = 1;
	remember_source(ctx->sk);
	return VERDICT_CAPTURE;
}

/* translate sends a connect() to a Service address to one of its backends
 * (service.h): on SVC_TRANSLATED, ip and port name the backend from then on,
 * and the socket remembers the Service address for getpeername. */
static __always_inline enum svc_result translate(struct bpf_sock_addr *ctx, struct addr *ip, __u16 *port,
						 __u16 family)
{
	struct sock_state *st;
	struct backend be;
	enum svc_result r;

	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return SVC_NONE;
	r = choose_backend(bpf_get_netns_cookie(ctx), ip, *port, &be);
	if (r == SVC_NONE) {
		/* A socket whose earlier connect() to a Service failed may
		 * connect again elsewhere: its peer is then what it dials. */
		st = bpf_sk_storage_get(&smesh_sk_state, ctx->sk, 0, 0);
		if (st)
			st->translated = 0;
	}
	if (r != SVC_TRANSLATED)
		return r;
	/* Without storage (out of memory) the connection still goes to the
	 * backend; only getpeername then names the backend. */
	st = bpf_sk_storage_get(&smesh_sk_state, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (st) {
		st->svc.ip = *ip;
		st->svc.port = *port;
		st->svc.family = family;
		st->translated = 1;
	}
	*ip = be.ip;
	*port = be.port;
	return SVC_TRANSLATED;
}

/* no_backend fails a connect() to a Service without a backend at once, as
 * kube-proxy's reject rule does: ECONNREFUSED where the kernel lets the
 * program say so, EPERM (a program's plain refusal) elsewhere. */
static __always_inline int no_backend(void)
{
	counter_inc(COUNTER_SVC_NO_BACKEND);
	if (have_set_retval)
		bpf_set_retval(-ECONNREFUSED);
	return 0;
}

/* allowed applies same-node policy (identity.h) to a TCP connect() of an
 * enrolled workload to ip:port, after Service translation (the backend is
 * what is decided). smeshd's own connects are never decided here: connect4
 * is not attached to its cgroup, and the check below keeps it so. */
static __always_inline bool allowed(struct bpf_sock_addr *ctx, const struct addr *ip, __u16 port)
{
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return true;
	if (bpf_get_current_cgroup_id() == proxy_cgroup)
		return true;
	return police(bpf_get_netns_cookie(ctx), ip, port);
}

/* denied fails a connect() policy refuses: ECONNREFUSED where the kernel
 * lets the program say so (bpf_set_retval, 5.18), EPERM elsewhere.
 * Counted by police(). */
static __always_inline int denied(void)
{
	if (have_set_retval)
		bpf_set_retval(-ECONNREFUSED);
	return 0;
}

/* count_service counts a translated connection by where its backend is and
 * what decide() made of it. */
static __always_inline void count_service(struct bpf_sock_addr *ctx, const struct addr *backend, enum verdict v)
{
	if (v == VERDICT_REFUSE)
		return; /* counted as unready_closed */
	if (is_local(bpf_get_netns_cookie(ctx), backend))
		counter_inc(COUNTER_SVC_LOCAL);
	else if (v == VERDICT_CAPTURE)
		counter_inc(COUNTER_SVC_TUNNEL);
	else
		counter_inc(COUNTER_SVC_DIRECT);
}

SEC("cgroup/connect4")
int smesh_connect4(struct bpf_sock_addr *ctx)
{
	__u16 port = bpf_ntohs(ctx->user_port);
	enum svc_result svc;
	enum verdict v;
	struct addr ip;

	addr_from4(&ip, ctx->user_ip4);
	/* Services first: the capture decision is the backend's. */
	svc = translate(ctx, &ip, &port, AF_INET);
	if (svc == SVC_NO_BACKEND)
		return no_backend();
	if (!allowed(ctx, &ip, port))
		return denied();
	v = decide(ctx, &ip, port, AF_INET, NETNS_READY4);
	if (svc == SVC_TRANSLATED)
		count_service(ctx, &ip, v);
	switch (v) {
	case VERDICT_REFUSE:
		return 0;
	case VERDICT_CAPTURE:
		ctx->user_ip4 = proxy_ip4;
		ctx->user_port = bpf_htons(proxy_port);
		return 1;
	default:
		if (svc == SVC_TRANSLATED) {
			/* A Service's IPv4 backends are IPv4 (smeshd checks). */
			ctx->user_ip4 = ip.ip[3];
			ctx->user_port = bpf_htons(port);
		}
		return 1;
	}
}

SEC("cgroup/connect6")
int smesh_connect6(struct bpf_sock_addr *ctx)
{
	__u16 port = bpf_ntohs(ctx->user_port);
	enum svc_result svc;
	enum verdict v;
	struct addr ip;
	bool v4;

	ip.ip[0] = ctx->user_ip6[0];
	ip.ip[1] = ctx->user_ip6[1];
	ip.ip[2] = ctx->user_ip6[2];
	ip.ip[3] = ctx->user_ip6[3];
	/* A v4-mapped Service address is the IPv4 Service: its backends come
	 * back v4-mapped, as a dual-stack socket reaches them. */
	svc = translate(ctx, &ip, &port, AF_INET6);
	if (svc == SVC_NO_BACKEND)
		return no_backend();
	if (!allowed(ctx, &ip, port))
		return denied();
	v4 = addr_is4(&ip);
	v = decide(ctx, &ip, port, AF_INET6, v4 ? NETNS_READY4 : NETNS_READY6);
	if (svc == SVC_TRANSLATED)
		count_service(ctx, &ip, v);
	switch (v) {
	case VERDICT_REFUSE:
		return 0;
	case VERDICT_CAPTURE:
		if (v4) {
			/* Still v4-mapped: a dual-stack socket reaches the
			 * IPv4 listener this way. */
			ctx->user_ip6[3] = proxy_ip4;
			ctx->user_port = bpf_htons(proxy_port);
		} else {
			ctx->user_ip6[0] = proxy_ip6[0];
			ctx->user_ip6[1] = proxy_ip6[1];
			ctx->user_ip6[2] = proxy_ip6[2];
			ctx->user_ip6[3] = proxy_ip6[3];
			ctx->user_port = bpf_htons(proxy_port6);
		}
		return 1;
	default:
		if (svc == SVC_TRANSLATED) {
			ctx->user_ip6[0] = ip.ip[0];
			ctx->user_ip6[1] = ip.ip[1];
			ctx->user_ip6[2] = ip.ip[2];
			ctx->user_ip6[3] = ip.ip[3];
			ctx->user_port = bpf_htons(port);
		}
		return 1;
	}
}

/* A captured app asking for its peer gets the destination it connected to,
 * not smeshd's listener: capture stays invisible to the app. So does
 * Service translation: a translated socket's peer is the Service address,
 * captured or not. */
SEC("cgroup/getpeername4")
int smesh_getpeername4(struct bpf_sock_addr *ctx)
{
	struct sock_state *st;

	st = bpf_sk_storage_get(&smesh_sk_state, ctx->sk, 0, 0);
	if (st && st->translated && addr_is4(&st->svc.ip)) {
		ctx->user_ip4 = st->svc.ip.ip[3];
		ctx->user_port = bpf_htons(st->svc.port);
	} else if (st && st->captured && addr_is4(&st->orig.ip)) {
		ctx->user_ip4 = st->orig.ip.ip[3];
		ctx->user_port = bpf_htons(st->orig.port);
	}
	return 1;
}

SEC("cgroup/getpeername6")
int smesh_getpeername6(struct bpf_sock_addr *ctx)
{
	struct sock_state *st;

	st = bpf_sk_storage_get(&smesh_sk_state, ctx->sk, 0, 0);
	if (st && st->translated) {
		ctx->user_ip6[0] = st->svc.ip.ip[0];
		ctx->user_ip6[1] = st->svc.ip.ip[1];
		ctx->user_ip6[2] = st->svc.ip.ip[2];
		ctx->user_ip6[3] = st->svc.ip.ip[3];
		ctx->user_port = bpf_htons(st->svc.port);
	} else if (st && st->captured) {
		/* v4-mapped for a dual-stack socket's IPv4 destination, as the
		 * app connected. */
		ctx->user_ip6[0] = st->orig.ip.ip[0];
		ctx->user_ip6[1] = st->orig.ip.ip[1];
		ctx->user_ip6[2] = st->orig.ip.ip[2];
		ctx->user_ip6[3] = st->orig.ip.ip[3];
		ctx->user_port = bpf_htons(st->orig.port);
	}
	return 1;
}

/* accepted_key is the connection of a socket smeshd accepted as the captured
 * client sees it (the remote end is the client, in the same namespace): the
 * key sock_ops wrote smesh_orig_dst and smesh_src_ids with. */
static __always_inline bool accepted_key(struct bpf_sockopt *ctx, struct bpf_sock *sk, struct conn_key *key)
{
	key->netns = bpf_get_netns_cookie(ctx);
	if (sk->family == AF_INET) {
		addr_from4(&key->local, sk->dst_ip4);
		addr_from4(&key->remote, sk->src_ip4);
	} else if (sk->family == AF_INET6) {
		key->local.ip[0] = sk->dst_ip6[0];
		key->local.ip[1] = sk->dst_ip6[1];
		key->local.ip[2] = sk->dst_ip6[2];
		key->local.ip[3] = sk->dst_ip6[3];
		key->remote.ip[0] = sk->src_ip6[0];
		key->remote.ip[1] = sk->src_ip6[1];
		key->remote.ip[2] = sk->src_ip6[2];
		key->remote.ip[3] = sk->src_ip6[3];
	} else {
		return false;
	}
	key->local_port = bpf_ntohs(sk->dst_port);
	key->remote_port = sk->src_port;
	return true;
}

/* source_id answers SMESH_SO_SRC_ID: the source identity number of the
 * accepted connection. Without an entry (a connection a predecessor's
 * connect4 captured, or none captured at all) the kernel's own answer,
 * ENOPROTOOPT, stands: what an older program that does not know the option
 * answers too. */
static __always_inline int source_id(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct conn_key key = {};
	struct src_id *src;
	__u32 *out;

	if (!sk || !accepted_key(ctx, sk, &key))
		return 1;
	src = bpf_map_lookup_elem(&smesh_src_ids, &key);
	if (!src)
		return 1;
	out = ctx->optval;
	if ((void *)(out + 1) > ctx->optval_end)
		return 0;
	*out = src->id;
	ctx->optlen = sizeof(*out);
	ctx->retval = 0;
	return 1;
}

/* Attached to smeshd's own cgroup only (the kernel runs it for the sockets of
 * that cgroup), so it answers smeshd alone: SO_ORIGINAL_DST comes from smesh
 * and from nothing else. Without an entry it fails (EPERM) rather than pass
 * on the kernel's answer: with conntrack active, that answer for a
 * connection made straight to smeshd's listener is the listener itself, and
 * smeshd would dial itself in a loop. */
SEC("cgroup/getsockopt")
int smesh_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	bool v4 = ctx->level == SOL_IP && ctx->optname == SO_ORIGINAL_DST;
	bool v6 = ctx->level == SOL_IPV6 && ctx->optname == IP6T_SO_ORIGINAL_DST;
	struct orig_dst *orig;
	struct conn_key key = {};

	if (ctx->level == SOL_IP && ctx->optname == SMESH_SO_SRC_ID)
		return source_id(ctx);
	if (!(v4 || v6)) {
		/* Not ours: leave the kernel's answer as it is. A buffer larger
		 * than a page is only partly visible here; optlen 0 tells the
		 * kernel to return its own result unchanged. */
		if (ctx->optlen > PAGE_SIZE)
			ctx->optlen = 0;
		return 1;
	}
	if (!sk)
		return 0;

	if (!accepted_key(ctx, sk, &key))
		return 0;
	orig = bpf_map_lookup_elem(&smesh_orig_dst, &key);
	if (!orig)
		return 0;

	if (v4) {
		struct sockaddr_in *sin = ctx->optval;

		if (!addr_is4(&orig->ip))
			return 0; /* an IPv6 destination has no sockaddr_in */
		if ((void *)(sin + 1) > ctx->optval_end)
			return 0;
		sin->sin_family = AF_INET;
		sin->sin_port = bpf_htons(orig->port);
		sin->sin_addr.s_addr = orig->ip.ip[3];
		ctx->optlen = sizeof(*sin);
	} else {
		struct sockaddr_in6 *sin6 = ctx->optval;

		if ((void *)(sin6 + 1) > ctx->optval_end)
			return 0;
		__builtin_memset(sin6, 0, sizeof(*sin6));
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = bpf_htons(orig->port);
		/* Word by word, not memcpy: clang 14 turns that copy into
		 * pointer arithmetic with a register offset on optval, which
		 * the verifier refuses without CAP_PERFMON. */
		sin6->sin6_addr.in6_u.u6_addr32[0] = orig->ip.ip[0];
		sin6->sin6_addr.in6_u.u6_addr32[1] = orig->ip.ip[1];
		sin6->sin6_addr.in6_u.u6_addr32[2] = orig->ip.ip[2];
		sin6->sin6_addr.in6_u.u6_addr32[3] = orig->ip.ip[3];
		ctx->optlen = sizeof(*sin6);
	}
	ctx->retval = 0;
	return 1;
}

char __license[] SEC("license") = "Dual BSD/GPL";
