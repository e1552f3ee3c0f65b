// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* sk_msg splices same-node hops: every send on a socket in the sockhash goes
 * straight into the receive queue of the peer socket, skipping TCP/IP. */

#include "smesh.h"

static __always_inline void count(__u8 role, __u32 size)
{
	__u32 slot = role == ROLE_SERVER ? STAT_SERVER_TO_CLIENT : STAT_CLIENT_TO_SERVER;
	struct splice_stats *s = bpf_map_lookup_elem(&smesh_stats, &slot);

	if (s) {
		s->bytes += size;
		s->msgs++;
	}
}

SEC("sk_msg")
int smesh_skmsg(struct sk_msg_md *msg)
{
	struct sock_state *st;

	struct bpf_sock *sk = msg->sk;

	if (!sk) /* the verifier wants sk checked for NULL before use */
		return SK_PASS;
	/* sock_ops made the state, with the peer's key, before it put the
	 * socket in the sockhash. */
	st = bpf_sk_storage_get(&smesh_sk_state, sk, 0, 0);
	if (!st || st->path == PATH_TCP)
		return SK_PASS;

	if (bpf_msg_redirect_hash(msg, &smesh_sockhash, &st->peer, BPF_F_INGRESS) == SK_PASS) {
		st->path = PATH_SPLICE;
		count(st->role, msg->size);
		return SK_PASS;
	}
	/* The peer is not in the map. On the first send that means it is not
	 * spliced (not enrolled, map full, or not yet established): this
	 * direction takes TCP for good. After splicing began it means the peer
	 * closed; TCP then reports that to the sender as usual. Never SK_DROP:
	 * the app would see EACCES. */
	if (st->path == PATH_UNDECIDED)
		st->path = PATH_TCP;
	return SK_PASS;
}

char __license[] SEC("license") = "Dual BSD/GPL";
