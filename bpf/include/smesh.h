/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Types and maps shared by smesh's BPF programs.
 *
 * Every object that includes this header declares the same maps; smeshd creates
 * each map once and hands it to every object it loads (cilium/ebpf
 * MapReplacements), so the programs of connect/, sockops/ and skmsg/ all see
 * one instance.
 *
 * The invariant every map keyed by a connection keeps: a byte is only ever
 * delivered to the socket its TCP connection is connected to. 4-tuples repeat
 * across network namespaces (every pod has its own 127.0.0.1, pods on two
 * bridges can share an address), and within one namespace a socket of an
 * earlier connection can outlive its peer; so a connection is named by the
 * namespace of the socket, both ends' addresses and ports, and the sequence
 * numbers both ends started with (see struct sock_key).
 */
#ifndef __SMESH_H__
#define __SMESH_H__

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1

/* An address of either family: IPv6 as it is, IPv4 as ::ffff:a.b.c.d
 * (v4-mapped), so that an AF_INET socket and a dual-stack AF_INET6 socket
 * connected to the same IPv4 peer name it alike. Network byte order. */
struct addr {
	__u32 ip[4];
};

/* One TCP connection as one of its sockets sees it: the socket's network
 * namespace (netns cookie), its own and its peer's address and port. Ports
 * in host byte order. */
struct conn_key {
	__u64 netns;
	struct addr local;
	struct addr remote;
	__u16 local_port;
	__u16 remote_port;
	__u32 pad; /* zeroed: keys are compared byte by byte */
};

/* A socket's key in the sockhash: its connection, plus the first sequence
 * number each end sends with (snd_nxt and rcv_nxt when the connection is
 * established). The peer's key has local and remote swapped, including the
 * netns, which sock_ops works out once (peer_netns). Two connections of one
 * 4-tuple, one namespace or not, never share the sequence numbers, so a
 * socket left from an earlier connection, or in a namespace the address map
 * named wrongly, cannot match. */
struct sock_key {
	struct conn_key conn;
	__u32 local_seq;
	__u32 remote_seq;
};

/* Where a captured connection was going before connect4 sent it to smeshd. */
struct orig_dst {
	struct addr ip;
	__u16 port;   /* host byte order */
	__u16 family; /* AF_INET or AF_INET6: how the app connected */
};

/* Per-socket state, kept in socket-local storage: freed with the socket. */
struct sock_state {
	struct sock_key self; /* this socket's key in the sockhash */
	struct sock_key peer; /* the key of the socket it is connected to */
	struct orig_dst orig; /* set by connect4 on a captured socket */
	__u8 captured;        /* connect4 rewrote this socket's destination */
	__u8 role;            /* ROLE_*, set by sockops */
	__u8 path;            /* PATH_*, decided by sk_msg on the first send */
	__u8 demoted;         /* this direction went from splice (or undecided) to TCP */
	__u8 released;        /* sockops took this socket out of the sockhash */
	__u8 stays;           /* its peer spliced, and nothing closes that (peers_close off): never released */
	/* Bytes sk_msg handed to TCP once this direction was demoted (and
	 * counted as demoted). A demoted socket sends no TCP byte before its
	 * demotion, so what it acknowledged since its establishment is all
	 * its demoted bytes; what sk_msg did not see or count (sends after
	 * release, a message the kernel passed to TCP on a verdict it kept,
	 * a message redirected to the socket itself) is the difference,
	 * counted by sockops as ACKs come (acked_bytes: how much of it is
	 * counted so far). */
	__u64 tcp_bytes;
	__u64 acked_bytes;
	/* bytes_acked at establishment: the active opener's SYN is in it. */
	__u64 acked_at_start;
	/* The Service address the app dialled, when connect4 sent the
	 * connection to one of its backends (translated): what getpeername
	 * answers, while orig (SO_ORIGINAL_DST) names the backend. */
	struct orig_dst svc;
	__u8 translated;
};

enum {
	ROLE_UNKNOWN = 0,
	ROLE_CLIENT = 1, /* the side that called connect() */
	ROLE_SERVER = 2, /* the side that accept()ed */
};

/* sk_msg decides once per socket, on its first send, whether that direction of
 * the connection is spliced or takes the TCP stack; a spliced direction may go
 * to TCP later (demoted, or to let its peer leave the sockhash), never back:
 * TCP bytes followed by spliced ones could be read out of order. */
enum {
	PATH_UNDECIDED = 0,
	PATH_SPLICE = 1,
	PATH_TCP = 2,
	/* In smesh_dirs only: the direction spliced, and closed since
	 * (close_own() in skmsg.c). */
	PATH_CLOSED = 3,
};

/* Counter slots of smesh_stats: bytes and messages spliced, by the role of the
 * sending socket (client->server is "tx", server->client is "rx"), and those
 * sent by TCP after sk_msg demoted their direction. */
enum stat_slot {
	STAT_CLIENT_TO_SERVER = 0,
	STAT_SERVER_TO_CLIENT = 1,
	STAT_DEMOTED_CLIENT_TO_SERVER = 2,
	STAT_DEMOTED_SERVER_TO_CLIENT = 3,
	STAT_MAX = 4,
};

struct splice_stats {
	__u64 bytes;
	__u64 msgs;
};

/* Counter slots of smesh_counters: events the programs count for metrics. */
enum counter_slot {
	/* connect4 would have captured, but smeshd had no listener ready in
	 * the caller's namespace: on_failure decided. */
	COUNTER_UNREADY_OPEN = 0,   /* let through uncaptured */
	COUNTER_UNREADY_CLOSED = 1, /* refused */
	/* sk_msg demoted a spliced direction to TCP: its peer's queue was
	 * full (splice_queue_limit). */
	COUNTER_DEMOTIONS = 2,
	/* sockops took a demoted socket out of the sockhash: it sends and
	 * receives by plain TCP from then on (release() in sockops.c). */
	COUNTER_RELEASED = 3,
	/* sockops put the second end of a same-node hop in the sockhash:
	 * a connection spliced from its first byte on. */
	COUNTER_SPLICED_CONNS = 4,
	/* sockops found that a socket whose first send took TCP (its peer
	 * end was not in the sockhash yet: the handshake's last ACK not yet
	 * processed) belongs to a spliced hop after all: the hop runs as
	 * plain TCP, its bytes counted as demoted. */
	COUNTER_RACED = 5,
	/* connect4 sent a connection to a Service to one of its backends
	 * (service.h), which was: on this node (spliced, or relayed in copy
	 * mode), */
	COUNTER_SVC_LOCAL = 6,
	/* elsewhere, captured (through the tunnel to its node), */
	COUNTER_SVC_TUNNEL = 7,
	/* elsewhere, not captured (excluded by [capture] rules), */
	COUNTER_SVC_DIRECT = 8,
	/* or there was none: connect() refused. */
	COUNTER_SVC_NO_BACKEND = 9,
	COUNTER_MAX = 10,
};

/* Written by sockops (both ends of every same-node hop, at establishment);
 * read by sk_msg (the redirect target) and by smeshd (counting). Entries leave
 * the map by themselves when their socket closes. max_entries is set by smeshd
 * from [datapath] map_size. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u64);
} smesh_sockhash SEC(".maps");

/* Written by sockops when a captured client socket is established (keyed by
 * the client's view of its connection) and deleted when that socket closes;
 * read by cgroup/getsockopt (SO_ORIGINAL_DST on the accepted socket, which is
 * in the same namespace) and smeshd. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct conn_key);
	__type(value, struct orig_dst);
} smesh_orig_dst SEC(".maps");

/* Written by connect4 (orig), sockops (role, keys) and sk_msg (path); read by
 * the same. Socket-local, so nothing is left behind when a socket closes. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
} smesh_sk_state SEC(".maps");

/* Written by sockops (an entry, PATH_UNDECIDED, for every socket it puts in
 * the sockhash; deleted when the socket closes), by sk_msg (the socket's own
 * entry: UNDECIDED -> SPLICE before its first redirect, SPLICE -> TCP when
 * that first send found no peer, SPLICE -> CLOSED once nothing it spliced is
 * left on its way or unread: close_own() in skmsg.c) and by the peer's
 * sockops (UNDECIDED -> TCP, before it takes the peer out of the sockhash:
 * release() in sockops.c). Both swaps from UNDECIDED are atomic, so exactly
 * one wins. Keyed by the
 * socket's own sock_key. A copy of the first decision of sock_state.path
 * that the peer can reach: sock_ops cannot get at another socket's storage
 * (a sockhash lookup returns a reference sock_ops cannot release). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u32);
} smesh_dirs SEC(".maps");

/* A captured connection's source: the identity number (smesh_identity,
 * connect/identity.h) of the cgroup that called connect(). New in issue 25
 * in maps of its own, with a version byte and reserved room, because the
 * kernel fills them: a successor adopts them as they are, so their layout
 * can never change (struct orig_dst and struct sock_state are frozen the
 * same way). */
#define SRC_ID_VERSION 1

struct src_id {
	__u8 version; /* SRC_ID_VERSION */
	__u8 reserved0[3];
	__u32 id; /* 0: unknown */
	__u32 reserved[2];
};

/* Written by connect4/6 on the sockets they capture (remember_source); read
 * by sock_ops at their establishment. Socket-local: freed with the socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct src_id);
} smesh_src_sk SEC(".maps");

/* Written by sock_ops beside smesh_orig_dst, with the same key and the same
 * life (established: written, closed: deleted); read by cgroup/getsockopt
 * (SMESH_SO_SRC_ID on the accepted socket) and smeshd. max_entries is set by
 * smeshd from [datapath] map_size. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct conn_key);
	__type(value, struct src_id);
} smesh_src_ids SEC(".maps");

/* The owner of an address on this node. */
struct addr_owner {
	__u64 netns; /* netns cookie, or 0: several namespaces have it */
};

/* Written by smeshd: every address of every enrolled network namespace and of
 * smeshd's own (the node's), with the namespace that has it. Read by connect4
 * (is a destination on this node?) and sockops (in which namespace is the
 * peer?). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct addr);
	__type(value, struct addr_owner);
} smesh_addrs SEC(".maps");

struct ns_addr {
	__u64 netns;
	struct addr ip;
};

/* Written by smeshd: the same addresses by namespace, so that an address
 * several namespaces share is still known as a namespace's own. Read by
 * connect4 and sockops. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct ns_addr);
	__type(value, __u8);
} smesh_ns_addrs SEC(".maps");

/* Values of smesh_netns: which of smeshd's outbound listeners are up in a
 * namespace. */
enum {
	NETNS_READY4 = 1, /* [outbound] listen: IPv4 and v4-mapped destinations */
	NETNS_READY6 = 2, /* [outbound] listen6: IPv6 destinations */
};

/* Written by smeshd once its listeners in a network namespace are up (key:
 * netns cookie, value: NETNS_READY* bits) and deleted when it closes them;
 * read by connect4 and connect6, which capture only where smeshd can take
 * the connection. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u8);
} smesh_netns SEC(".maps");

/* Written by sk_msg (per CPU, no locking on the data path) and by sockops
 * (demoted bytes sk_msg did not see, as they are acknowledged); read by
 * smeshd. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, struct splice_stats);
} smesh_stats SEC(".maps");

/* Written by connect4, sk_msg and sockops, per CPU; read by smeshd. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} smesh_counters SEC(".maps");

static __always_inline void counter_inc(__u32 slot)
{
	__u64 *c = bpf_map_lookup_elem(&smesh_counters, &slot);

	/* Atomic although per CPU: see count(). */
	if (c)
		__sync_fetch_and_add(c, 1);
}

/* Counts into smesh_stats (per CPU): bytes and messages spliced, by the
 * role of the sender. */
static __always_inline void count(__u32 slot, __u32 size)
{
	struct splice_stats *s = bpf_map_lookup_elem(&smesh_stats, &slot);

	/* Atomic although per CPU: programs in process context run with
	 * migration, not preemption, disabled, so another task on this CPU
	 * can run this same code between a load and a store. */
	if (s) {
		__sync_fetch_and_add(&s->bytes, size);
		__sync_fetch_and_add(&s->msgs, 1);
	}
}

/* Counts the bytes of a demoted direction, sent by TCP, into smesh_stats
 * (sk_msg, and sockops for what sk_msg did not see): bytes only, nobody
 * reads messages there. Atomic as in count(). */
static __always_inline void count_demoted(const struct sock_state *st, __u64 bytes)
{
	__u32 slot = st->role == ROLE_SERVER ? STAT_DEMOTED_SERVER_TO_CLIENT : STAT_DEMOTED_CLIENT_TO_SERVER;
	struct splice_stats *s = bpf_map_lookup_elem(&smesh_stats, &slot);

	if (s)
		__sync_fetch_and_add(&s->bytes, bytes);
}

static __always_inline __u32 role_slot(const struct sock_state *st, __u32 client, __u32 server)
{
	return st->role == ROLE_SERVER ? server : client;
}

/* addr_from4 makes the v4-mapped form of an IPv4 address (network order). */
static __always_inline void addr_from4(struct addr *a, __u32 ip4)
{
	a->ip[0] = 0;
	a->ip[1] = 0;
	a->ip[2] = bpf_htonl(0xffff);
	a->ip[3] = ip4;
}

static __always_inline bool addr_is4(const struct addr *a)
{
	return a->ip[0] == 0 && a->ip[1] == 0 && a->ip[2] == bpf_htonl(0xffff);
}

/* 127.0.0.0/8 and ::1. */
static __always_inline bool addr_is_loopback(const struct addr *a)
{
	if (addr_is4(a))
		return (bpf_ntohl(a->ip[3]) >> 24) == 127;
	return a->ip[0] == 0 && a->ip[1] == 0 && a->ip[2] == 0 && a->ip[3] == bpf_htonl(1);
}

/* is_ns_addr: ip is an address of the namespace netns itself. */
static __always_inline bool is_ns_addr(__u64 netns, const struct addr *ip)
{
	struct ns_addr k = { .netns = netns, .ip = *ip };

	return bpf_map_lookup_elem(&smesh_ns_addrs, &k) != NULL;
}

/* Same-node, seen from namespace netns: loopback, an address of netns itself,
 * or of any namespace smeshd knows on this node (enrolled ones, its own). */
static __always_inline bool is_local(__u64 netns, const struct addr *ip)
{
	return addr_is_loopback(ip) || is_ns_addr(netns, ip) ||
	       bpf_map_lookup_elem(&smesh_addrs, ip) != NULL;
}

/* peer_netns names the namespace of the other end of a connection that a
 * socket in namespace own has with remote: own for loopback and own
 * addresses, else the one namespace that has remote. 0 when no namespace or
 * several have it: such a connection is not spliced (correct first). */
static __always_inline __u64 peer_netns(__u64 own, const struct addr *remote)
{
	struct addr_owner *o;

	if (addr_is_loopback(remote) || is_ns_addr(own, remote))
		return own;
	o = bpf_map_lookup_elem(&smesh_addrs, remote);
	return o ? o->netns : 0;
}

#endif /* __SMESH_H__ */
