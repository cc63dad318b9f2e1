"""Slot arithmetic: which slots a role owns, which is free, what the program's tables say.

Pure functions over numbers and :class:`~..kernel.layout.Config`; the
broker reads the maps, asks these, and writes the answer back.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable

from ..errors import SlotsFull
from ..kernel.layout import Config, Role, slot_range


def role_range(role: Role, swapped: bool) -> range:
    """Physical slots of a role: after a promote, the roles' ranges are swapped."""
    return slot_range(role.number ^ int(swapped))


def role_of_slot(slot: int, swapped: bool) -> Role:
    return Role.PRIMARY if slot in role_range(Role.PRIMARY, swapped) else Role.STANDBY


def free_slot(used: Iterable[int], role: Role, swapped: bool, where: str = "") -> int:
    """The first slot of ``role`` not in ``used``; SlotsFull names the role and what to do."""
    taken = set(used)
    rng = role_range(role, swapped)
    for i in rng:
        if i not in taken:
            return i
    raise SlotsFull(f"all {len(rng)} {role.value} slots{' of ' + where if where else ''} are taken; "
                    f"stop an old {role.value} instance first")


def live_config(cfg: Config, occupied: Iterable[int]) -> Config:
    """The program's config for these occupied slots: the live table rebuilt, and no disabled
    mark kept on a slot the kernel emptied (it would disable the next socket put there)."""
    occ = set(occupied)
    disabled = cfg.disabled
    for i in range(64):
        if disabled >> i & 1 and i not in occ:
            disabled &= ~(1 << i)
    return replace(cfg, disabled=disabled).with_live(occ)


def disabled_config(cfg: Config, slots: Iterable[int], on: bool, occupied: Iterable[int]) -> Config:
    """Mark ``slots`` disabled (drained, demoted) or enabled again, and rebuild the live table."""
    mask = cfg.disabled
    for slot in slots:
        mask = mask | (1 << slot) if on else mask & ~(1 << slot)
    return replace(cfg, disabled=mask).with_live(occupied)
