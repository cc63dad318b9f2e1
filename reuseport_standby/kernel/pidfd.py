"""Borrow another process's socket: pidfd_open + pidfd_getfd (Linux 5.6+).

The supervisor uses it to act on an instance's listener without the
instance's help: to hand a hung instance's queue to the other instance
(``shutdown()`` migrates it) and to put the listener back afterwards.
Needs ptrace access to the target (root, or CAP_SYS_PTRACE for another
uid); the caller closes the borrowed fd at once, so the supervisor never
holds an instance's socket.
"""

from __future__ import annotations

import ctypes
import os
import socket
from pathlib import Path

SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(nr: int, *args: int) -> int:
    rc = _libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def find_socket_fd(pid: int, inode: int) -> tuple[int, int] | None:
    """(pid, fd) of a process, or one of its children, holding the socket with this inode."""
    target = f"socket:[{inode}]"
    candidates = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            candidates += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    for p in candidates:
        try:
            for entry in os.scandir(f"/proc/{p}/fd"):
                try:
                    if os.readlink(entry.path) == target:
                        return p, int(entry.name)
                except OSError:
                    continue
        except OSError:
            continue
    return None


def borrow_socket(pid: int, fd: int) -> socket.socket:
    """A duplicate, in this process, of fd ``fd`` of process ``pid``."""
    pidfd = _syscall(SYS_PIDFD_OPEN, pid, 0)
    try:
        return socket.socket(fileno=_syscall(SYS_PIDFD_GETFD, pidfd, fd, 0))
    finally:
        os.close(pidfd)
