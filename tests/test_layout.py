"""The live-slot table user space writes for the program (no kernel needed)."""

from __future__ import annotations

import sys

from hypothesis import given
from hypothesis import strategies as st

from reuseport_standby.kernel.layout import (CONFIG_SIZE, NR_SLOTS, PARKING_SLOT, SLOTS_PER_ROLE, Config, live_table,
                                      slot_range)

slots = st.sets(st.integers(0, NR_SLOTS - 1))
masks = st.integers(0, 2**64 - 1)


@given(slots, masks)
def test_table_lists_exactly_the_occupied_enabled_slots_of_each_range(occupied: set[int], disabled: int) -> None:
    table = live_table(occupied, disabled)
    for r in (0, 1):
        assert list(table[r]) == sorted(i for i in slot_range(r) if i in occupied and not disabled >> i & 1)
        assert len(table[r]) <= SLOTS_PER_ROLE
    assert PARKING_SLOT not in table[0] + table[1]


@given(slots, masks, st.integers(0, 100), st.integers(0, 1))
def test_config_round_trips_through_its_packed_form(occupied: set[int], disabled: int, weight: int, flags: int) -> None:
    cfg = Config(standby_weight=weight, disabled=disabled, flags=flags).with_live(occupied)
    raw = cfg.pack()
    assert len(raw) == CONFIG_SIZE
    assert Config.unpack(raw) == cfg


def test_packed_table_is_what_the_program_reads() -> None:
    """Counts first, the table last, one byte per entry, range 1 at byte 32 of the table (bpf/standby.h)."""
    raw = Config().with_live([0, 2, 5, 33]).pack()
    assert raw[0:4] == (3).to_bytes(4, sys.byteorder) and raw[4:8] == (1).to_bytes(4, sys.byteorder)
    table = raw[CONFIG_SIZE - 2 * SLOTS_PER_ROLE:]
    assert list(table[:4]) == [0, 2, 5, 0] and table[SLOTS_PER_ROLE] == 33


def test_a_disabled_slot_leaves_the_table_and_comes_back() -> None:
    cfg = Config(disabled=1 << 1).with_live([0, 1, 2])
    assert cfg.live == ((0, 2), ())
    assert Config().with_live([0, 1, 2]).live == ((0, 1, 2), ())
