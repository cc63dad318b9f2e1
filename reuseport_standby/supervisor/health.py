"""When an instance counts as hung, and when a demoted one may come back: pure decisions.

The broker gathers the facts (heartbeat times, per-slot hits from BPF, queue
depths from sock_diag) and carries out the verdict (disable the slots, hand
the queue over, signal); nothing here touches the kernel.
"""

from __future__ import annotations

from typing import Mapping

from ..kernel.sockets import Address
from .registry import Instance

ON_HANG = ("demote", "term", "kill")
MAX_COOLDOWN = 60.0  # seconds: the longest a demoted instance waits before it is tried again


def heartbeat_overdue(inst: Instance, now: float) -> str:
    """Why the instance's heartbeats count as missing ("" while they come in time)."""
    if inst.heartbeat and now - inst.last_heartbeat > max(3 * inst.heartbeat, 1.0):
        return f"no heartbeat for {now - inst.last_heartbeat:.1f} s"
    return ""


def stalled(inst: Instance, now: float, stall_timeout: float,
            facts: Mapping[Address, tuple[int, int]]) -> str:
    """Why the instance counts as stalled: connections waited ``stall_timeout`` with none accepted.

    ``facts``: per address, (program hits of its slot, connections queued on its listener).
    Updates the instance's progress records, so call it once per check.
    """
    if not stall_timeout:
        return ""
    for address, (hits, queued) in facts.items():
        waited = inst.progress[address].update(hits, queued, now)
        if waited >= stall_timeout:
            return f"{queued} connection(s) waited {waited:.1f} s on {address} with none accepted"
    return ""


def recovery_cooldown(demotions: int, stall_timeout: float) -> float:
    """Seconds a demoted instance waits before it may serve again: doubling with each demotion."""
    return min(MAX_COOLDOWN, max(stall_timeout, 1.0) * 2 ** max(demotions - 1, 0))


def may_recover(inst: Instance, now: float, on_hang: str, stall_timeout: float) -> bool:
    """A demoted instance serves again after its cooldown, once it shows life (a heartbeat, if it sends them)."""
    if on_hang != "demote":
        return False  # term / kill: the process was told to go
    if now - inst.demoted_at < recovery_cooldown(inst.demotions, stall_timeout):
        return False
    return not (inst.heartbeat and inst.last_heartbeat <= inst.demoted_at)
