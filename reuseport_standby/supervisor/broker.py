"""The broker: hands listeners to instances and puts them in slots of their role once ready.

It owns, per address, the group (program and maps) and the anchor (the
supervisor's own listener in the parking slot), and the registry of
instances.  After activation it keeps no fd of an instance socket: the
instance's exit must close the socket, which is what empties the slot and
migrates the queue.

No socket I/O with peers happens here (that is :mod:`.loop`), and the
kernel is reached through two callables given at construction (open a
group, read the accept queues), so that the whole state machine runs
against an in-memory stand-in in the fast tests.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

from .. import protocol
from ..errors import ProtocolError, ReuseportStandbyError
from ..kernel import diag
from ..kernel.layout import FLAG_SWAP_ROLES, PARKING_SLOT, Config
from ..kernel.sockets import (Address, bind_reuseport, create_listener, is_listening_tcp, listens_on, lock_filter,
                              requeue, socket_cookie)
from ..names import Role, Scope, State
from . import handover, health, slots
from .integrity import ProgramWatch, anchor_allowance
from .peers import may_be_child
from .registry import Instance, Progress, Registry

log = logging.getLogger("reuseport_standby.supervisor")

Reply = tuple[dict[str, Any], list[int]]

#: seconds between two sock_diag polls of an idle service at the most (see Broker._quiet)
QUIET_POLL = 1.0


def listen_error(address: Address, exc: OSError) -> ReuseportStandbyError:
    """Why the supervisor cannot listen on ``address``, told apart by what sock_diag shows on the port.

    EADDRINUSE has two causes with different fixes: the port's listeners belong to another uid (a
    reuseport group admits sockets of one owner uid only), or a socket of ours holds it without
    SO_REUSEPORT.
    """
    head = f"cannot listen on {address}: {exc.strerror}. "
    if exc.errno == errno.EADDRINUSE:
        try:
            owners = sorted({q.uid for q in diag.listeners((address.family,)).values() if q.port == address.port})
        except OSError:
            owners = []
        others = [uid for uid in owners if uid != os.geteuid()]
        if others:
            return ReuseportStandbyError(
                head + f"Its listening sockets belong to uid {', '.join(map(str, others))} and this supervisor runs "
                f"as uid {os.geteuid()}: the kernel admits one owner uid per port's reuseport group. Stop that "
                f"process, or run the supervisor as the same user as before", see="uid-mismatch-in-the-reuseport-group")
        return ReuseportStandbyError(
            head + "Another process holds this port without SO_REUSEPORT, or a connection uses it as its local port "
            "(TIME-WAIT included; ss -tanp 'sport = :%d' shows it); stop it first, or serve a port outside the ephemeral range"
            % address.port, see="port-held-by-a-socket-without-so_reuseport")
    if exc.errno == errno.EACCES:
        return ReuseportStandbyError(head + "Binding a port below 1024 needs CAP_NET_BIND_SERVICE",
                                     see="missing-privileges")
    hint = {
        errno.EADDRNOTAVAIL: "It is not an address of this host: ip -brief address lists them",
        errno.EINVAL: "A link-local IPv6 address needs its interface, e.g. [fe80::1%eth0]:PORT",
        errno.ENODEV: "No network interface has that name: ip -brief link lists them",
    }.get(exc.errno or 0, "Check the address")
    return ReuseportStandbyError(head + hint, see="cannot-listen-on-the-address")


class GroupMaps(Protocol):
    """What the broker uses of a :class:`~..kernel.group.Group` (the fast tests' fake has the same)."""

    migrate: bool

    def attach(self, sock: socket.socket) -> None: ...
    def set_slot(self, index: int, sock: socket.socket | int) -> None: ...
    def clear_slot(self, index: int, expect_cookie: int | None = None) -> bool: ...
    def slots(self) -> dict[int, int]: ...
    def read_config(self) -> Config: ...
    def write_config(self, config: Config) -> None: ...
    def slot_hits(self, indices: "list[int] | range") -> dict[int, int]: ...
    def counters(self) -> Any: ...  # .values: {Counter: sum over CPUs}
    def close(self) -> None: ...


OpenGroup = Callable[[Address], GroupMaps]
ReadQueues = Callable[[], "dict[int, diag.ListenerQueue]"]


def kernel_queues() -> dict[int, diag.ListenerQueue]:
    """Accept-queue depths by socket cookie ({} where sock_diag is unavailable)."""
    try:
        return diag.listeners()
    except OSError as exc:
        log.debug("sock_diag unavailable: %s", exc)
        return {}


@dataclass
class AddressState:
    address: Address
    group: GroupMaps
    anchor: socket.socket
    watch: ProgramWatch


class Broker:
    """One service's addresses, slots and instances."""

    def __init__(self, service: str, addresses: list[Address], *, backlog: int, open_group: OpenGroup,
                 queues: ReadQueues = kernel_queues, stall_timeout: float = 2.0, on_hang: str = "demote") -> None:
        self.service = service
        self.addresses = list(addresses)
        self.backlog = backlog
        self.open_group = open_group
        self.queues = queues
        self.stall_timeout = stall_timeout
        self.on_hang = on_hang
        self.registry = Registry(trusted_uids=frozenset({0, os.geteuid()}))
        self.states: dict[Address, AddressState] = {}
        self.swapped = False
        self.demotions_total = 0
        self.started_at = time.time()
        #: what ``status`` says of the supervisor besides the broker's own figures (control path, pin dir)
        self.about: dict[str, Any] = {}
        #: called with (address state, on) when the anchor should (not) be watched for parked connections
        self.watch_anchor: Callable[[AddressState, bool], None] = lambda st, on: None
        #: whether ``address`` may already have listeners of this service (its pins exist: a supervisor
        #: restart re-adopts them); without, a listener already there belongs to another group
        self.may_adopt: Callable[[Address], bool] = lambda address: True

    # -- addresses ----------------------------------------------------------------------
    def open(self) -> None:
        """Open (or re-adopt) every address's group and anchor; finish a promote interrupted half-way.

        Every address is bound first (not listening: no group joined) and checked for listeners of
        another group, so that an unusable address is refused before anything is loaded or pinned."""
        reserved: dict[Address, socket.socket] = {}
        try:
            for address in self.addresses:
                reserved[address] = self._reserve(address)
            for address in self.addresses:
                self.states[address] = self._open_address(address, reserved.pop(address))
            self.swapped = next(iter(self.states.values())).group.read_config().swapped
            for st in self.states.values():
                self.edit_config(st.group, flags=FLAG_SWAP_ROLES if self.swapped else 0)
        except BaseException:
            for sock in reserved.values():
                sock.close()
            self.close()
            raise

    def _reserve(self, address: Address) -> socket.socket:
        try:
            sock = bind_reuseport(address)
        except OSError as exc:
            raise listen_error(address, exc) from None
        if not self.may_adopt(address):
            theirs = [q for q in self.queues().values() if listens_on(q, address)]
            if theirs:
                sock.close()
                raise ReuseportStandbyError(
                    f"cannot serve {address}: {len(theirs)} SO_REUSEPORT socket(s) of uid "
                    f"{', '.join(sorted({str(q.uid) for q in theirs}))} already listen there, and this service has "
                    f"no pins for it (another service, another server, or instances left from before this "
                    f"service's pins were removed). Joining their group would take it over: stop them "
                    f"(ss -ltnp 'sport = :{address.port}'), or choose another port", see="cannot-listen-on-the-address")
        return sock

    def _open_address(self, address: Address, anchor: socket.socket) -> AddressState:
        try:
            group = self.open_group(address)
        except BaseException:
            anchor.close()
            raise
        try:
            try:
                anchor.listen(self.backlog)
            except OSError as exc:
                raise listen_error(address, exc) from None
            # Attach after listen(): attaching first would make the anchor a group of its own.  The anchor
            # is the one member never locked (SO_LOCK_FILTER): it never leaves this process.
            group.attach(anchor)
            self._fill_parking(group, anchor)
        except BaseException:
            anchor.close()
            group.close()
            raise
        orphans = {i: c for i, c in group.slots().items() if i != PARKING_SLOT}
        if orphans:
            log.info("%s: re-adopted %d live slot(s) from before this supervisor started: %s",
                     address, len(orphans), sorted(orphans))
        self.update_live(group)
        return AddressState(address, group, anchor, ProgramWatch(base=anchor_allowance(group.counters().values)))

    @staticmethod
    def _fill_parking(group: GroupMaps, anchor: socket.socket) -> None:
        group.clear_slot(PARKING_SLOT)
        group.set_slot(PARKING_SLOT, anchor)

    def close(self) -> None:
        """Forget every instance and close the anchors and groups; traffic keeps flowing through
        the instances' sockets (closing an anchor migrates what is parked to a live instance)."""
        for inst in self.registry:
            self.close_pending(inst)
        for st in self.states.values():
            self.watch_anchor(st, False)
            st.anchor.close()
            st.group.close()
        self.states.clear()

    @property
    def migrating(self) -> bool:
        return all(s.group.migrate for s in self.states.values())

    # -- requests -------------------------------------------------------------------------
    def handle(self, inst: Instance, req: protocol.Request, socks: list[socket.socket]) -> Reply:
        """One request of a peer: (reply, fds to send with it).  Errors raise ProtocolError / ReuseportStandbyError."""
        from . import commands

        if req.op == "ping":
            return {"ok": True}, []
        if req.op == "heartbeat":
            inst.last_heartbeat = time.monotonic()
            if req.outcomes is not None and inst.role is not None:
                inst.reported = req.outcomes
            return {"ok": True, "state": inst.state.value}, []
        if req.op == "status":
            from .view import status

            return {"ok": True, "status": status(self)}, []
        if req.op in protocol.ADMIN_OPS:
            return commands.run(self, inst, req), []
        if req.op == "hello":
            return self.hello(inst, req)
        if req.op == "readopt":
            return self.readopt(inst, req, socks), []
        if inst.role is None:
            raise ProtocolError("no_hello", f"'{req.op}' before 'hello': say who you are first")
        if req.op == "ready":
            return self.activate(inst), []
        if req.op == "stop":
            self.deactivate(inst, State.DRAINING)
            return {"ok": True, "state": inst.state.value}, []
        raise ProtocolError("unknown_op", req.op)  # unreachable: parse_request checks

    def hello(self, inst: Instance, req: protocol.Request) -> Reply:
        if inst.role is not None:
            raise ProtocolError("already_registered", f"this connection is already {inst.describe()}")
        assert req.role is not None and req.pid is not None
        role = self.role_of_worker(req) or req.role
        self.check_room(role)
        parent_checked = req.parent is None or may_be_child(inst.pid, req.parent)
        self.registry.check_quota(inst, role, req.parent, parent_checked)
        inst.role, inst.name, inst.heartbeat, inst.version = role, req.name, req.heartbeat, req.version
        inst.scope, inst.parent, inst.parent_checked = Scope(req.scope), req.parent, parent_checked
        if req.pid != inst.pid:
            log.debug("instance %d says pid %d; the kernel says %d", inst.id, req.pid, inst.pid)
        created: list[socket.socket] = []
        try:
            for address in self.addresses:
                created.append(create_listener(address, self.backlog))
                lock_filter(created[-1])  # its holder can never attach a program of its own to the group
        except OSError as exc:
            for s in created:
                s.close()
            inst.role = None
            raise ReuseportStandbyError(f"could not create a listener: {listen_error(address, exc)}") from exc
        for address, sock in zip(self.addresses, created):
            inst.pending[address] = sock
            inst.cookies[address] = socket_cookie(sock)
        log.info("%s connected; handed out %d listener(s)", inst.describe(), len(created))
        return ({"ok": True, "instance": inst.id, "addresses": [str(a) for a in self.addresses],
                 "backlog": self.backlog, "cookies": [inst.cookies[a] for a in self.addresses]},
                [s.fileno() for s in created])

    def role_of_worker(self, req: protocol.Request) -> Role | None:
        """A worker serves its instance's role, which a promote may have swapped since that instance started."""
        if req.parent is None:
            return None
        head = self.registry.head_by_pid(req.parent)
        return head.role if head is not None else None

    def sync_head(self, head: Instance | None) -> None:
        """A worker-scope instance is active while any of its workers is (it holds no slot itself)."""
        if head is None or head.scope is not Scope.WORKER or head.state not in (State.PENDING, State.ACTIVE):
            return
        state = State.ACTIVE if any(w.state is State.ACTIVE for w in self.registry.workers_of(head)) else State.PENDING
        if state is not head.state:
            head.state = state
            log.info("%s %s (through its workers)", head.describe(),
                     "active" if state is State.ACTIVE else "has no active worker")

    def check_room(self, role: Role) -> None:
        for st in self.states.values():
            slots.free_slot(self._used(st), role, self.swapped, str(st.address))

    def _used(self, st: AddressState) -> set[int]:
        return set(st.group.slots()) | self.registry.reserved_slots(st.address)

    def activate(self, inst: Instance) -> dict[str, Any]:
        assert inst.role is not None
        if inst.state is State.ACTIVE:
            return {"ok": True, "state": inst.state.value, "slots": {str(a): s for a, s in inst.slots.items()}}
        if not inst.pending:
            raise ProtocolError("no_sockets", "this instance holds no sockets the supervisor can activate "
                                "(after 'stop' an instance must reconnect to serve again)")
        head = self.registry.head_of(inst)
        if head is not None and head.state is State.DRAINING:
            raise ProtocolError("draining", f"{head.describe()}, which this worker belongs to, is stopping")
        for address, sock in inst.pending.items():
            if not is_listening_tcp(sock):
                raise ProtocolError("not_listening", f"the {address} socket no longer listens")
        chosen: dict[Address, int] = {}
        try:
            for address, sock in inst.pending.items():
                st = self.states[address]
                slot = slots.free_slot(self._used(st), inst.role, self.swapped, str(address))
                st.group.set_slot(slot, sock)
                chosen[address] = slot
        except BaseException:
            for address, slot in chosen.items():
                self.states[address].group.clear_slot(slot, inst.cookies[address])
            raise
        inst.slots = chosen
        inst.state = State.ACTIVE
        self.start_progress(inst)
        self.close_pending(inst)
        for address in chosen:
            st = self.states[address]
            self.update_live(st.group)
            self.release_parked(st)
        log.info("%s active in slots %s", inst.describe(), {str(a): s for a, s in chosen.items()})
        if head is not None and head.state.disabled:
            self.disable(inst, State.DRAINED)  # a worker of a drained instance (e.g. recycled) joins drained
        self.sync_head(head)
        return {"ok": True, "state": inst.state.value, "slots": {str(a): s for a, s in chosen.items()}}

    def deactivate(self, inst: Instance, new_state: State) -> None:
        for address, slot in inst.slots.items():
            st = self.states[address]
            self.update_live(st.group, leaving=frozenset({slot}))
            if not st.group.clear_slot(slot, inst.cookies[address]):
                log.debug("%s: slot %d of %s was already empty", inst.describe(), slot, address)
            self.update_live(st.group)
            self.release_parked(st)
        if inst.slots:
            log.info("%s deactivated (%s)", inst.describe(), new_state.value)
        inst.slots = {}
        inst.state = new_state
        self.close_pending(inst)
        if inst.scope is Scope.WORKER:
            # The instance stops (or its process died): all its workers leave at once, as one
            # instance-scope listener would; each then closes its own, and its queue migrates.
            workers = [w for w in self.registry.workers_of(inst) if w.state.alive]
            for worker in workers:
                self.deactivate(worker, State.DRAINING)
            if workers:
                log.info("%s: its %d worker(s) left the traffic with it (%s)", inst.describe(), len(workers),
                         new_state.value)
        self.sync_head(self.registry.head_of(inst))

    def readopt(self, inst: Instance, req: protocol.Request, socks: list[socket.socket]) -> dict[str, Any]:
        """An instance that outlived a supervisor comes back with its sockets."""
        if inst.role is not None:
            raise ProtocolError("already_registered", f"this connection is already {inst.describe()}")
        assert req.role is not None
        if len(socks) != len(self.addresses):
            raise ProtocolError("address_mismatch", f"sent {len(socks)} sockets; this service has {len(self.addresses)} addresses "
                                "(the supervisor was restarted with other --bind addresses: restart the instance)")
        for address, sock in zip(self.addresses, socks):
            if not is_listening_tcp(sock):
                raise ProtocolError("not_listening", f"the socket sent for {address} is not a listening TCP socket")
            local = sock.getsockname()
            if (local[1] != address.port or sock.family != address.family
                    or ipaddress.ip_address(local[0]) != ipaddress.ip_address(address.host)):
                raise ProtocolError("address_mismatch", f"the socket sent for {address} is bound to {local[0]}:{local[1]}")
        for sock in socks:
            lock_filter(sock)  # a listener handed out by an older version was not locked yet
        role = self.role_of_worker(req) or req.role
        parent_checked = req.parent is None or may_be_child(inst.pid, req.parent)
        cookies = [socket_cookie(s) for s in socks]
        in_place = req.active and all(c in self.states[a].group.slots().values() for a, c in zip(self.addresses, cookies))
        if not in_place:
            # Taking a slot anew, or holding listeners pending, counts as hello does: else a user could
            # collect listeners through hellos, drop the connections, and readopt them all as active (found
            # by the stateful test).  Sockets the kernel kept in their slots are re-adopted whatever the
            # count: refusing them would leave slots no supervisor knows of.
            self.registry.check_quota(inst, role, req.parent, parent_checked)
        inst.role, inst.name, inst.heartbeat, inst.version = role, req.name, req.heartbeat, req.version
        inst.scope, inst.parent, inst.parent_checked = Scope(req.scope), req.parent, parent_checked
        for address, cookie in zip(self.addresses, cookies):
            inst.cookies[address] = cookie
        if req.active:
            found: dict[Address, int] = {}
            for address, sock in zip(self.addresses, socks):
                st = self.states[address]
                cookie = inst.cookies[address]
                slot = next((i for i, c in st.group.slots().items() if c == cookie), None)
                if slot is None:
                    slot = slots.free_slot(self._used(st), req.role, self.swapped, str(address))
                    st.group.set_slot(slot, sock)
                found[address] = slot
            inst.slots, inst.state = found, State.ACTIVE
            # The slot says which role the instance serves now (a promote may have swapped it).
            inst.role = slots.role_of_slot(next(iter(found.values())), self.swapped)
            if any(self.states[a].group.read_config().disabled >> s & 1 for a, s in found.items()):
                inst.state = State.DRAINED  # drained or demoted under the previous supervisor: an operator undrains
            self.start_progress(inst)
            for address in found:
                self.update_live(self.states[address].group)
                self.release_parked(self.states[address])
        else:
            # Not yet ready when the old supervisor went away: keep copies until it is.
            for address, sock in zip(self.addresses, socks):
                inst.pending[address] = socket.socket(fileno=os.dup(sock.fileno()))
            inst.state = State.PENDING
        self.sync_head(inst if inst.scope is Scope.WORKER else self.registry.head_of(inst))
        log.info("re-adopted %s (%s)", inst.describe(), inst.state.value)
        return {"ok": True, "instance": inst.id, "state": inst.state.value,
                "slots": {str(a): s for a, s in inst.slots.items()}}

    def disconnected(self, inst: Instance) -> None:
        """A dropped connection counts as ``stop``; the peer is forgotten even if deactivating fails."""
        if inst not in self.registry:
            return
        try:
            if inst.role is not None:
                log.info("%s disconnected", inst.describe())
            self.deactivate(inst, State.DRAINING)
        finally:
            self.registry.forget(inst)
            self.close_pending(inst)

    @staticmethod
    def close_pending(inst: Instance) -> None:
        for sock in inst.pending.values():
            sock.close()
        inst.pending.clear()

    # -- the program's config -------------------------------------------------------------
    def update_live(self, group: GroupMaps, leaving: frozenset[int] = frozenset()) -> None:
        """Rebuild the program's live-slot table from the slots the kernel holds.

        ``leaving``: slots about to be cleared.  They leave the table first,
        so that no new or migrated connection is sent to a slot just emptied.
        """
        cfg = group.read_config()
        new = slots.live_config(cfg, set(group.slots()) - leaving)
        if new != cfg:
            group.write_config(new)

    @staticmethod
    def edit_config(group: GroupMaps, **changes: int) -> None:
        cfg = group.read_config()
        new = replace(cfg, **changes)
        if new != cfg:
            group.write_config(new)

    def set_disabled(self, group: GroupMaps, which: list[int], on: bool) -> None:
        cfg = group.read_config()
        new = slots.disabled_config(cfg, which, on, group.slots())
        if new != cfg:
            group.write_config(new)

    def disable(self, inst: Instance, state: State) -> None:
        for address, slot in inst.slots.items():
            self.set_disabled(self.states[address].group, [slot], True)
        inst.state = state
        self.sync_head(self.registry.head_of(inst))

    def enable(self, inst: Instance) -> None:
        for address, slot in inst.slots.items():
            self.set_disabled(self.states[address].group, [slot], False)
        inst.state = State.ACTIVE
        self.start_progress(inst)
        self.sync_head(self.registry.head_of(inst))

    # -- parking ----------------------------------------------------------------------------
    def release_parked(self, st: AddressState) -> None:
        """Move what waits on the anchor to a live instance, if there is one.

        While some instance slot is live the anchor is watched: a connection
        that still lands on it (a handshake that began while nothing was
        live) is passed on at once.  With nothing live it is not watched, or
        the loop would spin on a readable anchor.
        """
        live = any(i != PARKING_SLOT for i in st.group.slots())
        self.watch_anchor(st, live)
        if not live:
            return
        q = self.queues().get(socket_cookie(st.anchor))
        if q and q.queued:
            bypassed = st.watch.found_on_anchor(q.queued, anchor_allowance(st.group.counters().values))
            # (Re-)attach right before: without our program, shutdown() resets the queue instead of
            # migrating it (unless net.ipv4.tcp_migrate_req=1), so nothing may run in between.
            st.group.attach(st.anchor)
            requeue(st.anchor, self.backlog)
            self._fill_parking(st.group, st.anchor)
            log.info("%s: handed %d parked connection(s) to the active instance", st.address, q.queued)
            if bypassed:
                self._report_bypass(st, bypassed)

    # -- the program's integrity -----------------------------------------------------------
    def guard_program(self, now: float) -> None:
        """Re-attach our program to every group (idempotent, a few microseconds): whatever detached it,
        it is back within one tick.  Restorations found since the last log line are logged here."""
        for st in self.states.values():
            st.group.attach(st.anchor)
            n = st.watch.take_log_batch(now)
            if n:
                log.warning("%s: our program was found detached from the group %d time(s) (%d connection(s) "
                            "so far reached the port without it, %d restoration(s) in all): a process holding "
                            "one of the group's listeners used SO_DETACH_REUSEPORT_BPF. It was re-attached; "
                            "find the process (docs/security.md, 'Program integrity')", st.address, n,
                            st.watch.bypassed, st.watch.restorations)

    def _report_bypass(self, st: AddressState, bypassed: int) -> None:
        log.debug("%s: %d connection(s) found on the anchor that our program did not send there", st.address, bypassed)
        self.guard_program(time.monotonic())

    # -- health -------------------------------------------------------------------------------
    def start_progress(self, inst: Instance) -> None:
        now = time.monotonic()
        inst.progress = {}
        for address, slot in inst.slots.items():
            hits = self.states[address].group.slot_hits([slot])[slot]
            inst.progress[address] = Progress(hits, 0, now)

    def check_health(self, now: float, complain: Callable[[str], None]) -> None:
        """Demote an active instance that stopped accepting or sending heartbeats; bring back the recovered."""
        watched = [i for i in self.registry if i.state is State.ACTIVE and i.slots]
        demoted = [i for i in self.registry if i.state is State.DEMOTED]
        if not watched and not demoted:
            return
        queues: dict[int, diag.ListenerQueue] | None = {}
        hits: dict[tuple[int, Address], int] = {}
        if self.stall_timeout and watched:
            hits = self._watched_hits(watched)
            queues = None if self._quiet(hits, now) else self._poll_queues(watched, hits, now)
        for inst in watched:
            try:
                reason = health.heartbeat_overdue(inst, now)
                if not reason and (queues or queues is None):  # {}: sock_diag unavailable, no stall check
                    reason = health.stalled(inst, now, self.stall_timeout, self._progress_facts(inst, queues or {}, hits))
                if reason:
                    self.demote(inst, reason, self.queues() if queues is None else queues)
            except Exception:  # one instance's trouble must not stop the checks of the others
                complain(f"health check of {inst.describe()}")
        for inst in demoted:
            try:
                if health.may_recover(inst, now, self.on_hang, self.stall_timeout):
                    log.info("%s recovered; back in service (demoted %d time(s))", inst.describe(), inst.demotions)
                    self.enable(inst)
            except Exception:
                complain(f"recovery check of {inst.describe()}")

    #: the hits of the watched slots at the last sock_diag poll that found every watched queue empty
    #: (None: a queue was not); while they stay the same nothing was selected to those listeners, so
    #: their queues are still empty and the poll, most of an idle supervisor's CPU, is skipped
    _settled: dict[tuple[int, Address], int] | None = None
    _polled_at = float("-inf")

    def _watched_hits(self, watched: list[Instance]) -> dict[tuple[int, Address], int]:
        return {(inst.id, address): self.states[address].group.slot_hits([slot])[slot]
                for inst in watched for address, slot in inst.slots.items()}

    def _quiet(self, hits: dict[tuple[int, Address], int], now: float) -> bool:
        """Whether the queues are known to be still empty.  A connection that reached a listener without
        the program (detached for a moment: guard_program) is not counted in its hits: a full poll every
        QUIET_POLL seconds all the same bounds how long that could go unseen."""
        return self._settled == hits and now - self._polled_at < QUIET_POLL

    def _poll_queues(self, watched: list[Instance], hits: dict[tuple[int, Address], int],
                     now: float) -> dict[int, diag.ListenerQueue]:
        queues = self.queues()
        self._polled_at = now
        empty = all(not (q := queues.get(inst.cookies[address])) or not q.queued
                    for inst in watched for address in inst.slots)
        self._settled = hits if empty and queues else None
        return queues

    def _progress_facts(self, inst: Instance, queues: dict[int, diag.ListenerQueue],
                        hits: dict[tuple[int, Address], int]) -> dict[Address, tuple[int, int]]:
        facts = {}
        for address, slot in inst.slots.items():
            q = queues.get(inst.cookies[address])
            facts[address] = (hits[(inst.id, address)], q.queued if q else 0)
        return facts

    def demote(self, inst: Instance, reason: str, queues: dict[int, diag.ListenerQueue]) -> None:
        self.disable(inst, State.DEMOTED)  # no new connection from here on
        inst.demoted_at = time.monotonic()
        inst.demotions += 1
        inst.demoted_for = reason
        self.demotions_total += 1
        log.warning("%s demoted: %s", inst.describe(), reason)
        for address, slot in inst.slots.items():
            st = self.states[address]
            handover.hand_over_queue(inst, st.group, address, slot, queues.get(inst.cookies[address]), self.backlog)
            self.update_live(st.group)
        if self.on_hang in ("term", "kill"):
            handover.signal_hung(inst, self.on_hang)
