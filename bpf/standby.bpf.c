// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Hot-standby selection for a SO_REUSEPORT group.
 *
 * Loaded as BPF_SK_REUSEPORT_SELECT_OR_MIGRATE, so the kernel asks it both
 * where a new connection goes and where the requests queued on a closing
 * listener go.  Both questions get the same answer: a live primary, else a
 * live standby, else the parking listener, else the kernel's own hash.
 */
#ifdef RS_BCC
/*
 * Compatibility shim for the BCC loader (reuseport_standby/bcc_loader.py).
 * BCC includes its own helper declarations and has no REUSEPORT_SOCKARRAY
 * table, so the project creates (or re-opens) the pinned maps itself and
 * passes their fds as -DRS_FD_<map>=N; RS_MAP() turns one into the map
 * pointer the helpers take.  Everything below the shim is shared.
 */
#include <uapi/linux/in.h>
#include "standby.h"
#define RS_MAP(name) ((void *)bpf_pseudo_fd(1, RS_FD_##name))
#define RS_PROGRAM  /* BCC places each function in a section of its own */
#define BPF_LICENSE Dual BSD/GPL  /* BCC writes the license section itself */
#else
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include "standby.h"
#define RS_MAP(name) ((void *)&name)
#define RS_PROGRAM SEC("sk_reuseport/migrate")

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, RS_NR_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} rs_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rs_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} rs_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RS_NR_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} rs_counters SEC(".maps");

/* Connections handed to each slot (new and migrated): with the accept
 * queue depth from sock_diag, user space can tell whether an instance is
 * still accepting. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RS_NR_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} rs_slot_hits SEC(".maps");
#endif /* RS_BCC */

static __always_inline void count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(RS_MAP(rs_counters), &idx);

	if (c)
		*c += 1;
}

/* Try the live slots of one slot range, starting at a hash-chosen slot and probing
 * forward past the ones the kernel emptied when their socket closed.
 * Returns the selected slot, or -1.  The loop is bounded for the
 * verifier (kernels without bpf_loop, e.g. 5.14/5.15, must load it).
 *
 * With libbpf this is a global function, which the verifier checks once,
 * on its own.  Inlined twice into the program, the loop had to be verified
 * in every state the first call left behind; a loader holding CAP_BPF
 * without CAP_PERFMON also gets the Spectre v1 checks, which simulate the
 * mispredicted side of every decided branch (each loop test), and that
 * product exceeded the verifier's limit ("The sequence of 8193 jumps is
 * too complex"): the supervisor could not start with CAP_BPF and
 * CAP_NET_ADMIN alone.  As a global function: 1,682 instructions verified
 * (5,795 inlined), 1,812 under the Spectre checks.  BCC makes every
 * non-static function a program of its own, so it keeps the inlined form. */
#ifdef RS_BCC
static __always_inline
#else
__attribute__((noinline))
#endif
int rs_select_range(struct sk_reuseport_md *md, __u32 range, __u32 span, __u32 hash, __u64 disabled)
{
	__u32 base = range * RS_SLOTS_PER_ROLE;
	__u32 start, i, key;
	long err;

	if (span == 0)
		return -1;
	/* span <= RS_SLOTS_PER_ROLE is user space's invariant; clamping here
	 * doubled the verifier's work (11.8k vs 5.8k instructions). */
	start = hash % span;
	for (i = 0; i < RS_SLOTS_PER_ROLE; i++) {
		/* Keep the compiler from rewriting the loop around a trip
		 * count computed from span, which the verifier cannot bound. */
		asm volatile("" : "+r"(i));
		if (i >= span)
			break;
		key = base + (start + i) % span;
		/* A disabled slot (drained or demoted instance) is pushed out
		 * of the map's range, where the lookup fails like an empty
		 * slot: no branch, so no extra verifier states. */
		key += ((disabled >> key) & 1) * RS_NR_SLOTS;
		err = bpf_sk_select_reuseport(md, RS_MAP(rs_slots), &key, 0);
		/* Any error is an empty (or emptying) slot: a socket closes
		 * and the kernel clears its slot before user space narrows
		 * the span.  Counting errors here would triple the verifier's
		 * work for a case user space already rules out (one map per
		 * group, so no foreign sockets). */
		if (err == 0)
			return key;
	}
	return -1;
}

RS_PROGRAM
int rs_select_or_migrate(struct sk_reuseport_md *md)
{
	__u32 zero = 0, first, second, swap, key, slot = 0;
	__u64 *hits;
	struct rs_config *cfg;
	int migrating, found;
	__u32 hash = md->hash;

	if (md->ip_protocol != IPPROTO_TCP)
		return SK_PASS;

	migrating = md->migrating_sk != 0;
	cfg = bpf_map_lookup_elem(RS_MAP(rs_config), &zero);
	if (!cfg)
		return SK_PASS;

	first = RS_ROLE_PRIMARY;
	second = RS_ROLE_STANDBY;
	if (cfg->standby_weight && hash % 100 < cfg->standby_weight) {
		first = RS_ROLE_STANDBY;
		second = RS_ROLE_PRIMARY;
	}

	/* After a promote, the standby instance sits in the primary range and
	 * the other way round: roles are logical, ranges physical. */
	swap = cfg->flags & RS_FLAG_SWAP_ROLES ? 1 : 0;
	found = rs_select_range(md, first ^ swap, cfg->span[first ^ swap], hash, cfg->disabled);
	if (found >= 0) {
		slot = found;
		key = first;
		goto selected;
	}
	found = rs_select_range(md, second ^ swap, cfg->span[second ^ swap], hash, cfg->disabled);
	if (found >= 0) {
		slot = found;
		key = second;
		goto selected;
	}
	key = RS_PARKING_SLOT;
	if (bpf_sk_select_reuseport(md, RS_MAP(rs_slots), &key, 0) == 0) {
		count(migrating ? RS_CNT_MIGRATED_PARKED : RS_CNT_PARKED);
		hits = bpf_map_lookup_elem(RS_MAP(rs_slot_hits), &key);
		if (hits)
			*hits += 1;
		return SK_PASS;
	}
	/* Nothing of ours is live: let the kernel hash over the group rather
	 * than refuse the connection. */
	count(migrating ? RS_CNT_MIGRATE_FELL_BACK : RS_CNT_FELL_BACK);
	return SK_PASS;

selected:
	hits = bpf_map_lookup_elem(RS_MAP(rs_slot_hits), &slot);
	if (hits)
		*hits += 1;
	if (key == RS_ROLE_PRIMARY)
		count(migrating ? RS_CNT_MIGRATED_PRIMARY : RS_CNT_SELECTED_PRIMARY);
	else
		count(migrating ? RS_CNT_MIGRATED_STANDBY : RS_CNT_SELECTED_STANDBY);
	return SK_PASS;
}

#ifndef RS_BCC
char _license[] SEC("license") = "Dual BSD/GPL";
#endif
