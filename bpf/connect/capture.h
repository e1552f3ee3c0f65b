/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The capture decision of connect4, on its own so that the test harness
 * (capture_harness.c) exercises exactly the code connect4 runs. */
#ifndef __SMESH_CAPTURE_H__
#define __SMESH_CAPTURE_H__

#include "smesh.h"

/* Set by smeshd before load. */
volatile const __u32 proxy_ip4 = 0;     /* [outbound] listen address, network byte order */
volatile const __u16 proxy_port = 0;    /* [outbound] listen port, host byte order */
volatile const __u32 proxy_ip6[4] = {}; /* [outbound] listen6 address, network byte order */
volatile const __u16 proxy_port6 = 0;   /* [outbound] listen6 port, host byte order */
volatile const __u64 proxy_cgroup = 0;  /* cgroup id of smeshd itself: never captured */
volatile const bool capture_local = 0;  /* copy mode: same-node destinations go through smeshd too */

/* An LPM trie key: IPv4 prefixes are stored v4-mapped (prefixlen + 96), so
 * one trie holds both families and a v4-mapped destination is decided as the
 * IPv4 address it carries. */
struct lpm_key {
	__u32 prefixlen;
	struct addr ip;
};

/* Written by smeshd from [capture] include_cidrs; read by connect4. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_key);
	__type(value, __u8);
} smesh_include SEC(".maps");

/* Written by smeshd from [capture] exclude_cidrs; read by connect4. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_key);
	__type(value, __u8);
} smesh_exclude SEC(".maps");

/* Written by smeshd from [capture] exclude_ports (key: port, host byte
 * order); read by connect4. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} smesh_exclude_ports SEC(".maps");

/* smeshd's proof of life: whether a captured connection can expect an
 * answer. A listener outlives smeshd (pinned in on_failure = "closed", held
 * by a successor or systemd's store in "open"): with nobody accepting, a
 * captured connect() would wait in its queue for ever. Both fields on
 * bpf_ktime_get_ns()'s clock (CLOCK_MONOTONIC). */
struct heartbeat {
	__u64 beat_ns; /* when smeshd last wrote */
	/* [daemon] restart_hold: how old a beat may grow before connect4/6
	 * stop capturing (on_failure decides); 0: no bound. In the map, not a
	 * load-time constant: a program pinned by a dead smeshd reads the
	 * bound its successor sets, and a reload changes it in place. */
	__u64 hold_ns;
};

/* Written by smeshd (its one entry, every second, and before it marks any
 * namespace ready); read by connect4 and connect6 (heartbeat_fresh). A
 * successor adopts it with the other maps; one whose predecessor had none
 * makes it new and writes it before its programs are attached. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct heartbeat);
} smesh_heartbeat SEC(".maps");

/* heartbeat_fresh: at time now, smeshd has beaten within its restart_hold.
 * An entry never written (all zero: hold 0) bounds nothing, as before the
 * heartbeat existed; smeshd writes it before it marks a namespace ready, so
 * nothing is captured on an unwritten one. A beat stamped after now (read
 * on another CPU a moment before) is fresh. */
static __always_inline bool heartbeat_fresh(const struct heartbeat *hb, __u64 now)
{
	if (!hb || hb->hold_ns == 0 || now <= hb->beat_ns)
		return true;
	return now - hb->beat_ns <= hb->hold_ns;
}

/* smeshd_alive reads the heartbeat at time now. */
static __always_inline bool smeshd_alive(__u64 now)
{
	__u32 zero = 0;

	return heartbeat_fresh(bpf_map_lookup_elem(&smesh_heartbeat, &zero), now);
}

static __always_inline bool in_trie(void *trie, const struct addr *ip)
{
	struct lpm_key key = { .prefixlen = 128, .ip = *ip };

	return bpf_map_lookup_elem(trie, &key) != NULL;
}

static __always_inline bool port_excluded(__u16 port)
{
	__u32 key = port;

	return bpf_map_lookup_elem(&smesh_exclude_ports, &key) != NULL;
}

/* is_proxy: ip:port is one of smeshd's outbound listeners. */
static __always_inline bool is_proxy(const struct addr *ip, __u16 port)
{
	if (addr_is4(ip))
		return port == proxy_port && ip->ip[3] == proxy_ip4;
	return port == proxy_port6 && ip->ip[0] == proxy_ip6[0] && ip->ip[1] == proxy_ip6[1] &&
	       ip->ip[2] == proxy_ip6[2] && ip->ip[3] == proxy_ip6[3];
}

/* should_capture holds the whole decision for a connect() from namespace
 * netns to ip:port, so it reads top to bottom. */
static __always_inline bool should_capture(__u64 netns, const struct addr *ip, __u16 port)
{
	if (is_proxy(ip, port))
		return false;
	if (port_excluded(port))
		return false;
	/* Splice mode leaves same-node connections alone: sockops splices them
	 * from the first byte without a proxy hop. */
	if (!capture_local && is_local(netns, ip))
		return false;
	if (!in_trie(&smesh_include, ip) || in_trie(&smesh_exclude, ip))
		return false;
	return true;
}

#endif /* __SMESH_CAPTURE_H__ */
