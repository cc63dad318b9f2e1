"""The runner's children, held through pidfds until each has exited and been reaped.

``run`` must leave nothing behind: not a worker whose master died, not a
daemonizing grandchild.  It makes itself a *child subreaper*
(``PR_SET_CHILD_SUBREAPER``), so every descendant that outlives its parent
becomes its child instead of init's, and it can find, signal and reap them.

Signals go through pidfds (a pidfd names one process, never a later process
that got the same pid), and a process group is signalled only while its
leader is an unreaped child of ours: until we reap it, its pid (the group's
id) cannot be handed to anyone else.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import time
from dataclasses import dataclass

from .kernel.pidfd import pidfd_send_signal
from .supervisor.peers import parent_of

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphans among our descendants are reparented to us, not to pid 1 (Linux 3.4+)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def has_exited(pidfd: int) -> bool:
    """A pidfd becomes readable when its process exits (it may still be an unreaped zombie)."""
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)


def send(pidfd: int, sig: int) -> bool:
    """Signal the process of ``pidfd``; False when it has already exited (or, logged, may not be signalled)."""
    try:
        pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError as exc:  # another uid and no CAP_KILL: a unit that took it away
        log.error("cannot send signal %d: %s (does 'run' have CAP_KILL?)", sig, exc)
        return False


def generation_of(pid: int, name: str) -> str | None:
    """The value of environment variable ``name`` a process started with (a forked child shows its parent's)."""
    prefix = name.encode() + b"="
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return None
    for item in env.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
    return None


def my_children() -> set[int]:
    """Every process whose parent is this process.

    From /proc/self/task/*/children (a reparented orphan may land on any of our threads) where the
    kernel has it (CONFIG_PROC_CHILDREN: Debian's, Ubuntu's, Fedora's kernels); else by reading every
    /proc/PID/stat, which costs milliseconds per call on a busy host (``run`` calls this 5 times a
    second: with the full scan, 12.5 ms of CPU per second here, 1.5 in all without)."""
    try:
        found: set[int] = set()
        for task in os.scandir("/proc/self/task"):
            with open(os.path.join(task.path, "children")) as f:
                found.update(int(pid) for pid in f.read().split())
        return found
    except FileNotFoundError:
        pass
    me = os.getpid()
    return {int(e.name) for e in os.scandir("/proc") if e.name.isdigit() and parent_of(int(e.name)) == me}


@dataclass
class Adopted:
    """A descendant reparented to us: a worker whose master died, or a daemon whose parent exited."""

    pid: int
    pidfd: int
    generation: str | None
    kill_at: float | None = None  # None: its instance still runs, it may too
    killed: bool = False


class Orphans:
    """Descendants reparented to us.  One that belongs to a running instance (by its generation, from
    its environment) is left alone, and reaped when it exits; the others, and those of an instance
    that has exited since, get SIGTERM (finish what you hold) and SIGKILL after a grace time."""

    def __init__(self, env_name: str) -> None:
        self.env_name = env_name
        self.adopted: dict[int, Adopted] = {}

    def adopt(self, known: set[int]) -> None:
        """Take in our children that no Popen of ours owns."""
        for pid in my_children() - known - set(self.adopted):
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            if parent_of(pid) != os.getpid():  # reaped by someone else and the pid reused in between
                os.close(pidfd)
                continue
            self.adopted[pid] = Adopted(pid, pidfd, generation_of(pid, self.env_name))

    def tend(self, live_generations: set[str], grace: float, force: bool = False) -> None:
        """Reap the ones that exited; stop those whose instance is gone; SIGKILL the overdue
        (every one with ``force``)."""
        now = time.monotonic()
        for pid, a in list(self.adopted.items()):
            if force and a.kill_at is not None:
                a.kill_at = min(a.kill_at, now + grace)
            if has_exited(a.pidfd):
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                os.close(a.pidfd)
                del self.adopted[pid]
                continue
            if a.kill_at is None and (force or a.generation not in live_generations):
                log.warning("pid %d (generation %s) outlived its instance; stopping it (SIGKILL in %.0f s)",
                            pid, a.generation, grace)
                send(a.pidfd, signal.SIGTERM)
                a.kill_at = now + grace
            if a.kill_at is not None and not a.killed and (now >= a.kill_at or (force and grace <= 0)):
                log.warning("pid %d did not stop; killing it", pid)
                send(a.pidfd, signal.SIGKILL)
                a.killed = True

    def __len__(self) -> int:
        return len(self.adopted)
