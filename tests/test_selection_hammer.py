"""Connections hammered at a group while its slots come and go, SIGKILLs included: none is lost.

Instances are real child processes, each the only owner of its listener,
answering one request per connection.  The test plays the supervisor's part
through the Group API, in the supervisor's order (``supervisor.broker``):
on ready the slot is filled, then the live-slot table lists it; on stop the
table drops it, then the slot is cleared, then the instance closes its
listener; on SIGKILL the kernel empties the slot while the table still lists
it, and the table catches up only some time later, as the supervisor does
when it sees the instance's control connection drop.

A SIGKILLed process also takes with it the connection it had accepted and
was answering: no port sharing can save that one.  So a victim is first made
to stop accepting (a hung process), with connections piling up in its
queue, and then killed: what the kernel does with that queue, and with the
new connections that meet the stale table entry, is what is measured.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import free_port, require_bcc
from reuseport_standby.kernel.group import Group
from reuseport_standby.kernel.layout import PARKING_SLOT, Role
from reuseport_standby.kernel.sockets import Address, create_listener, socket_cookie
from reuseport_standby.supervisor import slots

CLIENT_THREADS = 6
CYCLES = 12  # each: one instance started, one of its role ended (SIGKILL or stop, alternately)
RUN_SECONDS = 40  # a hard bound on the whole churn
TABLE_LAG = 0.15  # seconds between a SIGKILL and the table's catching up

# One instance: announces itself ready, answers "ok <request>" to every connection, one at a time.
# "p" on its control socket: stop accepting (a hung process) and say so; "s": close the listener, exit.
INSTANCE = r"""
import select, socket, sys, time
lsn = socket.socket(fileno=int(sys.argv[1]))
ctl = socket.socket(fileno=int(sys.argv[2]))
ctl.sendall(b"r")
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    ready, _, _ = select.select([lsn, ctl], [], [], 0.5)
    if ctl in ready:
        cmd = ctl.recv(1)
        if cmd == b"p":
            ctl.sendall(b"p")
            time.sleep(120)  # SIGKILLed while here
        lsn.close()
        sys.exit(0)
    if lsn in ready:
        conn, _ = lsn.accept()
        with conn:
            conn.settimeout(5)
            data = b""
            try:
                while not data.endswith(b"\n"):
                    chunk = conn.recv(100)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(b"ok " + data)
            except OSError:
                pass
"""


class Instance:
    """A child process holding the only reference to its listener."""

    def __init__(self, address: Address) -> None:
        lsn = create_listener(address, 1024)
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-c", INSTANCE, str(lsn.fileno()), str(theirs.fileno())],
                                     pass_fds=[lsn.fileno(), theirs.fileno()])
        theirs.close()
        ours.settimeout(30)
        self.ctl = ours
        self.listener: socket.socket | None = lsn  # ours until it sits in a slot
        self.cookie = socket_cookie(lsn)
        self.slot = -1

    def wait_ready(self) -> None:
        assert self.ctl.recv(1) == b"r", "the instance did not start"

    def hand_over(self) -> None:
        """Close our copy: from now on the child's is the only one, and its death closes the listener."""
        assert self.listener is not None
        self.listener.close()
        self.listener = None

    def hang(self) -> None:
        self.ctl.sendall(b"p")
        assert self.ctl.recv(1) == b"p"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        self.ctl.sendall(b"s")
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.ctl.close()
        if self.listener is not None:
            self.listener.close()


class Supervisor:
    """The supervisor's slot and table updates (supervisor/broker.py), in its order."""

    def __init__(self, group: Group) -> None:
        self.group = group

    def update_live(self, leaving: frozenset[int] = frozenset()) -> None:
        cfg = self.group.read_config()
        new = slots.live_config(cfg, set(self.group.slots()) - leaving)
        if new != cfg:
            self.group.write_config(new)

    def ready(self, inst: Instance, role: Role) -> None:
        assert inst.listener is not None
        inst.slot = slots.free_slot(self.group.slots(), role, swapped=False)
        self.group.set_slot(inst.slot, inst.listener)
        self.update_live()

    def stop(self, inst: Instance) -> None:
        self.update_live(leaving=frozenset({inst.slot}))
        self.group.clear_slot(inst.slot, inst.cookie)
        self.update_live()

    def disconnected(self) -> None:
        """The instance's connection dropped (SIGKILL): its slot is already empty; the table catches up."""
        self.update_live()


@dataclass
class Clients:
    """Client threads, each connecting, sending one request and reading its answer, again and again."""

    address: Address
    answered: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, deadline: float) -> None:
        n = 0
        while not self.stop.is_set() and time.monotonic() < deadline and n < 100_000:
            n += 1
            kind = self.one(n)
            with self.lock:
                if kind == "ok":
                    self.answered += 1
                else:
                    self.failures[kind] += 1

    def one(self, n: int) -> str:
        try:
            with socket.create_connection((self.address.host, self.address.port), timeout=10) as c:
                c.sendall(f"req {n}\n".encode())
                data = b""
                while not data.endswith(b"\n"):
                    chunk = c.recv(100)
                    if not chunk:
                        return "eof"
                    data += chunk
                return "ok" if data.startswith(b"ok req") else "garbled"
        except ConnectionRefusedError:
            return "refused"
        except ConnectionResetError:
            return "reset"
        except socket.timeout:
            return "timeout"
        except OSError as exc:
            return type(exc).__name__


@dataclass
class Outcome:
    answered: int
    failures: Counter[str]
    killed: int
    stopped: int
    stale_selections: int  #: connections selected while the table still listed a SIGKILLed slot
    counters: dict[str, int]


def hammer(pin_root: Path, migrate: bool, loader: str = "libbpf", seed: int = 19) -> Outcome:
    """Client threads against the group while instances start, hang and get SIGKILLed, or stop."""
    rng = random.Random(seed)
    address = Address("127.0.0.1", free_port())
    live: list[Instance] = []
    ended: list[Instance] = []
    killed = stopped = stale_selections = 0
    with Group.open(pin_root / address.group_name, migrate=migrate, loader=loader) as group:
        sup = Supervisor(group)
        anchor = create_listener(address)  # the supervisor's anchor: nothing should ever be parked on it
        group.attach(anchor)
        group.set_slot(PARKING_SLOT, anchor)

        def start(role: Role) -> None:
            inst = Instance(address)
            live.append(inst)
            inst.wait_ready()
            sup.ready(inst, role)
            inst.hand_over()

        clients = Clients(address)
        threads: list[threading.Thread] = []
        try:
            for role in (Role.PRIMARY, Role.PRIMARY, Role.PRIMARY, Role.STANDBY, Role.STANDBY):
                start(role)
            deadline = time.monotonic() + RUN_SECONDS
            threads = [threading.Thread(target=clients.run, args=(deadline + 15,), daemon=True)
                       for _ in range(CLIENT_THREADS)]
            for t in threads:
                t.start()
            for cycle in range(CYCLES):
                if time.monotonic() > deadline:
                    break
                # A rolling restart's step: three primaries and two standbys throughout, in changing slots.
                role = Role.STANDBY if cycle % 4 == 3 else Role.PRIMARY
                start(role)
                time.sleep(rng.uniform(0.1, 0.3))
                victim = rng.choice([i for i in live if i.slot in role.slot_range])
                live.remove(victim)
                ended.append(victim)
                if cycle % 2 == 0:
                    victim.hang()  # its queue fills ...
                    time.sleep(rng.uniform(0.1, 0.3))
                    victim.kill()  # ... the kernel empties its slot; the table still lists it
                    before = sum(group.slot_hits(Role.PRIMARY.slot_range).values())
                    time.sleep(TABLE_LAG)
                    sup.disconnected()
                    stale_selections += sum(group.slot_hits(Role.PRIMARY.slot_range).values()) - before
                    killed += 1
                else:
                    sup.stop(victim)
                    victim.stop()
                    stopped += 1
                time.sleep(rng.uniform(0.05, 0.2))
            time.sleep(0.3)
        finally:
            clients.stop.set()
            for t in threads:
                t.join(30)
            for inst in live + ended:
                inst.close()
            anchor.close()
        counters = group.counters().as_dict()
    return Outcome(clients.answered, clients.failures, killed, stopped, stale_selections, counters)


@pytest.mark.parametrize("loader", ["libbpf", "bcc"])
def test_no_connection_lost_while_slots_come_and_go(pin_root: Path, loader: str) -> None:
    """SELECT_OR_MIGRATE with the live-slot table kept in the supervisor's order: every connection answered."""
    if loader == "bcc":
        require_bcc()
    out = hammer(pin_root, migrate=True, loader=loader)
    print(f"\n{out.answered} answered, failures {dict(out.failures)}, {out.killed} SIGKILLs, {out.stopped} stops, "
          f"{out.stale_selections} selections while the table listed a killed slot, counters {out.counters}")
    assert out.killed >= 3 and out.stopped >= 3
    assert out.stale_selections > 0, "no connection met a stale table: the fallback was not exercised"
    assert out.answered > 500 and out.failures == {}, out.failures
    c = out.counters
    assert c["migrated_primary"] > 0, "no queue was migrated: the hammer did not test what it claims"
    # Every connection went to a primary's slot, even those whose hash chose a killed primary's table
    # entry (the program tries the next entry, a role-mate): never to the standby, never parked, never
    # left to the kernel's own hash.
    assert c["selected_primary"] >= out.answered and c["selected_standby"] == c["migrated_standby"] == 0, c
    assert c["parked"] == c["migrated_parked"] == c["fell_back"] == c["migrate_fell_back"] == 0, c


def test_contrast_plain_select_resets_the_queues_of_ended_instances(pin_root: Path) -> None:
    """The same churn with the program loaded as plain SELECT (no migration): connections are reset."""
    out = hammer(pin_root, migrate=False)
    print(f"\n{out.answered} answered, failures {dict(out.failures)}, {out.killed} SIGKILLs, {out.stopped} stops")
    assert out.failures["reset"] + out.failures["eof"] > 0, out.failures
