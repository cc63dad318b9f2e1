"""Who is at the other end of a control connection, as the kernel recorded it at connect.

Credentials come from SO_PEERCRED and groups from SO_PEERGROUPS (Linux
4.13+), which work for a peer in a PID namespace we cannot see; /proc is
only a fallback.
"""

from __future__ import annotations

import grp
import os
import socket
import struct
from pathlib import Path

from ..errors import ReuseportStandbyError

SO_PEERGROUPS = 59


def peercred(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer at connect time."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_groups(conn: socket.socket, pid: int, gid: int) -> set[int]:
    """The peer's groups as the kernel recorded them at connect.

    Unlike /proc/PID, this works for a peer in a PID namespace we cannot see
    (a sibling container), whose pid reads as 0."""
    groups = {gid}
    size = 4 * 64
    for _ in range(3):
        try:
            raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == 34:  # ERANGE: more groups than room
                size *= 4
                continue
            return groups | process_groups(pid)
        return groups | set(struct.unpack(f"{len(raw) // 4}I", raw))
    return groups | process_groups(pid)


def process_groups(pid: int) -> set[int]:
    """Primary and supplementary groups of a live process (what the kernel checks, not /etc/group)."""
    groups: set[int] = set()
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Gid:") or line.startswith("Groups:"):
                groups.update(int(x) for x in line.split()[1:])
    except OSError:
        pass
    return groups


def refusal(conn: socket.socket, pid: int, uid: int, gid: int, *, service: str, control_gid: int | None,
            group_name: str | None) -> str | None:
    """Why this peer may not use the control socket (None: it may)."""
    if uid == 0 or uid == os.geteuid():
        return None
    if control_gid is not None and control_gid in peer_groups(conn, pid, gid):
        return None
    group = f"group {group_name!r}" if group_name else "the supervisor's --group (none set)"
    return (f"uid {uid} may not control service {service}: only root, the supervisor's own user, or "
            f"members of {group} may. Add the app's user to that group, or start the supervisor with --group.")


def may_be_child(pid: int, parent: int) -> bool:
    """False only when /proc shows that ``pid`` is not a child of ``parent`` (a peer in a PID namespace we
    cannot see has pid 0, and passes: nothing to check against)."""
    if pid <= 0:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[1]) == parent
    except (OSError, ValueError, IndexError):
        return True


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def resolve_group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ValueError(f"unknown group {name!r} for --group: create it (groupadd) or give a numeric gid") from None


def give_to_group(path: str | Path, gid: int, name: str | None) -> None:
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        raise ReuseportStandbyError(
            f"cannot give {path} to group {name or gid}: without CAP_CHOWN the supervisor can only hand files to "
            f"a group it belongs to. Add it to the group (systemd: SupplementaryGroups={name or gid}; Kubernetes: "
            f"fsGroup) or drop --group") from None
