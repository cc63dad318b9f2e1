"""What the supervisor does to a hung instance: the kernel actions behind a demotion."""

from __future__ import annotations

import logging
import os
import signal
import socket
from typing import TYPE_CHECKING

from ..kernel import diag, pidfd
from ..kernel.sockets import Address
from . import peers
from .peers import children, parent_of
from .registry import Instance

if TYPE_CHECKING:
    from .broker import GroupMaps

log = logging.getLogger("reuseport_standby.supervisor")


def hand_over_queue(inst: Instance, group: "GroupMaps", address: Address, slot: int,
                    q: diag.ListenerQueue | None, backlog: int) -> None:
    """Move what waits in a demoted instance's queue to the other instance.

    Borrow its listener (pidfd_getfd), shutdown() it — the kernel migrates
    the queue through the program, which skips the disabled slot — then
    listen() again and put it back in its (still disabled) slot, so the
    instance finds an empty, working listener if it recovers.
    """
    if q is None or q.inode == 0:
        return
    where = pidfd.find_socket_fd(inst.pid, q.inode)
    if where is None:
        log.warning("%s: could not find its %s listener in /proc to hand its queue over", inst.describe(), address)
        return
    holder, fd = where
    own = instance_pidfd(inst)
    try:
        if holder == inst.pid and own is not None:
            borrowed = pidfd.borrow_socket_from(own, fd)  # the process that connected, never a successor
        else:
            borrowed = pidfd.borrow_socket(holder, fd)  # a child (or no pidfd): checked by its inode below
    except OSError as exc:
        log.warning("%s: cannot borrow its %s listener (%s): %d queued connection(s) stay with it until it "
                    "recovers or exits; give the supervisor CAP_SYS_PTRACE to hand them over",
                    inst.describe(), address, exc.strerror, q.queued)
        return
    # /proc was read by pid: whatever a recycled pid or a reused fd number gave us, only the very socket
    # sock_diag reported (its inode) is ever shut down.
    if os.fstat(borrowed.fileno()).st_ino != q.inode:
        borrowed.close()
        log.warning("%s: its %s listener moved while it was being borrowed: its queue stays with it",
                    inst.describe(), address)
        return
    try:
        borrowed.shutdown(socket.SHUT_RDWR)
        borrowed.listen(backlog)
        group.set_slot(slot, borrowed)
        log.info("%s: handed %d queued connection(s) on %s to the other instance", inst.describe(), q.queued, address)
    except OSError as exc:
        log.warning("%s: handing over the %s queue failed: %s", inst.describe(), address, exc)
    finally:
        borrowed.close()


def instance_pidfd(inst: Instance) -> int | None:
    """The instance's pidfd: the one taken at connect, or, where the kernel has SO_PEERPIDFD, the one it
    gives now for the process recorded at connect (kept on the instance; closed when it is forgotten).
    Never one opened by pid here: that pid may by now be another process's."""
    if inst.pidfd is None and inst.conn is not None and inst.pid > 0:
        try:
            deferred = peers.has_peerpidfd()
        except OSError:
            deferred = False
        if deferred:
            inst.pidfd = peers.peer_pidfd(inst.conn, inst.pid)
    return inst.pidfd


def signal_hung(inst: Instance, on_hang: str) -> None:
    """--on-hang term / kill: signal the instance and its children, through pidfds only.

    A pid is only a name, which the kernel gives to another process once the
    instance has exited and been reaped; a pidfd (taken while the peer was
    connected) stays the instance's.  Its children are read from /proc by
    pid, so each is opened as a pidfd first and kept only if, after that, it
    is still the instance's child while the instance still lives: then that
    pid meant that child all along.  Never ``kill(pid)``.
    """
    sig = signal.SIGTERM if on_hang == "term" else signal.SIGKILL
    if inst.pid <= 0:  # a peer in a PID namespace we cannot see: kill(0) would hit our own group
        log.warning("%s: its pid is not visible here; not signalling it", inst.describe())
        return
    own = instance_pidfd(inst)
    if own is None:
        log.warning("%s: --on-hang=%s: no pidfd of it could be had while it was connected; not signalling it "
                    "(a pid alone may by now be another process's)", inst.describe(), on_hang)
        return
    if not pidfd.is_alive(own):
        log.info("%s: --on-hang=%s: it has already exited; nothing to signal", inst.describe(), on_hang)
        return
    kids = _children_pidfds(inst, own)
    log.warning("%s: --on-hang=%s: sending %s (and to %d child(ren))", inst.describe(), on_hang, sig.name, len(kids))
    try:
        for pid, fd in [(inst.pid, own), *kids]:
            try:
                pidfd.pidfd_send_signal(fd, sig)
            except ProcessLookupError:
                pass
            except PermissionError:
                log.warning("%s: no permission to send %s to pid %d (another uid needs CAP_KILL)",
                            inst.describe(), sig.name, pid)
    finally:
        for _, fd in kids:
            os.close(fd)


def _children_pidfds(inst: Instance, own: int) -> list[tuple[int, int]]:
    """(pid, pidfd) of each child of the instance that is sure to be its child (the caller closes them)."""
    out: list[tuple[int, int]] = []
    for child in children(inst.pid):
        try:
            fd = pidfd.pidfd_open(child)
        except OSError:
            continue  # gone already
        # The order matters: the pidfd first, then the parent read by pid, then both still alive.  A child
        # alive after the read held its pid throughout, so /proc spoke of it; the instance alive after it
        # held its own, so the parent named was the instance.
        if parent_of(child) == inst.pid and pidfd.is_alive(fd) and pidfd.is_alive(own):
            out.append((child, fd))
        else:
            os.close(fd)
    return out
