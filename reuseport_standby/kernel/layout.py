"""Slot, counter and config layout shared with ``bpf/standby.h``.

Kept by hand in step with the C header; ``tests/test_layout.py`` parses the
header and fails when they drift.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace
from typing import Iterable

LAYOUT_VERSION = 3
SLOTS_PER_ROLE = 32
PARKING_SLOT = SLOTS_PER_ROLE * 2
NR_SLOTS = PARKING_SLOT + 1
#: Worker scope (one slot per worker): two instances of a role overlap during a
#: rolling restart, so each may have at most half of its role's slots.
WORKERS_PER_INSTANCE = SLOTS_PER_ROLE // 2


class Role(str, enum.Enum):
    PRIMARY = "primary"
    STANDBY = "standby"

    @property
    def number(self) -> int:
        return 0 if self is Role.PRIMARY else 1

    @property
    def slot_range(self) -> range:
        """The role's slots while roles are not swapped (see :func:`slot_range`)."""
        return slot_range(self.number)

    @property
    def other(self) -> "Role":
        return Role.STANDBY if self is Role.PRIMARY else Role.PRIMARY

    @classmethod
    def parse(cls, value: str) -> "Role":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown role {value!r}: expected 'primary' or 'standby'") from None


def slot_range(range_index: int) -> range:
    """Slots of range 0 (primary, unless swapped) or 1 (standby, unless swapped)."""
    base = range_index * SLOTS_PER_ROLE
    return range(base, base + SLOTS_PER_ROLE)


class Counter(enum.IntEnum):
    SELECTED_PRIMARY = 0
    SELECTED_STANDBY = 1
    PARKED = 2
    MIGRATED_PRIMARY = 3
    MIGRATED_STANDBY = 4
    MIGRATED_PARKED = 5
    FELL_BACK = 6
    MIGRATE_FELL_BACK = 7


NR_COUNTERS = len(Counter)

FLAG_SWAP_ROLES = 1

_CONFIG = struct.Struct(f"=IIIIQII{2 * SLOTS_PER_ROLE}s")

LiveTable = tuple[tuple[int, ...], tuple[int, ...]]


def live_table(occupied: Iterable[int], disabled: int = 0) -> LiveTable:
    """Per slot range, the slots that hold a socket and are not disabled, in slot order.

    This is what the program picks from (``live[range][hash % n]``): a
    drained or demoted slot keeps its socket but is left out.
    """
    taken = set(occupied)
    return tuple(  # type: ignore[return-value]
        tuple(i for i in slot_range(r) if i in taken and not disabled >> i & 1) for r in (0, 1))


@dataclass(frozen=True)
class Config:
    """The program's one config entry (``struct rs_config``).

    ``live`` is per slot *range* (0 = the primary range, 1 = the standby
    range); with ``FLAG_SWAP_ROLES`` set the standby role is served from
    range 0 and the primary from range 1 (a promote).
    """

    live: LiveTable = ((), ())
    standby_weight: int = 0
    layout_version: int = LAYOUT_VERSION
    disabled: int = 0  # bit i: slot i keeps its socket but is left out of ``live``
    flags: int = 0
    reserved: int = 0

    def pack(self) -> bytes:
        table = b"".join(bytes(r).ljust(SLOTS_PER_ROLE, b"\0") for r in self.live)
        return _CONFIG.pack(len(self.live[0]), len(self.live[1]), self.standby_weight, self.layout_version,
                            self.disabled, self.flags, self.reserved, table)

    @classmethod
    def unpack(cls, raw: bytes) -> "Config":
        n0, n1, weight, version, disabled, flags, reserved, table = _CONFIG.unpack(raw)
        live = tuple(tuple(table[r * SLOTS_PER_ROLE:r * SLOTS_PER_ROLE + min(n, SLOTS_PER_ROLE)])
                     for r, n in ((0, n0), (1, n1)))
        return cls(live, weight, version, disabled, flags, reserved)  # type: ignore[arg-type]

    def with_live(self, occupied: Iterable[int]) -> "Config":
        """This config with its live table rebuilt from the occupied slots and the disabled mask."""
        return replace(self, live=live_table(occupied, self.disabled))

    @property
    def swapped(self) -> bool:
        return bool(self.flags & FLAG_SWAP_ROLES)


CONFIG_SIZE = _CONFIG.size
