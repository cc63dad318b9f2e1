"""Slot, counter and config layout shared with ``bpf/standby.h``.

Kept by hand in step with the C header; ``tests/test_layout.py`` parses the
header and fails when they drift.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

LAYOUT_VERSION = 2
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

_CONFIG = struct.Struct("=IIIIQII")


@dataclass(frozen=True)
class Config:
    """The program's one config entry (``struct rs_config``).

    Spans are per slot *range* (0 = the primary range, 1 = the standby
    range); with ``FLAG_SWAP_ROLES`` set the standby role is served from
    range 0 and the primary from range 1 (a promote).
    """

    primary_span: int = 0
    standby_span: int = 0
    standby_weight: int = 0
    layout_version: int = LAYOUT_VERSION
    disabled: int = 0  # bit i: slot i gets no new connections
    flags: int = 0
    reserved: int = 0

    def pack(self) -> bytes:
        return _CONFIG.pack(self.primary_span, self.standby_span, self.standby_weight, self.layout_version,
                            self.disabled, self.flags, self.reserved)

    @classmethod
    def unpack(cls, raw: bytes) -> "Config":
        return cls(*_CONFIG.unpack(raw))

    @property
    def swapped(self) -> bool:
        return bool(self.flags & FLAG_SWAP_ROLES)


CONFIG_SIZE = _CONFIG.size
