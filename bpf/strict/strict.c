// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* Strict inbound (docs/identity.md 5.3): a strict workload accepts TCP only
 * through the mesh.
 *
 * smesh_strict_sockops (sock_ops, on smeshd's own cgroup and on every
 * enrolled cgroup while any workload is strict) records the 4-tuple of every
 * SYN a mesh socket sends to an address of this node, in the receiver's
 * view, in smesh_mesh_syn: at BPF_SOCK_OPS_TCP_CONNECT_CB, which tcp_connect()
 * runs for every active open before it builds the SYN, with the addresses
 * and the source port already bound (no callback flag needed). The entry goes
 * when the connection is established or closes.
 *
 * smesh_strict_ingress (cgroup_skb/ingress, on each strict cgroup) sees every
 * packet delivered to a socket of that cgroup: tcp_v4_rcv/tcp_v6_rcv ->
 * tcp_filter -> sk_filter_trim_cap runs it with the socket the packet goes to,
 * for a SYN the listener. A bare SYN (SYN set, ACK clear) passes only if a
 * mesh socket recorded it, or its port is exempt for the nearest strict
 * cgroup, or it comes over loopback inside a namespace that is not smeshd's
 * own; every other packet passes. A dropped SYN is counted
 * (STRICT_DROPPED); the client retransmits it and finally times out. */

#include "smesh.h"

#define TCP_CLOSE 7
#define IPPROTO_HOPOPTS 0
#define IPPROTO_ROUTING 43
#define IPPROTO_FRAGMENT 44
#define IPPROTO_AH 51
#define IPPROTO_DSTOPTS 60
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

/* smeshd's own network namespace (netns cookie), set before load: there
 * loopback is shared by every process of the node (hostNetwork pods, systemd
 * units), so a loopback SYN is checked like any other. */
volatile const __u64 node_netns = 0;

/* A strict cgroup (port 0) or one of its exempt ports. */
struct strict_key {
	__u64 cgroup; /* cgroup id */
	__u16 port;   /* host byte order; 0: the cgroup itself */
	__u16 pad1;
	__u32 pad2; /* zeroed: keys are compared byte by byte */
};

/* Value of smesh_strict. The layout is frozen once shipped: later options
 * go into reserved, announced by version. */
struct strict_opts {
	__u8 version; /* 1 */
	__u8 flags;   /* none yet */
	__u8 reserved[6];
};

/* Value of smesh_mesh_syn. Frozen as strict_opts is. */
struct mesh_syn {
	__u8 version; /* 1 */
	__u8 reserved[15];
};

/* Counter slots of smesh_strict_counters. Slots up to STRICT_COUNTER_MAX
 * exist from the start, so that new ones need no new layout. */
enum strict_counter {
	STRICT_DROPPED = 0,   /* a SYN no mesh socket sent: dropped */
	STRICT_MESH = 1,      /* a SYN a mesh socket sent: passed */
	STRICT_EXEMPT = 2,    /* a SYN to an exempt port: passed */
	STRICT_LOOPBACK = 3,  /* a loopback SYN in a workload's own namespace: passed */
	STRICT_COUNTER_MAX = 16,
};

/* Written by smeshd (SetStrict): {cgroup id, 0} for every strict cgroup,
 * {cgroup id, port} for each of its exempt ports. Read by the ingress
 * program. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct strict_key);
	__type(value, struct strict_opts);
} smesh_strict SEC(".maps");

/* Written by smesh_strict_sockops (a mesh socket's SYN, keyed as the
 * receiving socket sees its connection: the receiver's netns, its own address
 * and port as local, the sender's as remote; deleted when the sender is
 * established or closes); read by the ingress program. LRU: an entry whose
 * socket never reported its close cannot fill the map. Adopted across
 * restarts (a SYN retransmitted across an upgrade is checked by the new
 * program), never made anew. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct conn_key);
	__type(value, struct mesh_syn);
} smesh_mesh_syn SEC(".maps");

/* Written by the ingress program, per CPU; read by smeshd. Apart from
 * smesh_counters, whose layout is frozen. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STRICT_COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} smesh_strict_counters SEC(".maps");

static __always_inline void strict_count(__u32 slot)
{
	__u64 *c = bpf_map_lookup_elem(&smesh_strict_counters, &slot);

	/* Per CPU, but softirq and process context can interleave. */
	if (c)
		__sync_fetch_and_add(c, 1);
}

/* syn_key_of names the connection skops is opening as its peer will see it
 * (see smesh_mesh_syn). False when the peer is not on this node, or its
 * namespace is unknown or ambiguous (peer_netns): nothing is recorded, and
 * a strict peer drops the SYN (correct first). */
static __always_inline bool syn_key_of(struct bpf_sock_ops *skops, struct conn_key *k)
{
	struct addr local, remote;
	__u64 peer;

	if (skops->family == AF_INET) {
		addr_from4(&local, skops->local_ip4);
		addr_from4(&remote, skops->remote_ip4);
	} else if (skops->family == AF_INET6) {
		/* A dual-stack socket's IPv4 connection reads v4-mapped. */
		local.ip[0] = skops->local_ip6[0];
		local.ip[1] = skops->local_ip6[1];
		local.ip[2] = skops->local_ip6[2];
		local.ip[3] = skops->local_ip6[3];
		remote.ip[0] = skops->remote_ip6[0];
		remote.ip[1] = skops->remote_ip6[1];
		remote.ip[2] = skops->remote_ip6[2];
		remote.ip[3] = skops->remote_ip6[3];
	} else {
		return false;
	}
	peer = peer_netns(bpf_get_netns_cookie(skops), &remote);
	if (!peer)
		return false;
	k->netns = peer;
	k->local = remote;
	k->remote = local;
	/* remote_port holds the big-endian port in its upper 16 bits. */
	k->local_port = bpf_ntohs((__u16)(skops->remote_port >> 16));
	k->remote_port = (__u16)skops->local_port;
	k->pad = 0;
	return true;
}

SEC("sockops")
int smesh_strict_sockops(struct bpf_sock_ops *skops)
{
	struct mesh_syn v = { .version = 1 };
	struct conn_key k;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		if (!syn_key_of(skops, &k))
			break;
		if (bpf_map_update_elem(&smesh_mesh_syn, &k, &v, BPF_ANY) == 0)
			/* STATE_CB: forget the SYN when a connection that is
			 * never established closes. */
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
							 BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		/* The peer took the SYN: nothing more of this handshake to
		 * check. */
		if (syn_key_of(skops, &k))
			bpf_map_delete_elem(&smesh_mesh_syn, &k);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		/* args[1] is the new state. */
		if (skops->args[1] == TCP_CLOSE && syn_key_of(skops, &k))
			bpf_map_delete_elem(&smesh_mesh_syn, &k);
		break;
	}
	return 1;
}

/* skb_netns is the network namespace of the socket skb is delivered to.
 * bpf_get_netns_cookie takes a cgroup_skb context only since Linux 6.15;
 * before, the cookie is read from the socket (CO-RE; struct net has had a
 * u64 net_cookie since 5.12). 0 when the socket is not a TCP one. */
static __always_inline __u64 skb_netns(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	struct tcp_sock *tp;

	if (!sk)
		return 0;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	return tp->inet_conn.icsk_inet.sk.__sk_common.skc_net.net->net_cookie;
}

/* strict_cgroup is the nearest strict cgroup (an id in smesh_strict) at or
 * above the receiving socket's cgroup; 0 for none. */
static __always_inline __u64 strict_cgroup(struct __sk_buff *skb)
{
	struct strict_key k = {};
	__u64 nearest = 0;

	/* Walked from the root down: nothing tells the leaf's level. Pods
	 * sit 3-5 levels below the root, systemd units 2-3. */
	for (int level = 1; level <= 12; level++) {
		__u64 id = bpf_skb_ancestor_cgroup_id(skb, level);

		if (!id)
			break;
		k.cgroup = id;
		if (bpf_map_lookup_elem(&smesh_strict, &k))
			nearest = id;
	}
	return nearest;
}

/* sk_is_tcp: the receiving socket is a TCP one. */
static __always_inline bool sk_is_tcp(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;

	if (!sk)
		return false;
	sk = bpf_sk_fullsock(sk);
	return sk && sk->protocol == IPPROTO_TCP;
}

SEC("cgroup_skb/ingress")
int smesh_strict_ingress(struct __sk_buff *skb)
{
	struct strict_key sk = {};
	struct conn_key k = {};
	__u8 ip[40], nh = 0, tcp[14];
	__u32 off;

	/* skb->data is at the network header here: cgroup_skb ingress pushes
	 * the header tcp_v4_rcv pulled. */
	if (bpf_skb_load_bytes(skb, 0, ip, 1))
		return 1;
	if ((ip[0] >> 4) == 4) {
		if (bpf_skb_load_bytes(skb, 0, ip, 20))
			return 1;
		if (ip[9] != IPPROTO_TCP)
			return 1;
		off = (ip[0] & 0xf) * 4;
		addr_from4(&k.remote, *(__u32 *)&ip[12]);
		addr_from4(&k.local, *(__u32 *)&ip[16]);
	} else if ((ip[0] >> 4) == 6) {
		if (bpf_skb_load_bytes(skb, 0, ip, 40))
			return 1;
		__builtin_memcpy(k.remote.ip, &ip[8], 16);
		__builtin_memcpy(k.local.ip, &ip[24], 16);
		nh = ip[6];
		off = 40;
		/* Extension headers, a few: a SYN hidden behind more is not
		 * let through (below). */
		for (int i = 0; i < 4 && nh != IPPROTO_TCP; i++) {
			__u8 ext[2];

			if (bpf_skb_load_bytes(skb, off, ext, 2))
				break;
			if (nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS)
				off += ((__u32)ext[1] + 1) * 8;
			else if (nh == IPPROTO_AH)
				off += ((__u32)ext[1] + 2) * 4;
			else if (nh == IPPROTO_FRAGMENT)
				off += 8;
			else
				break;
			nh = ext[0];
		}
		if (nh != IPPROTO_TCP) {
			/* A TCP socket receives only TCP: a header we cannot
			 * walk to the TCP one on it is dropped (counted),
			 * rather than a SYN let through unchecked. */
			if (sk_is_tcp(skb)) {
				strict_count(STRICT_DROPPED);
				return 0;
			}
			return 1;
		}
	} else {
		return 1;
	}
	if (bpf_skb_load_bytes(skb, off, tcp, sizeof(tcp)))
		return 1;
	if ((tcp[13] & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
		return 1; /* not a bare SYN: established traffic, SYN-ACKs */

	k.remote_port = ((__u16)tcp[0] << 8) | tcp[1];
	k.local_port = ((__u16)tcp[2] << 8) | tcp[3];
	k.netns = skb_netns(skb);
	if (k.netns) {
		if (bpf_map_lookup_elem(&smesh_mesh_syn, &k)) {
			strict_count(STRICT_MESH);
			return 1;
		}
		/* Loopback reaches no further than its namespace: in a
		 * workload's own, it comes from the workload itself. */
		if (k.netns != node_netns && addr_is_loopback(&k.remote)) {
			strict_count(STRICT_LOOPBACK);
			return 1;
		}
	}
	sk.cgroup = strict_cgroup(skb);
	sk.port = k.local_port;
	if (sk.cgroup && sk.port && bpf_map_lookup_elem(&smesh_strict, &sk)) {
		strict_count(STRICT_EXEMPT);
		return 1;
	}
	strict_count(STRICT_DROPPED);
	return 0;
}

char __license[] SEC("license") = "Dual BSD/GPL";
