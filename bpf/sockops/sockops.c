// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* sock_ops puts both ends of every same-node TCP hop into the sockhash when
 * the connection is established, and publishes the original destination of
 * captured connections for SO_ORIGINAL_DST. Attached to every enrolled cgroup
 * and to smeshd's own cgroup (its accepted and dialled sockets are hop ends). */

#include "smesh.h"

#define TCP_CLOSE 7

/* Set by smeshd before load: copy mode records original destinations but
 * splices nothing. */
volatile const bool splice = 0;
/* Splice the hops that have smeshd at one end (captured app <-> smeshd,
 * smeshd <-> local server). sk_msg ingress redirect has no flow control:
 * when the reader is slower than the sender (an upload into the tunnel) the
 * queue grows until TCP memory runs out and the sender gets ENOMEM. Off,
 * those hops keep TCP; direct same-node connections are spliced either way.
 * smeshd leaves sock_ops off its own cgroup then, so only the app side of a
 * captured hop needs the check below. */
volatile const bool splice_proxy_hops = 0;

static __always_inline void key_of(struct bpf_sock_ops *skops, struct sock_key *key)
{
	key->local_ip4 = skops->local_ip4;
	key->remote_ip4 = skops->remote_ip4;
	key->local_port = (__u16)skops->local_port;
	/* remote_port holds the big-endian port in its upper 16 bits. */
	key->remote_port = bpf_ntohs((__u16)(skops->remote_port >> 16));
}

static __always_inline void established(struct bpf_sock_ops *skops, __u8 role)
{
	struct sock_state *st;
	struct bpf_sock *sk;
	struct sock_key key;

	if (skops->family != AF_INET)
		return;
	key_of(skops, &key);

	/* The verifier wants sk checked for NULL before use. */
	sk = skops->sk;
	st = sk ? bpf_sk_storage_get(&smesh_sk_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE) : NULL;
	if (st) {
		st->role = role;
		if (st->captured &&
		    bpf_map_update_elem(&smesh_orig_dst, &key, &st->orig, BPF_ANY) == 0)
			/* Ask for state changes so the entry is removed on close. */
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
							 BPF_SOCK_OPS_STATE_CB_FLAG);
	}

	if (splice && is_local(skops->remote_ip4) &&
	    (splice_proxy_hops || !(st && st->captured)))
		/* Fails when the map is full: the connection then takes the
		 * TCP stack, which sk_msg handles like any unspliced peer. */
		bpf_sock_hash_update(skops, &smesh_sockhash, &key, BPF_NOEXIST);
}

SEC("sockops")
int smesh_sockops(struct bpf_sock_ops *skops)
{
	struct sock_key key;

	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		established(skops, ROLE_CLIENT);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		established(skops, ROLE_SERVER);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		/* args[1] is the new state. */
		if (skops->args[1] == TCP_CLOSE && skops->family == AF_INET) {
			key_of(skops, &key);
			bpf_map_delete_elem(&smesh_orig_dst, &key);
		}
		break;
	}
	return 1;
}

char __license[] SEC("license") = "Dual BSD/GPL";
