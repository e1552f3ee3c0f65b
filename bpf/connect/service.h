/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Services balanced at connect time: connect4/connect6 look the destination
 * up in smesh_services and, for a Service VIP:port, send the connection to
 * one of its backends before the capture decision, so that it takes the path
 * a connection to that backend would. On its own so that the test harness
 * (capture_harness.c) runs exactly the choice connect4 makes.
 *
 * A service's backends live under a revision id: smeshd writes a new set
 * under a fresh id, then switches the service entry to it (one map update,
 * atomic for a reader), then deletes the old id's slots. A connect() that
 * read the old entry can still find the old slots (they go last, a second
 * later: a program that read the old id may still be running when the
 * switch is made), and one that reads the new entry finds the new slots
 * complete: never a mix, never an empty slot (Cilium's service revisions,
 * bpf_sock.c).
 *
 * The maps are not preallocated: a preallocated hash map recycles the
 * element an update replaces at once (the per-CPU spare), so a reader
 * holding the old value could see it change under it; without
 * preallocation the old element is freed only after an RCU grace period. */
#ifndef __SMESH_SERVICE_H__
#define __SMESH_SERVICE_H__

#include "smesh.h"

#define ECONNREFUSED 111

/* Flags of struct svc. */
enum {
	SVC_LOCAL_ONLY = 1,   /* only backends on this node: none -> refused */
	SVC_PREFER_LOCAL = 2, /* a backend on this node whenever there is one */
	SVC_AFFINITY = 4,     /* sessionAffinity ClientIP: see smesh_affinity */
};

struct svc_key {
	struct addr vip; /* v4-mapped for IPv4 */
	__u16 port;      /* host byte order */
	__u16 pad;       /* zeroed: keys are compared byte by byte */
};

struct svc {
	__u32 id;           /* revision of the backend set: smesh_backends' id */
	__u16 count;        /* backends, in slots 0..count-1 */
	__u16 local_count;  /* of which on this node: slots 0..local_count-1 */
	__u32 flags;        /* SVC_* */
	__u32 affinity_sec; /* SVC_AFFINITY: how long a client keeps its backend */
};

struct backend_key {
	__u32 id;
	__u32 slot;
};

struct backend {
	struct addr ip; /* v4-mapped for IPv4 */
	__u16 port;     /* host byte order */
	__u16 pad;
};

/* A client of an affinity service: every pod has its own network namespace,
 * so the namespace of the connecting socket names the client (kube-proxy
 * uses the source IP, which a pod's connections share). */
struct affinity_key {
	__u64 netns;
	struct svc_key svc;
	__u32 pad;
};

struct affinity {
	struct backend be;
	__u64 last_ns; /* bpf_ktime_get_ns of its last connection */
};

/* A backend of revision id, for the affinity check: is a remembered backend
 * still one of the service's? */
struct member_key {
	__u32 id;
	struct backend be;
};

/* Written by smeshd (Services.Update/Delete); read by connect4/6. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct svc_key);
	__type(value, struct svc);
} smesh_services SEC(".maps");

/* Written by smeshd, each service's backends under its revision id (the
 * entry goes in before smesh_services names the id and out after it no
 * longer does); read by connect4/6. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct backend_key);
	__type(value, struct backend);
} smesh_backends SEC(".maps");

/* Written by smeshd for affinity services only: the same backends by
 * (id, backend), so that a remembered backend can be checked; read by
 * connect4/6. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct member_key);
	__type(value, __u8);
} smesh_svc_members SEC(".maps");

/* Written and read by connect4/6: the backend each client of an affinity
 * service got last. LRU: a full map forgets the oldest client, who then
 * simply gets a fresh choice. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct affinity_key);
	__type(value, struct affinity);
} smesh_affinity SEC(".maps");

/* pick_slot chooses a random backend slot of s, or returns false when there
 * is none the service allows. */
static __always_inline bool pick_slot(const struct svc *s, __u32 *slot)
{
	__u32 n = s->count;

	if ((s->flags & (SVC_LOCAL_ONLY | SVC_PREFER_LOCAL)) && s->local_count > 0)
		n = s->local_count; /* the local backends come first */
	else if (s->flags & SVC_LOCAL_ONLY)
		n = 0;
	if (n == 0)
		return false;
	*slot = bpf_get_prandom_u32() % n;
	return true;
}

/* remembered returns the backend client netns got last from service key
 * when that is recent and still a backend of the service's current
 * revision, or NULL. */
static __always_inline struct affinity *remembered(const struct affinity_key *ak, const struct svc *s, __u64 now)
{
	struct member_key mk = { .id = s->id };
	struct affinity *a = bpf_map_lookup_elem(&smesh_affinity, ak);

	if (!a || now - a->last_ns > (__u64)s->affinity_sec * 1000000000ULL)
		return NULL;
	mk.be = a->be;
	if (!bpf_map_lookup_elem(&smesh_svc_members, &mk))
		return NULL;
	return a;
}

enum svc_result {
	SVC_NONE = 0,       /* not a service address: leave the destination */
	SVC_TRANSLATED = 1, /* *be is the chosen backend */
	SVC_NO_BACKEND = 2, /* a service without a backend: refuse */
};

/* choose_backend holds the whole choice for a connect() from namespace
 * netns to ip:port (a service address or not), so it reads top to bottom. */
static __always_inline enum svc_result choose_backend(__u64 netns, const struct addr *ip, __u16 port,
						     struct backend *be)
{
	struct svc_key key = { .vip = *ip, .port = port };
	struct affinity_key ak = {};
	struct backend_key bk;
	struct backend *found;
	struct affinity *a;
	struct svc *s;
	__u64 now = 0;

	s = bpf_map_lookup_elem(&smesh_services, &key);
	if (!s)
		return SVC_NONE;
	if (s->flags & SVC_AFFINITY) {
		ak.netns = netns;
		ak.svc = key;
		now = bpf_ktime_get_ns();
		a = remembered(&ak, s, now);
		if (a) {
			a->last_ns = now;
			*be = a->be;
			return SVC_TRANSLATED;
		}
	}
	bk.id = s->id;
	if (!pick_slot(s, &bk.slot))
		return SVC_NO_BACKEND;
	found = bpf_map_lookup_elem(&smesh_backends, &bk);
	/* Missing only if smeshd broke the order of an update. */
	if (!found)
		return SVC_NO_BACKEND;
	*be = *found;
	if (s->flags & SVC_AFFINITY) {
		struct affinity fresh;

		/* Zeroed whole, padding included: without CAP_PERFMON the
		 * verifier refuses to pass uninitialized stack bytes to a
		 * helper (an initializer leaves the padding after be). */
		__builtin_memset(&fresh, 0, sizeof(fresh));
		fresh.be = *found;
		fresh.last_ns = now;
		bpf_map_update_elem(&smesh_affinity, &ak, &fresh, BPF_ANY);
	}
	return SVC_TRANSLATED;
}

#endif /* __SMESH_SERVICE_H__ */
