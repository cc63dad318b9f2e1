"""``reuseport-standby demo``: the core promise, shown with real sockets.

A primary and a standby listener share a loopback port; N clients connect
and send a request while the primary never accepts; then the primary is
closed.  With the program loaded as SELECT_OR_MIGRATE the standby answers
every one of them; loaded as plain SELECT (the published hot-standby
design) the same script loses them all.
"""

from __future__ import annotations

import select
import socket
import time
import uuid
from pathlib import Path

from .kernel.layout import Config, Role
from .kernel.pins import DEFAULT_PIN_ROOT
from .kernel.group import Group
from .kernel.sockets import Address, create_listener


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _remove(path: Path) -> None:
    for child in path.iterdir():
        _remove(child) if child.is_dir() else child.unlink()
    path.rmdir()


def _round(migrate: bool, n: int, port: int) -> tuple[int, int, dict[str, int]]:
    address = Address("127.0.0.1", port)
    pin = Path(DEFAULT_PIN_ROOT) / f"demo-{uuid.uuid4().hex[:8]}"
    group = Group.open(pin / address.group_name, migrate=migrate, mount_bpffs=True)
    try:
        primary, standby = create_listener(address), create_listener(address)
        group.attach(primary)
        p, s = Role.PRIMARY.slot_range[0], Role.STANDBY.slot_range[0]
        group.set_slot(p, primary)
        group.set_slot(s, standby)
        group.write_config(Config().with_live([p, s]))

        clients = []
        for i in range(n):
            c = socket.create_connection(("127.0.0.1", port), timeout=3)
            c.sendall(f"request {i}\n".encode())
            clients.append(c)
        primary.close()  # dies with n connections in its queue

        standby.setblocking(False)
        deadline = time.monotonic() + (2 if migrate else 0.5)
        while time.monotonic() < deadline:
            if not select.select([standby], [], [], 0.05)[0]:
                continue
            conn, _ = standby.accept()
            with conn:
                conn.settimeout(2)
                conn.sendall(b"answered " + conn.recv(64))
        answered = reset = 0
        for c in clients:
            try:
                answered += c.recv(64).startswith(b"answered")
            except OSError:
                reset += 1
            c.close()
        standby.close()
        return answered, reset, group.counters().as_dict()
    finally:
        group.close()
        _remove(pin)


def kernel_demo(connections: int = 50, port: int = 0) -> int:
    """Run both rounds and print what the clients saw; exit 0 only if the promise held."""
    port = port or _free_port()
    print(f"{connections} clients queue a request on the primary at 127.0.0.1:{port}; the primary is then closed.\n")
    print(f"{'program':<26}{'answered by standby':>20}{'reset':>8}   kernel counters")
    ok = True
    for migrate, label in ((True, "select-or-migrate (ours)"), (False, "plain select (demo design)")):
        answered, reset, counters = _round(migrate, connections, port)
        moved = counters["migrated_standby"]
        print(f"{label:<26}{answered:>20}{reset:>8}   selected_primary={counters['selected_primary']} migrated_standby={moved}")
        if migrate and answered != connections:
            ok = False
    print("\n" + ("every queued connection survived the primary's death" if ok else "CONNECTIONS WERE LOST"))
    return 0 if ok else 1
