// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* sk_msg splices same-node hops: every send on a socket in the sockhash goes
 * straight into the receive queue of the peer socket, skipping TCP/IP.
 *
 * The kernel gives such a redirect no flow control: the sender's memory is
 * released at once and the receiver is charged without any comparison to its
 * buffer size, so a reader slower than its writer lets the queue grow until
 * the node's TCP memory runs out. smesh_skmsg bounds it: when the bytes
 * waiting at the peer plus this message would pass splice_queue_limit, that
 * direction is demoted to TCP for good, and TCP's own flow control bounds the
 * rest (the writer blocks, as without the mesh). Demoting is order-safe: the
 * peer reads TCP data only once its redirected queue is empty, and every
 * redirected byte is queued before the first TCP byte is sent. Promoting back
 * is not (a reader parked in tcp_recvmsg waits on the TCP queue only), so a
 * demoted direction never splices again.
 *
 * A demoted socket still sends through tcp_bpf_sendmsg, far slower than
 * plain TCP, until sockops takes it out of the sockhash (release() in
 * sockops.c), which it may do only once the other direction will never
 * redirect into it again and it has read all that direction redirected.
 * close_own() here tells it so: a socket whose own sends go by TCP marks its
 * smesh_dirs entry PATH_CLOSED once no redirect of its own can still be on
 * its way and its peer's queue is empty; and a spliced direction whose peer
 * closed its own that way gives up splicing (a small request answered by a
 * large download: the request's direction goes to TCP at its next send), so
 * that both ends can go back to plain TCP.
 *
 * smesh_skmsg_unbounded is the same without the bound, for kernels without
 * what the bound reads (the kfuncs bpf_cast_to_kern_ctx and bpf_rdonly_cast,
 * Linux 6.2) or without CAP_PERFMON; smeshd chooses which one to load. */

#include "smesh.h"
#include <bpf/bpf_core_read.h>

/* Set by smeshd before load: [datapath] splice_queue_limit, in bytes. */
volatile const __u32 splice_queue_limit = 2 << 20;
/* Issue 27's experiment, off unless a test sets it (datapath's
 * Options.resplice; never by configuration): a demoted direction splices
 * again once resplice_safe() holds, and is demoted again at the limit. Not
 * safe for every reader: docs/resplice.md. */
volatile const bool resplice = 0;

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;

/* The low bits of sk_user_data are flags (SK_USER_DATA_NOCOPY, _BPF,
 * _PSOCK); the rest points to the socket's sk_psock. */
#define SK_USER_DATA_PTRMASK (~7UL)

/* psock_of is the socket's sk_psock (NULL once it left the sockhash). */
static __always_inline struct sk_psock *psock_of(struct sock *sk)
{
	unsigned long data = (unsigned long)sk->sk_user_data & SK_USER_DATA_PTRMASK;

	return bpf_rdonly_cast((void *)data, bpf_core_type_id_kernel(struct sk_psock));
}

/* queued returns the bytes that wait in the receive queue of the socket
 * bpf_msg_redirect_hash just chose for msg. */
static __always_inline __u64 queued(struct sk_msg_md *msg)
{
	struct sk_msg *kmsg = bpf_cast_to_kern_ctx(msg);
	struct sock *peer = kmsg->sk_redir;
	struct sk_psock *psock;

	if (!peer)
		return 0;
	/* 6.18 counts the redirected bytes waiting in the psock (for
	 * FIONREAD); older kernels that charge receive memory for them
	 * (6.13, backported to 6.6.69 and 6.12) have them in sk_rmem_alloc. */
	psock = psock_of(peer);
	if (psock && bpf_core_field_exists(psock->msg_tot_len))
		return psock->msg_tot_len;
	return peer->sk_backlog.rmem_alloc.counter;
}

/* writer_acked: every byte the sending socket handed to TCP is
 * acknowledged (snd_una == write_seq). */
static __always_inline bool writer_acked(struct sk_msg_md *msg)
{
	struct sk_msg *kmsg = bpf_cast_to_kern_ctx(msg);
	struct tcp_sock *tp = bpf_rdonly_cast(kmsg->sk, bpf_core_type_id_kernel(struct tcp_sock));

	return tp->snd_una == tp->write_seq;
}

/* reader_idle: the peer bpf_msg_redirect_hash just chose has read all it
 * received by TCP (copied_seq == rcv_nxt, receive queue and backlog
 * empty), nobody waits on it (SOCKWQ_ASYNC_WAITDATA clear) or holds its
 * lock, and its SO_RCVLOWAT is at most 1: issue 27's candidate condition,
 * read with plain loads under the writer's lock only (naive on purpose). */
static __always_inline bool reader_idle(struct sk_msg_md *msg)
{
	struct sk_msg *kmsg = bpf_cast_to_kern_ctx(msg);
	struct sock *peer = kmsg->sk_redir;
	struct tcp_sock *tp;
	struct socket_wq *wq;

	if (!peer)
		return false;
	tp = bpf_rdonly_cast(peer, bpf_core_type_id_kernel(struct tcp_sock));
	if (tp->copied_seq != tp->rcv_nxt)
		return false;
	if (peer->sk_receive_queue.qlen != 0 || peer->sk_backlog.tail)
		return false;
	if (peer->sk_lock.owned)
		return false;
	if (peer->sk_rcvlowat > 1)
		return false;
	/* sk_set_bit keeps WAITDATA in sk_wq_raw->flags, and sets it only
	 * for an O_ASYNC (SOCK_FASYNC) socket: for others this term is
	 * always true (docs/resplice.md). */
	wq = peer->sk_wq_raw;
	if (wq && (wq->flags & (1UL << SOCKWQ_ASYNC_WAITDATA)))
		return false;
	return true;
}

/* alone: no thread but this one is in a send or a receive through the
 * sending socket's psock. Each such call holds a reference to the psock
 * from its start to its return (tcp_bpf_sendmsg, tcp_bpf_recvmsg), and so
 * does the sockhash entry: two references are this send's and the entry's.
 * A redirect chosen by another thread of this socket is on its way only
 * inside such a call (tcp_bpf_send_verdict releases the socket lock
 * around tcp_bpf_sendmsg_redir), so none is. A reference taken after
 * this read is by a call that has not run sk_msg yet: it will find this
 * direction on TCP. Anything else holding one (another map, a redirect
 * into this socket) only makes this false. */
static __always_inline bool alone(struct sk_msg_md *msg)
{
	struct sk_msg *kmsg = bpf_cast_to_kern_ctx(msg);
	struct sk_psock *psock = psock_of(kmsg->sk);

	return psock && psock->refcnt.refs.counter == 2;
}

/* peer_sent_tcp: the peer has sent this socket bytes by TCP (a spliced
 * peer sends none), so its direction may have closed (close_own()). */
static __always_inline bool peer_sent_tcp(struct sk_msg_md *msg, const struct sock_state *st)
{
	struct sk_msg *kmsg = bpf_cast_to_kern_ctx(msg);
	struct tcp_sock *tp = bpf_rdonly_cast(kmsg->sk, bpf_core_type_id_kernel(struct tcp_sock));

	/* remote_seq: the peer's initial sequence number + 1 (keys_of()). */
	return tp->rcv_nxt != st->self.remote_seq;
}

/* peer_waits: the peer's direction goes by TCP for good (it spliced and
 * closed since, or it never spliced): the peer waits for ours to close, to
 * leave the sockhash (release() in sockops.c). */
static __always_inline bool peer_waits(const struct sock_key *peer)
{
	__u32 *dir = bpf_map_lookup_elem(&smesh_dirs, peer);

	return dir && (*dir == PATH_CLOSED || *dir == PATH_TCP);
}

/* close_own ends this socket's spliced direction for good, once that is
 * safe, so that its peer can leave the sockhash (release() in sockops.c,
 * which waits for smesh_dirs to say PATH_CLOSED): this direction sends by TCP
 * already (nothing redirects to the peer again), no redirect of this socket
 * is on its way (alone()) and the peer has read every byte this socket
 * redirected (its psock queue is empty; it can only shrink meanwhile, as
 * only this socket redirects to it). Called for a send by TCP: returns the
 * verdict that sends msg by TCP, passed, or redirected to the socket itself
 * (egress, as a demotion does; *by_self is then true). */
static __always_inline int close_own(struct sk_msg_md *msg, struct sock_state *st, bool *by_self)
{
	__u32 *dir = bpf_map_lookup_elem(&smesh_dirs, &st->self);
	bool drained;

	if (!dir || *dir != PATH_SPLICE || !alone(msg))
		return SK_PASS;
	/* Our own entry first: missing, the socket is leaving the sockhash,
	 * and a redirect that chose the peer could not be undone. Present,
	 * it stays while this program runs: it goes only under the socket
	 * lock we hold (release(), sock_map_close, the map's freeing). */
	if (bpf_msg_redirect_hash(msg, &smesh_sockhash, &st->self, 0) != SK_PASS)
		return SK_PASS;
	*by_self = true;
	if (bpf_msg_redirect_hash(msg, &smesh_sockhash, &st->peer, BPF_F_INGRESS) != SK_PASS)
		return SK_PASS; /* the peer left: still redirected to ourselves */
	drained = queued(msg) == 0;
	/* Back to ourselves: this message goes by TCP. */
	if (bpf_msg_redirect_hash(msg, &smesh_sockhash, &st->self, 0) != SK_PASS)
		/* Cannot happen (see above); refuse the send rather than
		 * splice it behind bytes sent by TCP. */
		return SK_DROP;
	if (drained)
		__sync_val_compare_and_swap(dir, PATH_SPLICE, PATH_CLOSED);
	return SK_PASS;
}

static __always_inline int splice(struct sk_msg_md *msg, bool bounded)
{
	struct bpf_sock *sk = msg->sk;
	/* Read once: clang would otherwise reload it through a context
	 * pointer it moved, which the verifier refuses. */
	__u32 size = msg->size;
	struct sock_state *st;
	__u32 *dir = NULL;
	int verdict = SK_PASS;
	bool by_self = false;

	if (!sk) /* the verifier wants sk checked for NULL before use */
		return SK_PASS;
	/* sock_ops made the state, with both keys, before it put the socket
	 * in the sockhash. */
	st = bpf_sk_storage_get(&smesh_sk_state, sk, 0, 0);
	if (!st)
		return SK_PASS;
	if (st->path == PATH_UNDECIDED) {
		/* Claim the splice before choosing the peer: the peer's
		 * sock_ops closes an undecided direction (UNDECIDED -> TCP)
		 * before it leaves the sockhash (release() in sockops.c), and
		 * exactly one of the two swaps wins, so no redirect into a
		 * socket that is leaving ever starts. No entry (smesh_dirs
		 * full): the peer never leaves, splice as before. */
		dir = bpf_map_lookup_elem(&smesh_dirs, &st->self);
		if (dir && __sync_val_compare_and_swap(dir, PATH_UNDECIDED, PATH_SPLICE) != PATH_UNDECIDED) {
			/* The peer left the sockhash before this direction
			 * spliced: it goes by TCP, counted as demoted. */
			st->path = PATH_TCP;
			st->demoted = 1;
		}
	}
	if (st->path == PATH_TCP) {
		if (bounded && resplice && st->demoted && !st->released && writer_acked(msg) &&
		    bpf_msg_redirect_hash(msg, &smesh_sockhash, &st->peer, BPF_F_INGRESS) == SK_PASS) {
			/* The redirect chose the peer: splice this message if
			 * the peer is idle and has room, else send it by TCP
			 * through our own socket (as a demotion does). */
			if (reader_idle(msg) && queued(msg) + size <= splice_queue_limit) {
				st->path = PATH_SPLICE;
				count(role_slot(st, STAT_CLIENT_TO_SERVER, STAT_SERVER_TO_CLIENT), size);
				return SK_PASS;
			}
			if (bpf_msg_redirect_hash(msg, &smesh_sockhash, &st->self, 0) != SK_PASS) {
				/* Closing: splice this last message. */
				count(role_slot(st, STAT_CLIENT_TO_SERVER, STAT_SERVER_TO_CLIENT), size);
				return SK_PASS;
			}
		}
		if (bounded && !resplice)
			verdict = close_own(msg, st, &by_self);
		/* A message redirected to its own socket is counted by
		 * sockops as TCP acknowledges it (count_acked), not here:
		 * sent that way, the part tcp_bpf_push_locked could not queue
		 * (EAGAIN on a non-blocking socket whose buffer filled) is
		 * freed and the app sends it again, which would count it
		 * twice. */
		if (st->demoted && !by_self) {
			count_demoted(st, size);
			st->tcp_bytes += size;
		}
		return verdict;
	}

	if (bpf_msg_redirect_hash(msg, &smesh_sockhash, &st->peer, BPF_F_INGRESS) != SK_PASS) {
		/* The peer is not in the map. On the first send that means it
		 * is not spliced (not enrolled, map full, or not yet
		 * established): this direction takes TCP for good. After
		 * splicing began it means the peer closed; TCP then reports
		 * that to the sender as usual. Never SK_DROP: the app would
		 * see EACCES. */
		if (st->path == PATH_UNDECIDED) {
			st->path = PATH_TCP;
			/* Never redirected: the peer may leave the sockhash. */
			if (dir)
				*dir = PATH_TCP;
		}
		return SK_PASS;
	}
	if (bounded && !resplice && st->path == PATH_SPLICE && peer_sent_tcp(msg, st) && peer_waits(&st->peer)) {
		/* The peer sends by TCP for good: it waits for our direction
		 * to close, to leave the sockhash and run as plain TCP (a
		 * large answer to our small request). Give up splicing as a
		 * demotion does (order-safe), and close ours now or as soon
		 * as close_own() may. Without an entry of our own
		 * (smesh_dirs full) it could never close: splice on. */
		__u32 *own = bpf_map_lookup_elem(&smesh_dirs, &st->self);
		bool drained = queued(msg) == 0;

		if (own && bpf_msg_redirect_hash(msg, &smesh_sockhash, &st->self, 0) == SK_PASS) {
			/* Counted by sockops as it is acknowledged (see the
			 * PATH_TCP case above). */
			st->path = PATH_TCP;
			st->demoted = 1;
			if (drained && alone(msg))
				__sync_val_compare_and_swap(own, PATH_SPLICE, PATH_CLOSED);
			return SK_PASS;
		}
		/* No entry, or our own sockhash entry is gone (the socket is
		 * closing): splice this message (sk_redir is the peer). */
	}
	if (bounded && queued(msg) + size > splice_queue_limit) {
		/* The redirect above chose the peer already (returning
		 * SK_PASS now would still redirect): send this message by TCP
		 * instead, through the sender's own socket (egress). */
		if (bpf_msg_redirect_hash(msg, &smesh_sockhash, &st->self, 0) == SK_PASS) {
			/* Counted by sockops as it is acknowledged (see the
			 * PATH_TCP case above). */
			st->path = PATH_TCP;
			st->demoted = 1;
			counter_inc(COUNTER_DEMOTIONS);
			return SK_PASS;
		}
		/* Our own entry is gone (the socket is closing): splice this
		 * last message. */
	}
	st->path = PATH_SPLICE;
	count(role_slot(st, STAT_CLIENT_TO_SERVER, STAT_SERVER_TO_CLIENT), size);
	return SK_PASS;
}

SEC("sk_msg")
int smesh_skmsg(struct sk_msg_md *msg)
{
	return splice(msg, true);
}

SEC("sk_msg")
int smesh_skmsg_unbounded(struct sk_msg_md *msg)
{
	return splice(msg, false);
}

char __license[] SEC("license") = "Dual BSD/GPL";
