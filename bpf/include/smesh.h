/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Types and maps shared by smesh's BPF programs.
 *
 * Every object that includes this header declares the same maps; smeshd creates
 * each map once and hands it to every object it loads (cilium/ebpf
 * MapReplacements), so the programs of connect/, sockops/ and skmsg/ all see
 * one instance.
 */
#ifndef __SMESH_H__
#define __SMESH_H__

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define SOCK_STREAM 1

/* One TCP connection as seen from one of its sockets. Addresses are in network
 * byte order, ports in host byte order. The peer's key is the same four values
 * with local and remote swapped. */
struct sock_key {
	__u32 local_ip4;
	__u32 remote_ip4;
	__u16 local_port;
	__u16 remote_port;
};

/* Where a captured connection was going before connect4 sent it to smeshd. */
struct orig_dst {
	__u32 ip4;  /* network byte order */
	__u16 port; /* host byte order */
	__u16 pad;
};

/* Per-socket state, kept in socket-local storage: freed with the socket. */
struct sock_state {
	struct orig_dst orig; /* set by connect4 on a captured socket */
	__u8 captured;        /* connect4 rewrote this socket's destination */
	__u8 role;            /* ROLE_*, set by sockops */
	__u8 path;            /* PATH_*, decided by sk_msg on the first send */
	__u8 pad;
};

enum {
	ROLE_UNKNOWN = 0,
	ROLE_CLIENT = 1, /* the side that called connect() */
	ROLE_SERVER = 2, /* the side that accept()ed */
};

/* sk_msg decides once per socket, on its first send, whether that direction of
 * the connection is spliced or takes the TCP stack, and then never changes:
 * mixing the two paths within one direction could reorder bytes. */
enum {
	PATH_UNDECIDED = 0,
	PATH_SPLICE = 1,
	PATH_TCP = 2,
};

/* Counter slots of smesh_stats: bytes and messages spliced, by the role of the
 * sending socket (client->server is "tx", server->client is "rx"). */
enum {
	STAT_CLIENT_TO_SERVER = 0,
	STAT_SERVER_TO_CLIENT = 1,
	STAT_MAX = 2,
};

struct splice_stats {
	__u64 bytes;
	__u64 msgs;
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
 * the client's view of the 4-tuple) and deleted when that socket closes; read
 * by cgroup/getsockopt (SO_ORIGINAL_DST on the accepted socket) and smeshd. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, struct orig_dst);
} smesh_orig_dst SEC(".maps");

/* Written by connect4 (orig), sockops (role) and sk_msg (path); read by the
 * same. Socket-local, so nothing is left behind when a socket closes. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
} smesh_sk_state SEC(".maps");

/* Written by smeshd (the IPv4 addresses of this node, kept up to date); read
 * by connect4 and sockops to tell same-node destinations apart. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} smesh_local_addrs SEC(".maps");

/* Written by sk_msg (per CPU, no locking on the data path); read by smeshd. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, struct splice_stats);
} smesh_stats SEC(".maps");

static __always_inline bool is_loopback(__u32 ip4)
{
	return (bpf_ntohl(ip4) >> 24) == 127;
}

/* Same-node: loopback, or one of this node's addresses. */
static __always_inline bool is_local(__u32 ip4)
{
	return is_loopback(ip4) || bpf_map_lookup_elem(&smesh_local_addrs, &ip4);
}

#endif /* __SMESH_H__ */
