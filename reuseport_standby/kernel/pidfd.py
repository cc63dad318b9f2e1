"""Act on another process through a pidfd: borrow its socket (pidfd_getfd, Linux 5.6+), signal it
(pidfd_send_signal, 5.1+).

The supervisor uses it to act on an instance's listener without the
instance's help: to hand a hung instance's queue to the other instance
(``shutdown()`` migrates it) and to put the listener back afterwards.
Needs ptrace access to the target (root, or CAP_SYS_PTRACE for another
uid); the caller closes the borrowed fd at once, so the supervisor never
holds an instance's socket.

A pidfd names one process for as long as it is open: unlike a pid, it
never comes to mean another process once the first has exited and been
reaped.  So signals go through pidfds only (``--on-hang term|kill``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from pathlib import Path

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


def pidfd_open(pid: int) -> int:
    """A pidfd of the process that is ``pid`` now (the caller closes it).  Only as good as the pid:
    if that process may have exited, check afterwards that the pidfd is the one meant."""
    return os.pidfd_open(pid)


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    """Send ``sig`` to the process of ``pidfd`` (0: only check that it exists and may be signalled).

    ProcessLookupError once it has exited, PermissionError without the right (another uid needs
    CAP_KILL)."""
    signal.pidfd_send_signal(pidfd, sig)


def is_alive(pidfd: int) -> bool:
    """Whether the process of ``pidfd`` has not exited yet (a zombie still counts: its pid is not free)."""
    try:
        pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists; we may just not signal it
    return True


def borrow_socket_from(pidfd: int, fd: int) -> socket.socket:
    """A duplicate, in this process, of fd ``fd`` of the process of ``pidfd``."""
    borrowed = _syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    try:
        return socket.socket(fileno=borrowed)
    except OSError:
        os.close(borrowed)  # not a socket
        raise


def borrow_socket(pid: int, fd: int) -> socket.socket:
    """A duplicate, in this process, of fd ``fd`` of process ``pid`` (whoever that is now: check what you got)."""
    pidfd = pidfd_open(pid)
    try:
        return borrow_socket_from(pidfd, fd)
    finally:
        os.close(pidfd)
