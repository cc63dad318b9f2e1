"""Slot, counter and config layout shared with ``bpf/standby.h``.

Kept by hand in step with the C header; ``tests/test_layout.py`` parses the
header and fails when they drift.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

LAYOUT_VERSION = 1
SLOTS_PER_ROLE = 32
PARKING_SLOT = SLOTS_PER_ROLE * 2
NR_SLOTS = PARKING_SLOT + 1


class Role(str, enum.Enum):
    PRIMARY = "primary"
    STANDBY = "standby"

    @property
    def index(self) -> int:
        return 0 if self is Role.PRIMARY else 1

    @property
    def slot_range(self) -> range:
        base = self.index * SLOTS_PER_ROLE
        return range(base, base + SLOTS_PER_ROLE)

    @classmethod
    def parse(cls, value: str) -> "Role":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown role {value!r}: expected 'primary' or 'standby'") from None


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

_CONFIG = struct.Struct("=IIII")


@dataclass(frozen=True)
class Config:
    """The program's one config entry (``struct rs_config``)."""

    primary_span: int = 0
    standby_span: int = 0
    standby_weight: int = 0
    layout_version: int = LAYOUT_VERSION

    def pack(self) -> bytes:
        return _CONFIG.pack(self.primary_span, self.standby_span, self.standby_weight, self.layout_version)

    @classmethod
    def unpack(cls, raw: bytes) -> "Config":
        return cls(*_CONFIG.unpack(raw))

    def span(self, role: Role) -> int:
        return self.primary_span if role is Role.PRIMARY else self.standby_span


CONFIG_SIZE = _CONFIG.size
