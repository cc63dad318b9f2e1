"""An in-memory stand-in for one group's BPF maps, for the fast tests of the supervisor's logic.

It keeps what the kernel keeps and enforces what the kernel enforces at
this edge: a slot takes a socket only when empty (BPF_NOEXIST), a clear
can be guarded by the socket's cookie, and a slot empties when its socket
is closed for good (``socket_closed``, which the test calls when the
process it models exits).  The sockets themselves are real: unprivileged
SO_REUSEPORT listeners on loopback, so cookies and "is it listening?" are
the kernel's own answers.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from reuseport_standby.kernel.layout import Config, Counter
from reuseport_standby.kernel.sockets import socket_cookie

if TYPE_CHECKING:
    from reuseport_standby.supervisor.broker import Broker


@dataclass
class FakeCounters:
    values: dict[Counter, int] = field(default_factory=lambda: {c: 0 for c in Counter})

    def as_dict(self) -> dict[str, int]:
        return {c.name.lower(): v for c, v in self.values.items()}


class FakeGroup:
    """What :class:`reuseport_standby.supervisor.broker.GroupMaps` asks of a group, in memory."""

    def __init__(self, migrate: bool = True) -> None:
        self.migrate = migrate
        self.prog_fd = -1
        self._slots: dict[int, int] = {}
        self._config = Config()
        self.attached: list[int] = []
        self.config_writes = 0
        self.closed = False
        #: connections the program handed to each slot so far (a test raises them as traffic arrives)
        self.hits: dict[int, int] = {}

    def attach(self, sock: socket.socket) -> None:
        self.attached.append(socket_cookie(sock))

    def set_slot(self, index: int, sock: socket.socket | int) -> None:
        if index in self._slots:
            raise OSError(errno.EEXIST, f"slot {index} is taken")
        self._slots[index] = socket_cookie(sock)

    def clear_slot(self, index: int, expect_cookie: int | None = None) -> bool:
        if index not in self._slots or (expect_cookie is not None and self._slots[index] != expect_cookie):
            return False
        del self._slots[index]
        return True

    def slots(self) -> dict[int, int]:
        return dict(self._slots)

    def read_config(self) -> Config:
        return self._config

    def write_config(self, config: Config) -> None:
        self._config = config
        self.config_writes += 1

    def slot_hits(self, indices: "list[int] | range") -> dict[int, int]:
        return {i: self.hits.get(i, 0) for i in indices}

    def counters(self) -> FakeCounters:
        return FakeCounters()

    def close(self) -> None:
        self.closed = True

    # -- what the kernel does on its own ------------------------------------------------------
    def socket_closed(self, cookie: int) -> None:
        """The last fd of a socket closed: the kernel takes it out of its slot."""
        for i, c in list(self._slots.items()):
            if c == cookie:
                del self._slots[i]


class FakeKernel:
    """The groups of one service, by address, surviving supervisor restarts as pins do."""

    def __init__(self) -> None:
        self.groups: dict[object, FakeGroup] = {}

    def open_group(self, address: object) -> FakeGroup:
        group = self.groups.setdefault(address, FakeGroup())
        group.closed = False
        return group

    def socket_closed(self, cookie: int) -> None:
        for g in self.groups.values():
            g.socket_closed(cookie)


@contextlib.contextmanager
def memory_broker(service: str, addresses: int = 1) -> Iterator["Broker"]:
    """A Broker on free loopback ports with the in-memory kernel; ``b.held`` keeps the listeners a test's
    hellos received, closed afterwards with everything the broker holds."""
    from reuseport_standby.kernel.sockets import Address
    from reuseport_standby.supervisor.broker import Broker

    from .netutil import free_port

    b = Broker(service, [Address("127.0.0.1", free_port()) for _ in range(addresses)], backlog=16,
               open_group=FakeKernel().open_group, queues=dict, stall_timeout=0)
    b.open()
    held: list[socket.socket] = []
    b.held = held  # type: ignore[attr-defined]
    try:
        yield b
    finally:
        for s in held:
            s.close()
        for inst in b.registry:
            b.close_pending(inst)
        b.close()
