/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Workload identities and same-node policy (docs/identity.md 2 and 5.2).
 *
 * smeshd numbers every identity name on this node (0: unknown, 1: the node
 * itself) and writes, per workload cgroup, its number (smesh_identity) and,
 * per workload address, the number of the workload that owns it
 * (smesh_addr_ids), and per port a workload claims in a namespace shared by
 * several (smesh_port_ids). connect4/6 find the caller's number by walking up its
 * cgroup ancestry (caller_identity), remember it on a captured socket
 * (smesh_src_sk, smesh.h, which sock_ops publishes for smeshd's getsockopt
 * SMESH_SO_SRC_ID) and, for a connect() to a workload on this node that a
 * policy covers, decide it (police).
 *
 * Every map here is new in issue 25 and written by smeshd alone, so a
 * successor refills it; values that may grow carry a version byte and
 * reserved room all the same. */
#ifndef __SMESH_IDENTITY_H__
#define __SMESH_IDENTITY_H__

#include "smesh.h"

/* How many cgroup levels caller_identity looks at, from the caller's own
 * up: a bounded loop of one ancestor id and one lookup each. Pods sit at
 * levels 3-5 below kubepods, with their containers one level deeper;
 * systemd units at 2-3. */
#define IDENT_WALK 8
/* leaf_level finds the caller's level by bisection over 0..2^IDENT_LEVEL_BITS-1
 * (a cgroup deeper than 63 levels is looked at from level 63 up). */
#define IDENT_LEVEL_BITS 6

#define IDENT_CFG_VERSION 1

struct ident_cfg {
	__u8 version; /* IDENT_CFG_VERSION; 0: never written */
	__u8 reserved0;
	__u16 reserved1;
	/* The policy generation connect4/6 read smesh_policy with: smeshd
	 * writes a whole new policy under the next generation, flips this,
	 * waits for the programs that read the old one, then deletes the old
	 * keys (datapath.SetPolicy). */
	__u32 policy_gen;
	__u64 reserved[2];
};

/* Written by smeshd (its one entry); read by connect4/6. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ident_cfg);
} smesh_ident_cfg SEC(".maps");

/* Written by smeshd: cgroup id (of a pod, a [[capture.workloads]] cgroup, an
 * enrolled [capture] cgroup) -> identity number. Read by connect4/6: the
 * nearest ancestor of the caller's cgroup that has an entry names it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, __u32);
} smesh_identity SEC(".maps");

/* Written by smeshd: an address of a workload on this node (v4-mapped for
 * IPv4) -> the workload's identity number. Read by connect4/6 (police):
 * the destination of a same-node connect(). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct addr);
	__type(value, __u32);
} smesh_addr_ids SEC(".maps");

/* Key of smesh_port_ids: a TCP port served on the addresses of network
 * namespace netns (its own, loopback included). */
struct port_key {
	__u64 netns; /* netns cookie */
	__u16 port;  /* host byte order */
	__u16 pad;   /* zeroed: keys are compared byte by byte */
	__u32 pad2;  /* zeroed */
};

#define PORT_ID_VERSION 1

struct port_id {
	__u8 version; /* PORT_ID_VERSION */
	__u8 reserved0;
	__u16 reserved1;
	__u32 id; /* the identity number of the workload serving the port */
	__u64 reserved;
};

/* Written by smeshd: {namespace, port} -> the workload ([[capture.workloads]]
 * ports) that serves that TCP port on the namespace's addresses. Read by
 * connect4/6 (police) for a destination smesh_addr_ids does not name: a
 * namespace shared by several workloads (the node's own, where systemd units
 * run) names its workloads by port. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct port_key);
	__type(value, struct port_id);
} smesh_port_ids SEC(".maps");

enum {
	POLICY_KEY_RULE = 0,    /* a verdict for {dst, src, port} */
	POLICY_KEY_POLICED = 1, /* dst has policy (src, port 0): decide its connects */
};

struct policy_key {
	__u32 gen; /* smesh_ident_cfg.policy_gen the entry belongs to */
	__u32 dst; /* destination identity number */
	__u32 src; /* source identity number; 0: any source no rule names */
	__u16 port; /* destination port, host byte order; 0: any port no rule names */
	__u8 kind;  /* POLICY_KEY_* */
	__u8 pad;   /* zeroed: keys are compared byte by byte */
};

#define POLICY_VERDICT_VERSION 1

struct policy_verdict {
	__u8 version; /* POLICY_VERDICT_VERSION */
	__u8 allow;   /* 1 allow, 0 deny */
	__u16 policy; /* the policy's number, for smesh_policy_denied */
	__u32 reserved;
};

/* Written by smeshd (SetPolicy, a generation at a time); read by
 * connect4/6. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct policy_key);
	__type(value, struct policy_verdict);
} smesh_policy SEC(".maps");

/* Written by connect4/6 (per CPU): connects denied, by policy number (0: no
 * rule matched a policed destination). Read by smeshd (metrics). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, __u64);
} smesh_policy_denied SEC(".maps");

static __always_inline struct ident_cfg *ident_cfg(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&smesh_ident_cfg, &zero);
}

/* leaf_level is the level of the calling task's cgroup (the root is 0):
 * bpf_get_current_ancestor_cgroup_id(level) is 0 exactly for the levels
 * below it (cgroup_ancestor), so a bisection finds it in IDENT_LEVEL_BITS
 * calls. Asked of the kernel rather than written by smeshd: a level
 * counted from smeshd's cgroup v2 mount is off by the depth of its cgroup
 * namespace's root, when it runs in one (a pod). */
static __always_inline int leaf_level(void)
{
	int lo = 0, hi = 1 << IDENT_LEVEL_BITS, i;

	for (i = 0; i < IDENT_LEVEL_BITS; i++) {
		int mid = (lo + hi) / 2;

		if (bpf_get_current_ancestor_cgroup_id(mid))
			lo = mid;
		else
			hi = mid;
	}
	return lo;
}

/* caller_identity is the number of the nearest cgroup, from the calling
 * task's own up at most IDENT_WALK levels, that smesh_identity names; 0
 * when none does (not a workload's, or the cgroup v2 root). */
static __always_inline __u32 caller_identity(void)
{
	int top = leaf_level(), i;

	for (i = 0; i < IDENT_WALK; i++) {
		int level = top - i;
		__u64 cg;
		__u32 *id;

		if (level < 1)
			break;
		cg = bpf_get_current_ancestor_cgroup_id(level);
		if (!cg)
			continue;
		id = bpf_map_lookup_elem(&smesh_identity, &cg);
		if (id)
			return *id;
	}
	return 0;
}

/* remember_source records the caller's number on a socket connect4/6
 * captures, for sock_ops to publish at establishment (smesh_src_ids). */
static __always_inline void remember_source(struct bpf_sock *sk)
{
	struct src_id *s = bpf_sk_storage_get(&smesh_src_sk, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);

	if (!s) /* out of memory: the connection has no source */
		return;
	s->version = SRC_ID_VERSION;
	s->id = caller_identity();
}

static __always_inline struct policy_verdict *policy_lookup(__u32 gen, __u32 dst, __u32 src, __u16 port)
{
	struct policy_key k = { .gen = gen, .dst = dst, .src = src, .port = port, .kind = POLICY_KEY_RULE };

	return bpf_map_lookup_elem(&smesh_policy, &k);
}

static __always_inline void count_denied(__u32 policy)
{
	__u64 one = 1, *c = bpf_map_lookup_elem(&smesh_policy_denied, &policy);

	if (!c) {
		/* The first denial under this policy on any CPU makes the
		 * entry (this CPU's slot 1, the others 0); another CPU that
		 * made it meanwhile makes this insert fail: count in its
		 * entry then. */
		if (bpf_map_update_elem(&smesh_policy_denied, &policy, &one, BPF_NOEXIST) == 0)
			return;
		c = bpf_map_lookup_elem(&smesh_policy_denied, &policy);
	}
	if (c)
		__sync_fetch_and_add(c, 1); /* atomic although per CPU: see count() */
}

/* dst_identity is the number of the workload a connect() from namespace
 * netns to ip:port reaches on this node, 0 when none is known: the owner of
 * the address (smesh_addr_ids), else the owner of the port in the namespace
 * the address belongs to (smesh_port_ids): netns itself for loopback and its
 * own addresses, else the one namespace that has ip (the node's for a node
 * address dialled from a pod). */
static __always_inline __u32 dst_identity(__u64 netns, const struct addr *ip, __u16 port)
{
	struct port_key pk = { .port = port };
	struct port_id *p;
	__u32 *dst;

	dst = bpf_map_lookup_elem(&smesh_addr_ids, ip);
	if (dst && *dst)
		return *dst;
	pk.netns = peer_netns(netns, ip);
	if (!pk.netns)
		return 0;
	p = bpf_map_lookup_elem(&smesh_port_ids, &pk);
	return p ? p->id : 0;
}

/* police decides a connect() from namespace netns to ip:port that is a
 * workload on this node (dst_identity): true to let it go on. A destination
 * no policy covers (no POLICED entry) costs its dst_identity lookups and one
 * more. A covered one is decided by
 * the first entry of {dst, src, port}, {dst, src, 0}, {dst, 0, port},
 * {dst, 0, 0}; none of them: denied (policy 0). All lookups use the one
 * generation read first, so a policy change is seen whole or not at all. */
static __always_inline bool police(__u64 netns, const struct addr *ip, __u16 port)
{
	struct policy_verdict *v;
	struct policy_key k = {};
	struct ident_cfg *cfg;
	__u32 dst, src, gen;

	dst = dst_identity(netns, ip, port);
	if (!dst)
		return true;
	cfg = ident_cfg();
	if (!cfg)
		return true;
	gen = cfg->policy_gen;
	k.gen = gen;
	k.dst = dst;
	k.kind = POLICY_KEY_POLICED;
	if (!bpf_map_lookup_elem(&smesh_policy, &k))
		return true;
	src = caller_identity();
	v = policy_lookup(gen, k.dst, src, port);
	if (!v)
		v = policy_lookup(gen, k.dst, src, 0);
	if (!v && src != 0) {
		v = policy_lookup(gen, k.dst, 0, port);
		if (!v)
			v = policy_lookup(gen, k.dst, 0, 0);
	}
	if (v && v->allow)
		return true;
	count_denied(v ? v->policy : 0);
	return false;
}

#endif /* __SMESH_IDENTITY_H__ */
