// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* sock_ops puts both ends of every same-node TCP hop into the sockhash when
 * the connection is established, and publishes the original destination of
 * captured connections for SO_ORIGINAL_DST. Attached to every enrolled cgroup
 * and to smeshd's own cgroup (its accepted and dialled sockets are hop ends). */

#include "smesh.h"

/* TCP states (include/net/tcp_states.h). */
#define TCP_FIN_WAIT1 4
#define TCP_FIN_WAIT2 5
#define TCP_CLOSE 7
#define TCP_LAST_ACK 9
#define TCP_CLOSING 11

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
/* Set by smeshd when it loads the bounded sk_msg program, whose close_own()
 * closes a direction that spliced once it is safe: release() then waits for
 * that. Without it (the unbounded program, which never demotes), a peer
 * that spliced never closes, and release() stops asking. */
volatile const bool peers_close = 0;

static const __u32 undecided = PATH_UNDECIDED;

/* conn_of reads the socket's view of its connection. */
static __always_inline bool conn_of(struct bpf_sock_ops *skops, struct conn_key *c)
{
	c->netns = bpf_get_netns_cookie(skops);
	if (skops->family == AF_INET) {
		addr_from4(&c->local, skops->local_ip4);
		addr_from4(&c->remote, skops->remote_ip4);
	} else if (skops->family == AF_INET6) {
		/* A dual-stack socket's IPv4 connection reads as v4-mapped
		 * here, as struct addr wants it. */
		c->local.ip[0] = skops->local_ip6[0];
		c->local.ip[1] = skops->local_ip6[1];
		c->local.ip[2] = skops->local_ip6[2];
		c->local.ip[3] = skops->local_ip6[3];
		c->remote.ip[0] = skops->remote_ip6[0];
		c->remote.ip[1] = skops->remote_ip6[1];
		c->remote.ip[2] = skops->remote_ip6[2];
		c->remote.ip[3] = skops->remote_ip6[3];
	} else {
		return false;
	}
	c->local_port = (__u16)skops->local_port;
	/* remote_port holds the big-endian port in its upper 16 bits. */
	c->remote_port = bpf_ntohs((__u16)(skops->remote_port >> 16));
	c->pad = 0;
	return true;
}

/* keys_of fills a socket's own sockhash key and its peer's. Returns false
 * when the peer's namespace is unknown: the socket is then not spliced. */
static __always_inline bool keys_of(struct bpf_sock_ops *skops, const struct conn_key *c,
				    struct sock_key *self, struct sock_key *peer)
{
	__u64 peer_ns = peer_netns(c->netns, &c->remote);

	if (!peer_ns)
		return false;
	self->conn = *c;
	/* At establishment neither end has sent data yet: snd_nxt and rcv_nxt
	 * are the initial sequence numbers + 1 (the SYNs), the same pair the
	 * peer holds the other way round. */
	self->local_seq = skops->snd_nxt;
	self->remote_seq = skops->rcv_nxt;

	peer->conn.netns = peer_ns;
	peer->conn.local = c->remote;
	peer->conn.remote = c->local;
	peer->conn.local_port = c->remote_port;
	peer->conn.remote_port = c->local_port;
	peer->conn.pad = 0;
	peer->local_seq = self->remote_seq;
	peer->remote_seq = self->local_seq;
	return true;
}

/* publish_source puts the source connect4/6 remembered on a captured socket
 * (smesh_src_sk) into smesh_src_ids, keyed and kept like its smesh_orig_dst
 * entry (written at establishment, deleted in closed()), for SMESH_SO_SRC_ID.
 * A socket without one (captured by a predecessor's connect4, or out of
 * memory) removes whatever an earlier connection of the same 4-tuple may
 * have left, so that it is never given another connection's source. */
static __always_inline void publish_source(struct bpf_sock *sk, const struct conn_key *conn)
{
	struct src_id *src = bpf_sk_storage_get(&smesh_src_sk, sk, 0, 0);

	if (!src || bpf_map_update_elem(&smesh_src_ids, conn, src, BPF_ANY) != 0)
		bpf_map_delete_elem(&smesh_src_ids, conn);
}

static __always_inline void established(struct bpf_sock_ops *skops, __u8 role)
{
	struct sock_state *st;
	struct bpf_sock *sk;
	struct conn_key conn;

	if (!conn_of(skops, &conn))
		return;
	/* The verifier wants sk checked for NULL before use. */
	sk = skops->sk;
	if (!sk)
		return;
	st = bpf_sk_storage_get(&smesh_sk_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return; /* out of memory: neither recorded nor spliced, plain TCP */
	st->role = role;
	st->acked_at_start = skops->bytes_acked;
	if (st->captured &&
	    bpf_map_update_elem(&smesh_orig_dst, &conn, &st->orig, BPF_ANY) == 0) {
		publish_source(sk, &conn);
		/* Ask for state changes so the entries are removed on close. */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
						 BPF_SOCK_OPS_STATE_CB_FLAG);
	}

	if (!splice || !is_local(conn.netns, &conn.remote) ||
	    (st->captured && !splice_proxy_hops))
		return;
	if (!keys_of(skops, &conn, &st->self, &st->peer))
		return;
	/* The entry the peer's release() swaps; without one (map full) the
	 * peer simply never leaves the sockhash. */
	bpf_map_update_elem(&smesh_dirs, &st->self, &undecided, BPF_NOEXIST);
	/* Fails when the map is full: the connection then takes the TCP
	 * stack, which sk_msg handles like any unspliced peer. */
	if (bpf_sock_hash_update(skops, &smesh_sockhash, &st->self, BPF_NOEXIST) != 0) {
		bpf_map_delete_elem(&smesh_dirs, &st->self);
		return;
	}
	/* The second end of the hop in: both are, so the connection is
	 * spliced (counted once: the client's end is in the map before it
	 * sends the ACK whose arrival establishes the server's). Its
	 * smesh_dirs entry says the peer is in the sockhash without taking
	 * a reference to its socket (which sock_ops could not release). */
	if (bpf_map_lookup_elem(&smesh_dirs, &st->peer))
		counter_inc(COUNTER_SPLICED_CONNS);
	/* STATE_CB: remove the smesh_dirs entry on close. RTT_CB: rtt(). */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
					 BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG);
}

/* count_acked counts what a demoted socket sent by TCP that sk_msg did
 * not count, as it is acknowledged. A demoted socket sent no byte by TCP
 * before its demotion, so what it acknowledged since its establishment
 * covers all of the direction's TCP bytes: sk_msg counted tcp_bytes of them
 * itself (before TCP sent them, so never after their ACK), earlier calls
 * acked_bytes. The rest went without sk_msg: sends after release(), and a
 * message the kernel passed to TCP on a verdict it kept
 * (tcp_bpf_send_verdict, after a send that would have blocked); or sk_msg
 * left them to this count: messages it redirected to the socket itself,
 * part of which the kernel may free and the app send again. state is
 * the socket's TCP state: once this end's FIN is sent (FIN_WAIT1,
 * FIN_WAIT2, CLOSING, LAST_ACK) and everything is acknowledged, the FIN's
 * sequence number is among the acknowledged bytes but is no data (a FIN
 * still queued behind a zero window makes this one byte short until the
 * next ACK). Runs on ACKs (RTT_CB) and at close, under the socket lock, as
 * sk_msg does. The gap is 64-bit: ACKs without an RTT sample may
 * acknowledge any amount before the next call. */
static __always_inline void count_acked(struct bpf_sock_ops *skops, struct sock_state *st, __u32 state)
{
	__u64 acked = skops->bytes_acked - st->acked_at_start;
	__u64 counted = st->tcp_bytes + st->acked_bytes;

	if ((state == TCP_FIN_WAIT1 || state == TCP_FIN_WAIT2 || state == TCP_CLOSING ||
	     state == TCP_LAST_ACK) && skops->snd_una == skops->snd_nxt && acked > 0)
		acked--;
	if (acked <= counted)
		return;
	st->acked_bytes += acked - counted;
	count_demoted(st, acked - counted);
}

/* release takes a socket whose own sends go by TCP (demoted, or TCP from its
 * first send) out of the sockhash, so that the kernel drops its psock and it
 * returns to plain TCP (tcp_prot): tcp_bpf_sendmsg copies every send into an
 * sk_msg, runs sk_msg and pushes it page by page, far slower than
 * tcp_sendmsg.
 *
 * Dropping the psock (sk_psock_drop; sk_psock_destroy zaps the ingress
 * queue) frees whatever waits in its ingress queue, and a redirect from the
 * peer that already chose this socket would fail (EPIPE to the peer's
 * writer) or be freed after it was queued. So the other direction must not
 * redirect into this socket again, none of its redirects may still be on
 * its way, and this socket must have read all of them: the peer's
 * smesh_dirs entry is PATH_UNDECIDED, which release() swaps to PATH_TCP
 * (sk_msg swaps UNDECIDED -> SPLICE before it looks the peer up; one of the
 * two wins: the peer never redirected), PATH_TCP (its first send found no
 * peer), or PATH_CLOSED: it spliced and closed its direction since
 * (close_own() in skmsg.c: the peer sends by TCP, no redirect of its own is
 * on its way, and this socket's queue was empty, which it stays once nothing
 * can add to it). A peer still splicing (PATH_SPLICE) is asked again on a
 * later ACK; with peers_close off nothing would close it, and the socket
 * stays. A closed peer waits for this socket's direction to close too (to
 * leave in turn), so a socket that spliced leaves only once closed.
 *
 * Runs for the socket's own ACKs (RTT_CB), under its socket lock. The psock
 * goes when its last reference does: here, or when a send or receive under
 * way on this socket returns (they hold one); the kernel switches sk_prot
 * back under sk_callback_lock, and a send that already runs in
 * tcp_bpf_sendmsg finishes there, through this program, by TCP. */
static __always_inline void release(struct sock_state *st)
{
	__u32 *dir, *own, was;

	dir = bpf_map_lookup_elem(&smesh_dirs, &st->peer);
	if (!dir)
		/* The peer is not in the sockhash (yet: it may be added at
		 * its establishment, after our first send): ask again. */
		return;
	if (!st->demoted) {
		/* This socket's first send found no peer, yet the peer is in
		 * the sockhash now: the send came before the peer's end was
		 * established (the handshake's last ACK still on its way, as
		 * when a client writes right after connect() returns). The
		 * hop is the mesh's: its bytes by TCP count as demoted, from
		 * the first (count_acked counts from the establishment). */
		st->demoted = 1;
		counter_inc(COUNTER_RACED);
	}
	was = __sync_val_compare_and_swap(dir, PATH_UNDECIDED, PATH_TCP);
	if (was == PATH_SPLICE) {
		if (!peers_close)
			st->stays = 1;
		return;
	}
	if (was == PATH_CLOSED) {
		/* The peer spliced and closed: it waits for this socket's
		 * direction to close in turn, to leave the sockhash too,
		 * which this socket can no longer do once it has left. */
		own = bpf_map_lookup_elem(&smesh_dirs, &st->self);
		if (own && *own == PATH_SPLICE)
			return;
	}
	if (bpf_map_delete_elem(&smesh_sockhash, &st->self) == 0) {
		st->released = 1;
		counter_inc(COUNTER_RELEASED);
	}
}

/* rtt runs on the ACKs of a spliced socket, which come only for bytes sent
 * by TCP, that is once its own direction went to TCP: release() it if it
 * can be, and count a demoted direction's bytes as they are acknowledged. */
static __always_inline void rtt(struct bpf_sock_ops *skops)
{
	struct sock_state *st;
	struct bpf_sock *sk;

	sk = skops->sk;
	if (!sk)
		return;
	st = bpf_sk_storage_get(&smesh_sk_state, sk, 0, 0);
	if (!st || st->path != PATH_TCP)
		return;
	if (!st->released && !st->stays)
		release(st);
	if (st->demoted)
		count_acked(skops, st, skops->state);
	else if (st->released || st->stays)
		/* Nothing left to do on its ACKs: not the mesh's bytes (its
		 * first send found no spliced peer), and released or never
		 * to be. Stop asking. */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_RTT_CB_FLAG);
}

static __always_inline void closed(struct bpf_sock_ops *skops)
{
	struct sock_state *st;
	struct bpf_sock *sk;
	struct conn_key conn;

	if (conn_of(skops, &conn)) {
		bpf_map_delete_elem(&smesh_orig_dst, &conn);
		bpf_map_delete_elem(&smesh_src_ids, &conn);
	}
	sk = skops->sk;
	if (!sk)
		return;
	st = bpf_sk_storage_get(&smesh_sk_state, sk, 0, 0);
	if (!st)
		return;
	bpf_map_delete_elem(&smesh_dirs, &st->self);
	if (st->demoted)
		/* What ACKs without an RTT sample acknowledged since the
		 * last RTT_CB (Karn: none is taken from a retransmitted
		 * segment). args[0] is the state the socket leaves. */
		count_acked(skops, st, skops->args[0]);
}

SEC("sockops")
int smesh_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		established(skops, ROLE_CLIENT);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		established(skops, ROLE_SERVER);
		break;
	case BPF_SOCK_OPS_RTT_CB:
		rtt(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		/* args[1] is the new state. */
		if (skops->args[1] == TCP_CLOSE)
			closed(skops);
		break;
	}
	return 1;
}

char __license[] SEC("license") = "Dual BSD/GPL";
