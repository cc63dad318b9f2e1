"""Who is connected: instances and workers, their states, and what one user may hold.

Pure bookkeeping: nothing here touches the kernel or a socket (but for
closing a forgotten peer's pidfd).  Lookups
by pid survive a supervisor restart (a worker finds its instance again by
its parent's pid), which is why the registry, not the connection, is the
place to ask "which instance is pid P?".
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import ProtocolError, see_doc
from ..kernel.layout import WORKERS_PER_INSTANCE
from ..kernel.sockets import Address
from ..names import Role, Scope, State
from ..outcomes import Outcomes

#: instances of one role one uid (root excepted) may hold: the two that overlap in a rolling restart
INSTANCES_PER_ROLE_PER_UID = 2


@dataclass
class Progress:
    """Is an active listener still being accepted from?  (hits from BPF, depth from sock_diag)"""

    hits: int
    queued: int
    last: float  # monotonic time of the last sign of progress

    def update(self, hits: int, queued: int, now: float) -> float:
        """Seconds without progress: nothing accepted while connections waited."""
        accepted = (hits - self.hits) - (queued - self.queued)
        if queued == 0 or accepted > 0:
            self.last = now
        self.hits, self.queued = hits, queued
        return now - self.last


@dataclass(eq=False)
class Instance:
    """One connected peer: an app instance (a gunicorn master, a uvicorn process...), one of its
    workers in worker scope, or an operator's command connection (no role)."""

    id: int
    conn: socket.socket | None
    pid: int
    uid: int
    role: Role | None = None
    name: str = ""
    state: State = State.PENDING
    since: float = field(default_factory=time.time)
    pending: dict[Address, socket.socket] = field(default_factory=dict)  # our copies, until activation
    cookies: dict[Address, int] = field(default_factory=dict)
    slots: dict[Address, int] = field(default_factory=dict)
    heartbeat: float | None = None       # interval the instance promised, if any
    last_heartbeat: float = field(default_factory=time.monotonic)
    demoted_at: float = 0.0
    demotions: int = 0
    demoted_for: str = ""
    progress: dict[Address, Progress] = field(default_factory=dict)
    scope: Scope = Scope.INSTANCE        # WORKER: its workers register on their own; its sockets stay pending
    parent: int | None = None            # a worker's: the pid of the instance it belongs to
    parent_checked: bool = True          # False: the kernel says this "worker" is no child of ``parent``
    outbox: deque[tuple[bytes, list[int]]] = field(default_factory=deque)  # reply frames not taken yet (fds: our dups)
    send_by: float = 0.0                 # monotonic deadline for the outbox to empty
    #: may send operator commands (weight, promote, drain, undrain): root, the supervisor's own user or a member
    #: of --admin-group, as the kernel recorded the peer at connect
    admin: bool = False
    #: a pidfd of the peer process (None: none yet, or none to be had, e.g. no real peer): taken at connect, or
    #: from SO_PEERPIDFD when first needed (handover.instance_pidfd); the only way the supervisor signals the
    #: peer or borrows its fds, so a pid recycled after it exited is never hit.  Closed by ``forget``
    pidfd: int | None = None
    version: str | None = None           # the app's version, as hello/readopt said
    #: what the process's app answered, cumulative, as its last heartbeat said
    reported: Outcomes = field(default_factory=Outcomes)
    #: a worker-scope instance: the counts of its workers that left (so the instance's sum never goes down)
    inherited: Outcomes = field(default_factory=Outcomes)

    @property
    def outcomes(self) -> Outcomes:
        """This entry's cumulative counts: its own reports and those its departed workers left it."""
        return self.reported + self.inherited

    def describe(self) -> str:
        what = "worker of pid %d, " % self.parent if self.parent is not None else ""
        return f"instance {self.id} ({self.role.value if self.role else '?'}, {what}pid {self.pid}{', ' + self.name if self.name else ''})"

    @property
    def is_head(self) -> bool:
        """An instance in its own right (not a worker), registered with a role."""
        return self.parent is None and self.role is not None


class Registry:
    """Every connected peer, in the order they came."""

    def __init__(self, trusted_uids: frozenset[int] = frozenset({0})) -> None:
        #: uids no quota applies to: root and the supervisor's own user, who may do anything here anyway
        self.trusted_uids = trusted_uids
        self._by_id: dict[int, Instance] = {}
        self._ids = itertools.count(1)
        self.connections_by_uid: Counter[int] = Counter()

    def new(self, conn: socket.socket | None, pid: int, uid: int, *, admin: bool | None = None,
            pidfd: int | None = None) -> Instance:
        """``admin`` None: what the uid alone says (root and the supervisor's own user are operators).
        ``pidfd`` is the registry's from here on: closed when the peer is forgotten."""
        inst = Instance(id=next(self._ids), conn=conn, pid=pid, uid=uid,
                        admin=uid in self.trusted_uids if admin is None else admin, pidfd=pidfd)
        self._by_id[inst.id] = inst
        self.connections_by_uid[uid] += 1
        return inst

    def forget(self, inst: Instance) -> bool:
        """Drop ``inst`` and close its pidfd; False if it was already gone."""
        if self._by_id.pop(inst.id, None) is None:
            return False
        head = self.head_of(inst) if inst.parent_checked else None
        if head is not None and head is not inst:
            head.inherited = head.inherited + inst.outcomes  # the instance's sum keeps what this worker served
        if inst.pidfd is not None:
            fd, inst.pidfd = inst.pidfd, None
            try:
                os.close(fd)
            except OSError:
                pass
        self.connections_by_uid[inst.uid] -= 1
        if self.connections_by_uid[inst.uid] <= 0:
            del self.connections_by_uid[inst.uid]
        return True

    def __iter__(self) -> Iterator[Instance]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, inst: object) -> bool:
        return isinstance(inst, Instance) and self._by_id.get(inst.id) is inst

    # -- lookups ----------------------------------------------------------------------
    def registered(self) -> list[Instance]:
        return [i for i in self._by_id.values() if i.role is not None]

    def head_by_pid(self, pid: int) -> Instance | None:
        """The instance (not a worker) whose process is ``pid``."""
        return next((i for i in self._by_id.values() if i.pid == pid and i.is_head), None)

    def head_of(self, worker: Instance) -> Instance | None:
        """The instance a worker belongs to (matched by pid: it survives a supervisor restart)."""
        return None if worker.parent is None else self.head_by_pid(worker.parent)

    def workers_of(self, head: Instance) -> list[Instance]:
        return [i for i in self._by_id.values() if i.parent == head.pid and i is not head]

    def in_role(self, role: Role, state: State | None = None) -> list[Instance]:
        return [i for i in self._by_id.values() if i.role is role and (state is None or i.state is state)]

    def reserved_slots(self, address: Address) -> set[int]:
        """Slots instances hold at ``address`` (a slot the kernel emptied may still be one's until it leaves)."""
        return {i.slots[address] for i in self._by_id.values() if address in i.slots}

    def owners(self, address: Address) -> dict[int, int]:
        """Socket cookie -> instance id at ``address``."""
        return {i.cookies[address]: i.id for i in self._by_id.values() if address in i.cookies}

    # -- quotas -----------------------------------------------------------------------
    def connection_refusal(self, uid: int, cap: int, service: str) -> str | None:
        if uid in self.trusted_uids or self.connections_by_uid[uid] < cap:
            return None
        return (f"uid {uid} already holds {self.connections_by_uid[uid]} control connections to service "
                f"{service}, the most one user may (--max-connections-per-uid); close some first "
                f"({see_doc('slots-full')})")

    def check_quota(self, inst: Instance, role: Role, parent: int | None, parent_checked: bool) -> None:
        """No uid but root (or the supervisor's own) holds more than two instances' worth of one role's slots.

        Else one user (any member of --group) could take every free slot of a
        role, and the next rolling reload of the real service would fail.  An
        instance's worth: the instance itself in instance scope; its workers
        (at most WORKERS_PER_INSTANCE) in worker scope.  A worker counts toward
        its instance only if it is that process's child (when the kernel lets
        us check); otherwise it counts as an instance of its own.
        """
        if inst.uid in self.trusted_uids:
            return
        head = self.head_by_pid(parent) if parent is not None and parent_checked else None
        if head is not None:
            workers = [w for w in self.workers_of(head) if w.state.alive and w.parent_checked]
            if len(workers) >= WORKERS_PER_INSTANCE:
                raise ProtocolError("quota", f"{head.describe()} already has {len(workers)} workers registered, the "
                                    f"most one instance may have in worker scope ({WORKERS_PER_INSTANCE})", see="slots-full")
            return
        held = [i for i in self._by_id.values() if i.uid == inst.uid and i.role is role and i.state.alive
                and i is not inst and (i.parent is None or not i.parent_checked or self.head_of(i) is None)]
        if len(held) >= INSTANCES_PER_ROLE_PER_UID:
            raise ProtocolError("quota", f"uid {inst.uid} already holds {len(held)} {role.value} instances "
                                f"({', '.join(str(i.id) for i in held)}), the most one user may (the two of a rolling "
                                f"restart): stop one first", see="slots-full")
