"""Who is at the other end of a control connection, as the kernel recorded it at connect.

Credentials come from SO_PEERCRED and groups from SO_PEERGROUPS (Linux
4.13+), which work for a peer in a PID namespace we cannot see; /proc is
only a fallback.
"""

from __future__ import annotations

import errno
import functools
import grp
import logging
import os
import select
import socket
import struct
from pathlib import Path

from ..errors import ReuseportStandbyError, see_doc
from ..kernel import pidfd

log = logging.getLogger("reuseport_standby.supervisor")

SO_PEERGROUPS = 59
SO_PEERPIDFD = 77  # Linux 6.5+: a pidfd of the peer process as recorded at connect


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
            f"members of {group} may. Add the app's user to that group, or start the supervisor with --group "
            f"({see_doc('control-socket-permissions')}).")


def is_admin(conn: socket.socket, pid: int, uid: int, gid: int, admin_group: str | None) -> bool:
    """May this peer send operator commands (weight, promote, drain, undrain)?  Root, the supervisor's own
    user, and members of ``--admin-group`` (their groups as the kernel recorded them at connect)."""
    if uid == 0 or uid == os.geteuid():
        return True
    if admin_group is None:
        return False
    return admin_gid(admin_group) in peer_groups(conn, pid, gid)


@functools.lru_cache(maxsize=4)
def admin_gid(name: str) -> int:
    """The gid of --admin-group, looked up once (not at every connection: NSS may be slow)."""
    return resolve_group(name, "--admin-group")


def pidfd_at_connect(conn: socket.socket, pid: int) -> int | None:
    """What the loop keeps of a new peer for signalling it (``Instance.pidfd``; the caller closes it).

    Where the kernel has SO_PEERPIDFD: nothing yet.  That option names the process recorded at connect
    whenever it is asked, so ``peer_pidfd`` takes it when first needed (a hung instance), and an idle
    connection costs one file descriptor, not two (the EMFILE defence counts them).  Before Linux 6.5:
    pidfd_open now, while the peer has only just connected (the fallback's race is narrowest now)."""
    if pid <= 0:
        return None
    try:
        if has_peerpidfd():
            return None
    except OSError:  # no descriptor left even to ask: take it now, as on an older kernel
        pass
    return peer_pidfd(conn, pid)


def peer_pidfd(conn: socket.socket, pid: int) -> int | None:
    """A pidfd of the peer process (None: none could be had; the caller closes it).  A peer whose pid we
    cannot see (another PID namespace: pid 0) gets none: it is never signalled.

    SO_PEERPIDFD (Linux 6.5+) names the very process that connected, however long ago (the kernel keeps
    its struct pid with the socket), so a pid recycled since can never be mistaken for it: for a peer
    that has exited it fails (or, on newer kernels, gives a pidfd of the dead process: no signal reaches it).

    Before 6.5: pidfd_open(pid), then a check that the peer is still connected (no hangup), so a peer
    that left before pidfd_open (its pid maybe anyone's now) is not taken.  Residual race of that
    fallback: a connection outlives its connecting process when another process holds the same socket
    (a child that inherited it, or one it was sent to with SCM_RIGHTS); if the connecting process has
    exited and its pid been reused before pidfd_open, the check passes and the pidfd names the stranger.
    That is why the fallback is taken at connect (``pidfd_at_connect``), when the window is shortest;
    only SO_PEERPIDFD closes it."""
    if pid <= 0:
        return None
    try:
        return conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno not in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            # ESRCH/EINVAL: the peer has exited (nothing to signal, and its pid may be anyone's now);
            # EMFILE: out of descriptors.  Never a guess by pid here.
            log.debug("no pidfd for peer pid %d (%s): it will not be signalled", pid, exc.strerror)
            return None
    try:
        fd = pidfd.pidfd_open(pid)
    except OSError as exc:
        log.debug("no pidfd for peer pid %d (%s): it will not be signalled", pid, exc.strerror)
        return None
    if not still_connected(conn):
        os.close(fd)  # it may have left before pidfd_open, and its pid gone to another process
        return None
    return fd


_has_peerpidfd: bool | None = None


def has_peerpidfd() -> bool:
    """Whether this kernel has SO_PEERPIDFD (asked once, of a socket pair of our own).  Without it the
    kernel answers ENOPROTOOPT before allocating anything; with it, failing to allocate says yes too."""
    global _has_peerpidfd
    if _has_peerpidfd is None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            os.close(a.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
            _has_peerpidfd = True
        except OSError as exc:
            _has_peerpidfd = exc.errno not in (errno.ENOPROTOOPT, errno.EOPNOTSUPP)
        finally:
            a.close()
            b.close()
    return _has_peerpidfd


def still_connected(conn: socket.socket) -> bool:
    """No hangup from the peer yet (what it sent may still wait unread: that is no hangup)."""
    poller = select.poll()
    poller.register(conn, select.POLLIN | select.POLLRDHUP)
    for _, events in poller.poll(0):
        if events & (select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL):
            return False
    return True


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


def parent_of(pid: int) -> int | None:
    """The parent pid /proc gives ``pid`` (None: gone or unreadable)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def resolve_group(name: str, flag: str = "--group") -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ValueError(f"unknown group {name!r} for {flag}: create it (groupadd) or give a numeric gid") from None


def give_to_group(path: str | Path, gid: int, name: str | None) -> None:
    """Hand the control socket we just bound at ``path`` to the group: only that socket, never what a link
    there points at.  The node is checked (a socket of ours) before and after a chown that does not follow
    links; listen_unix made sure nobody else can write its directory, so it cannot be swapped in between."""
    from stat import S_ISSOCK

    def ours() -> os.stat_result:
        st = os.lstat(path)
        if not S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise ReuseportStandbyError(
                f"refusing to give {path} to group {name or gid}: it is no longer the socket this supervisor bound "
                f"(now {'a socket of uid %d' % st.st_uid if S_ISSOCK(st.st_mode) else 'not a socket'}); someone "
                f"with write access to {os.path.dirname(os.path.abspath(path))} replaced it", see="path-refused")
        return st

    before = ours()
    try:
        os.chown(path, -1, gid, follow_symlinks=False)
    except PermissionError:
        raise ReuseportStandbyError(
            f"cannot give {path} to group {name or gid}: without CAP_CHOWN the supervisor can only hand files to "
            f"a group it belongs to. Add it to the group (systemd: SupplementaryGroups={name or gid}; Kubernetes: "
            f"fsGroup) or drop --group", see="control-socket-permissions") from None
    after = ours()
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        raise ReuseportStandbyError(f"{path} was replaced while it was given to group {name or gid}; someone with "
                                    f"write access to {os.path.dirname(os.path.abspath(path))} is at work",
                                    see="path-refused")
