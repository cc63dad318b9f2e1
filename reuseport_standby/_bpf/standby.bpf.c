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

/* Select a live slot of one slot range: the hash picks an entry of the
 * range's dense live-slot table, so every live slot gets an even share and
 * the cost does not depend on how many slots there are or where the holes
 * are.  Returns the selected slot, or -1.
 *
 * The table can be a moment behind the kernel: a socket that closes without
 * warning (SIGKILL) empties its slot before user space hears of it.  Then
 * the next entry is tried once (a role-mate: during a rolling restart the
 * old and the new instance share the range), and after that the caller
 * falls back to the other range and to parking.  No loop, no helper but
 * bpf_sk_select_reuseport: it verifies quickly on 5.14-era verifiers and
 * with CAP_BPF alone (the Spectre v1 checks of a loader without
 * CAP_PERFMON made the former probe loop too complex on 6.1). */
/* Entry idx (< 32) of a range's live-slot table.
 *
 * Read as whole 64-bit words at constant offsets and picked apart with
 * shifts: scalar arithmetic only, no pointer arithmetic with a variable
 * offset.  A loader without CAP_PERFMON gets the verifier's Spectre v1
 * sanitation, which refuses a variable map-value offset that reaches one
 * instruction with different bounds on different paths ("pointer
 * arithmetic with it prohibited for !root"), and an indexed byte load
 * here did exactly that.  The barrier keeps clang from folding the loads
 * back into one indexed load. */
static __always_inline __u32 rs_live_entry(const struct rs_config *cfg, __u32 range, __u32 idx)
{
	const __u64 *words = (const __u64 *)cfg->live;
	__u64 w0 = words[0], w1 = words[1], w2 = words[2], w3 = words[3];
	__u64 w4 = words[4], w5 = words[5], w6 = words[6], w7 = words[7];
	__u64 w;
	__u32 shift;

	/* All eight words, unconditionally: a load chosen by range would be
	 * compiled into a variable pointer offset again. */
	asm volatile("" : "+r"(w0), "+r"(w1), "+r"(w2), "+r"(w3));
	asm volatile("" : "+r"(w4), "+r"(w5), "+r"(w6), "+r"(w7));
	switch ((range & 1) << 2 | ((idx >> 3) & 3)) {
	case 0: w = w0; break;
	case 1: w = w1; break;
	case 2: w = w2; break;
	case 3: w = w3; break;
	case 4: w = w4; break;
	case 5: w = w5; break;
	case 6: w = w6; break;
	default: w = w7; break;
	}
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	shift = (7 - (idx & 7)) * 8;
#else
	shift = (idx & 7) * 8;
#endif
	return (w >> shift) & 0xff;
}

static __always_inline int rs_select_range(struct sk_reuseport_md *md, struct rs_config *cfg, __u32 range, __u32 hash)
{
	__u32 n, idx, key;

	range &= 1;
	n = cfg->live_count[range];
	if (n == 0)
		return -1;
	if (n > RS_SLOTS_PER_ROLE)
		n = RS_SLOTS_PER_ROLE;
	idx = hash % n;
	key = rs_live_entry(cfg, range, idx);
	if (bpf_sk_select_reuseport(md, RS_MAP(rs_slots), &key, 0) == 0)
		return key;
	if (n == 1)
		return -1;
	key = rs_live_entry(cfg, range, idx + 1 < n ? idx + 1 : 0);
	if (bpf_sk_select_reuseport(md, RS_MAP(rs_slots), &key, 0) == 0)
		return key;
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
	found = rs_select_range(md, cfg, first ^ swap, hash);
	if (found >= 0) {
		slot = found;
		key = first;
		goto selected;
	}
	found = rs_select_range(md, cfg, second ^ swap, hash);
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
