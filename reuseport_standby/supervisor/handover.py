"""What the supervisor does to a hung instance: the kernel actions behind a demotion."""

from __future__ import annotations

import logging
import os
import signal
import socket
from typing import TYPE_CHECKING

from ..kernel import diag, pidfd
from ..kernel.sockets import Address
from .peers import children
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
    try:
        borrowed = pidfd.borrow_socket(*where)
    except OSError as exc:
        log.warning("%s: cannot borrow its %s listener (%s): %d queued connection(s) stay with it until it "
                    "recovers or exits; give the supervisor CAP_SYS_PTRACE to hand them over",
                    inst.describe(), address, exc.strerror, q.queued)
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


def signal_hung(inst: Instance, on_hang: str) -> None:
    """--on-hang term / kill: signal the instance and its children."""
    sig = signal.SIGTERM if on_hang == "term" else signal.SIGKILL
    log.warning("%s: --on-hang=%s: sending %s", inst.describe(), on_hang, sig.name)
    if inst.pid <= 0:  # a peer in a PID namespace we cannot see: kill(0) would hit our own group
        log.warning("%s: its pid is not visible here; not signalling it", inst.describe())
        return
    for pid in [inst.pid, *children(inst.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            log.warning("%s: no permission to send %s to pid %d (another uid needs CAP_KILL)",
                        inst.describe(), sig.name, pid)
