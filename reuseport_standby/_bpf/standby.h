/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Layout shared by the BPF program and user space.
 *
 * reuseport_standby/layout.py mirrors every constant here; the test suite
 * parses this file and fails if the two disagree.  Changing the layout
 * changes the pinned maps' shape: bump RS_LAYOUT_VERSION so the loader
 * refuses to mix versions instead of misreading old pins.
 */
#ifndef RS_STANDBY_H
#define RS_STANDBY_H

#define RS_LAYOUT_VERSION 3

/* Slots per role.  Two instances of one role overlap during a restart, and a
 * later per-worker scope gives every worker its own slot, so leave room. */
#define RS_SLOTS_PER_ROLE 32

#define RS_ROLE_PRIMARY 0
#define RS_ROLE_STANDBY 1
#define RS_NR_ROLES 2

/* Slot index layout of the sockarray:
 *   [0, 32)   primary slots
 *   [32, 64)  standby slots
 *   64        parking slot (the supervisor's anchor listener) */
#define RS_PARKING_SLOT (RS_SLOTS_PER_ROLE * RS_NR_ROLES)
#define RS_NR_SLOTS (RS_PARKING_SLOT + 1)

/* Counter indices of the per-CPU counter array. */
#define RS_CNT_SELECTED_PRIMARY 0
#define RS_CNT_SELECTED_STANDBY 1
#define RS_CNT_PARKED 2
#define RS_CNT_MIGRATED_PRIMARY 3
#define RS_CNT_MIGRATED_STANDBY 4
#define RS_CNT_MIGRATED_PARKED 5
#define RS_CNT_FELL_BACK 6
#define RS_CNT_MIGRATE_FELL_BACK 7
#define RS_NR_COUNTERS 8

/* rs_config.flags */
#define RS_FLAG_SWAP_ROLES 1  /* promote: the standby range serves as primary */

/* The single entry of the config array, written only by user space. */
struct rs_config {
	/* live[range][0 .. live_count[range]) are the slots of that range that
	 * hold a socket and may get connections (not drained or demoted), in
	 * slot order: the program picks one by hash in constant time.  User
	 * space never sets a count above RS_SLOTS_PER_ROLE. */
	__u32 live_count[RS_NR_ROLES];
	/* 0..100: share of new connections (by 4-tuple hash) offered to the
	 * standby first while both roles are live.  0 = pure hot standby. */
	__u32 standby_weight;
	/* Must equal RS_LAYOUT_VERSION once user space has initialised it. */
	__u32 layout_version;
	/* Bit i set: slot i keeps its socket but gets no new or migrated
	 * connections (a drained or demoted instance): user space leaves it
	 * out of live[]; the program does not read this. */
	__u64 disabled;
	__u32 flags;
	__u32 reserved;
	/* 8-byte aligned: the program reads it as 64-bit words. */
	__u8 live[RS_NR_ROLES][RS_SLOTS_PER_ROLE] __attribute__((aligned(8)));
};

#endif
