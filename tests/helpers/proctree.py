"""Which processes exist: descendants of a pid, processes carrying an environment marker, /proc/PID/status."""

from __future__ import annotations

import os
from pathlib import Path


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (children, grandchildren...)."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            ppid = _ppid(int(entry.name))
            if ppid is not None:
                parents[int(entry.name)] = ppid
    found: set[int] = set()
    frontier = {root}
    for _ in range(64):  # depth bound
        frontier = {p for p, pp in parents.items() if pp in frontier and p not in found}
        if not frontier:
            break
        found |= frontier
    return found


def with_env(name: str, value: str) -> set[int]:
    """Processes whose environment has ``name=value`` (zombies have none: they hold nothing)."""
    needle = f"{name}={value}".encode()
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry.name}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.add(int(entry.name))
    return found


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def children(pid: int) -> set[int]:
    return {p for p in (int(e.name) for e in os.scandir("/proc") if e.name.isdigit()) if _ppid(p) == pid}
