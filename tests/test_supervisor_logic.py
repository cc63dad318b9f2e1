"""The supervisor's state machine, without root: random sequences of what instances, workers and
operators do, against an in-memory stand-in for the BPF maps, with the invariants checked after
every step.  The kernel tests and the end-to-end tests prove the edge; this proves the logic."""

from __future__ import annotations

import itertools
import json
import os
import socket
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from conftest import free_port
from helpers.fake_kernel import FakeKernel
from reuseport_standby import protocol
from reuseport_standby.errors import ProtocolError, ReuseportStandbyError
from reuseport_standby.kernel.layout import PARKING_SLOT, slot_range
from reuseport_standby.kernel.sockets import Address, socket_cookie
from reuseport_standby.names import Role, Scope, State
from reuseport_standby.supervisor.broker import Broker
from reuseport_standby.supervisor.registry import INSTANCES_PER_ROLE_PER_UID, Instance
from reuseport_standby.supervisor.slots import role_range

USER = 4242 if os.geteuid() != 4242 else 4243  # a uid no quota exempts (not root, not ours)
FAKE_PIDS = itertools.count(2**30)  # above any pid_max: /proc never has them


def request(op: str, nfds: int = 0, **fields: object) -> protocol.Request:
    """Through the real parser, as a peer's bytes would go."""
    return protocol.parse_request(json.dumps({"v": protocol.VERSION, "op": op, **fields}).encode(), nfds)


@dataclass(eq=False)
class Proc:
    """A modelled instance process: its pid, its copies of the listeners, what its client believes."""

    pid: int
    uid: int
    role: Role
    scope: Scope
    parent: "Proc | None" = None
    inst: Instance | None = None
    socks: list[socket.socket] = field(default_factory=list)
    believes_active: bool = False
    stopped: bool = False  # its client said stop: it never re-announces itself


class SupervisorLogic(RuleBasedStateMachine):
    procs = Bundle("procs")

    def __init__(self) -> None:
        super().__init__()
        port = free_port()
        self.addresses = [Address("127.0.0.1", port), Address("127.0.0.1", free_port())]
        self.kernel = FakeKernel()
        self.broker = self._new_broker()
        self.alive: list[Proc] = []
        self.operator = self.broker.registry.new(None, 1, 0)

    def _new_broker(self) -> Broker:
        broker = Broker("logic", self.addresses, backlog=16, open_group=self.kernel.open_group, queues=dict,
                        stall_timeout=0)
        broker.open()
        return broker

    def _send(self, proc: Proc, op: str, socks: list[socket.socket] | None = None, **fields: object) -> dict | None:
        assert proc.inst is not None
        try:
            reply, fds = self.broker.handle(proc.inst, request(op, len(socks or []), **fields), socks or [])
        except (ProtocolError, ReuseportStandbyError):
            return None
        if fds:
            proc.socks = [socket.socket(fileno=os.dup(fd)) for fd in fds]  # what SCM_RIGHTS gives the instance
        return reply

    def _check_quota_after_admission(self, proc: Proc) -> None:
        """A non-root user was just let in as a new holder of its role: at most two such per role."""
        reg = self.broker.registry
        assert proc.inst is not None
        if proc.uid == 0 or (proc.parent is not None and reg.head_of(proc.inst) is not None):
            return
        held = [i for i in reg if i.uid == proc.uid and i.role is proc.inst.role and i.state.alive
                and (i.parent is None or reg.head_of(i) is None)]
        assert len(held) <= INSTANCES_PER_ROLE_PER_UID, [i.describe() for i in held]

    def _hello(self, proc: Proc) -> bool:
        proc.inst = self.broker.registry.new(None, proc.pid, proc.uid)
        fields = {"role": proc.role.value, "pid": proc.pid, "scope": proc.scope.value}
        if proc.parent is not None:
            fields["parent"] = proc.parent.pid
        if self._send(proc, "hello", **fields) is None:
            self.broker.disconnected(proc.inst)
            proc.inst = None
            return False
        proc.role = proc.inst.role  # a worker serves its instance's role
        self._check_quota_after_admission(proc)
        return True

    # -- what instances do -------------------------------------------------------------------------
    @rule(target=procs, role=st.sampled_from(Role), scope=st.sampled_from(Scope), uid=st.sampled_from([0, USER]))
    def start_instance(self, role: Role, scope: Scope, uid: int):
        proc = Proc(next(FAKE_PIDS), uid, role, scope)
        if not self._hello(proc):
            return consumes_nothing()
        self.alive.append(proc)
        return proc

    @rule(target=procs, role=st.sampled_from(Role), uid=st.sampled_from([0, USER]))
    def start_serving_instance(self, role: Role, uid: int):
        """The common case: hello, then ready at once."""
        proc = Proc(next(FAKE_PIDS), uid, role, Scope.INSTANCE)
        if not self._hello(proc):
            return consumes_nothing()
        self.alive.append(proc)
        self.ready(proc)
        return proc

    @precondition(lambda self: any(p.scope is Scope.WORKER and p.inst for p in self.alive))
    @rule(target=procs, data=st.data(), ready=st.booleans())
    def start_worker(self, data: st.DataObject, ready: bool):
        head = data.draw(st.sampled_from([p for p in self.alive if p.scope is Scope.WORKER and p.inst]))
        proc = Proc(next(FAKE_PIDS), head.uid, head.role, Scope.INSTANCE, parent=head)
        if not self._hello(proc):
            return consumes_nothing()
        self.alive.append(proc)
        if ready:
            self.ready(proc)
        return proc

    @rule(proc=procs)
    def ready(self, proc: Proc) -> None:
        if proc.inst is not None and proc.scope is Scope.INSTANCE:
            reply = self._send(proc, "ready")
            if reply is not None:
                proc.believes_active = True

    @rule(proc=procs)
    def stop(self, proc: Proc) -> None:
        if proc.inst is not None:
            self._send(proc, "stop")
            proc.believes_active, proc.stopped = False, True

    @rule(proc=procs)
    def heartbeat(self, proc: Proc) -> None:
        if proc.inst is not None:
            self._send(proc, "heartbeat")

    @rule(proc=procs)
    def connection_drops(self, proc: Proc) -> None:
        """The control connection breaks; the process lives on with its sockets (it will readopt)."""
        if proc.inst is not None:
            self.broker.disconnected(proc.inst)
            proc.inst = None

    @rule(proc=procs)
    def reconnects(self, proc: Proc) -> None:
        if proc.inst is None and proc in self.alive and proc.socks and not proc.stopped:
            proc.inst = self.broker.registry.new(None, proc.pid, proc.uid)
            fields = {"role": proc.role.value, "pid": proc.pid, "scope": proc.scope.value,
                      "active": proc.believes_active}
            in_place = proc.believes_active and all(
                socket_cookie(s) in st_.group.slots().values() for s, st_ in zip(proc.socks, self.broker.states.values()))
            if proc.parent is not None:
                fields["parent"] = proc.parent.pid
            if self._send(proc, "readopt", socks=proc.socks, **fields) is None:
                self.broker.disconnected(proc.inst)
                proc.inst = None
            else:
                proc.role = proc.inst.role
                if not in_place:
                    self._check_quota_after_admission(proc)

    @rule(proc=consumes(procs))
    def process_exits(self, proc: Proc) -> None:
        """Its control connection ends, and its sockets close: the kernel empties their slots."""
        if proc.inst is not None:
            self.broker.disconnected(proc.inst)
            proc.inst = None
        for s in proc.socks:
            cookie = socket_cookie(s)
            s.close()
            self.kernel.socket_closed(cookie)
        proc.socks = []
        if proc in self.alive:
            self.alive.remove(proc)

    # -- what operators and crashes do -----------------------------------------------------------------
    @rule(op=st.sampled_from(["drain", "undrain"]), role=st.sampled_from(Role))
    def operator_drain(self, op: str, role: Role) -> None:
        try:
            self.broker.handle(self.operator, request(op, role=role.value), [])
        except ProtocolError as exc:
            assert exc.code == "no_instance"

    @rule()
    def operator_promote(self) -> None:
        try:
            self.broker.handle(self.operator, request("promote"), [])
        except ProtocolError as exc:
            assert exc.code == "no_instance"
            return
        for p in self.alive:
            p.role = p.role.other

    @rule(weight=st.integers(0, 100))
    def operator_weight(self, weight: int) -> None:
        self.broker.handle(self.operator, request("weight", standby=weight), [])
        assert all(g.read_config().standby_weight == weight for g in self.kernel.groups.values())

    @rule()
    def supervisor_restarts(self) -> None:
        """The supervisor dies (its peers' connections with it); a new one re-opens the pins and the
        instances come back with their sockets."""
        for st_ in self.broker.states.values():
            cookie = socket_cookie(st_.anchor)
            st_.anchor.close()
            self.kernel.socket_closed(cookie)
        for p in self.alive:
            if p.inst is not None:
                self.broker.close_pending(p.inst)
            p.inst = None
        self.broker = self._new_broker()
        self.operator = self.broker.registry.new(None, 1, 0)
        for p in sorted(self.alive, key=lambda p: p.parent is not None):  # instances before their workers
            self.reconnects(p)

    @rule()
    def status_is_json(self) -> None:
        reply, _ = self.broker.handle(self.operator, request("status"), [])
        assert json.loads(json.dumps(reply))["status"]["service"] == "logic"

    # -- invariants ---------------------------------------------------------------------------------
    @invariant()
    def slots_hold_exactly_the_sockets_of_serving_instances(self) -> None:
        b = self.broker
        for address, st_ in b.states.items():
            slots = st_.group.slots()
            assert slots.get(PARKING_SLOT) == socket_cookie(st_.anchor), "the parking slot holds the anchor"
            owners = {i.cookies[address]: i for i in b.registry if address in i.slots}
            for slot, cookie in slots.items():
                if slot == PARKING_SLOT:
                    continue
                inst = owners.get(cookie)
                assert inst is not None, f"slot {slot} of {address} holds a socket no instance owns"
                assert inst.slots[address] == slot
                assert inst.state in (State.ACTIVE, State.DRAINED, State.DEMOTED), inst
                assert slot in role_range(inst.role, b.swapped), f"{inst.describe()} in a slot of the other role"
            for inst in b.registry:
                if address in inst.slots:
                    assert slots.get(inst.slots[address]) == inst.cookies[address], f"{inst.describe()} lost its slot"

    @invariant()
    def the_program_sends_connections_only_to_enabled_live_slots(self) -> None:
        b = self.broker
        for address, st_ in b.states.items():
            cfg = st_.group.read_config()
            slots = st_.group.slots()
            assert cfg.swapped == b.swapped
            for r in (0, 1):
                want = tuple(i for i in slot_range(r) if i in slots and not cfg.disabled >> i & 1)
                assert tuple(cfg.live[r]) == want, f"live table {cfg.live[r]} != {want}"
            owner_state = {inst.slots[address]: inst.state for inst in b.registry if address in inst.slots}
            for i in range(64):
                disabled = bool(cfg.disabled >> i & 1)
                assert not disabled or i in slots, f"slot {i} is empty but marked disabled"
                if i in owner_state:
                    assert disabled == owner_state[i].disabled, f"slot {i}: disabled={disabled}, owner {owner_state[i]}"

    @invariant()
    def instances_are_whole(self) -> None:
        for inst in self.broker.registry:
            if inst.state is State.ACTIVE and inst.scope is Scope.INSTANCE:
                assert set(inst.slots) == set(self.addresses), f"{inst.describe()} active without all its slots"
            if inst.state is State.DRAINING:
                assert not inst.slots and not inst.pending

    @invariant()
    def workers_follow_their_instance(self) -> None:
        reg = self.broker.registry
        for head in [i for i in reg if i.is_head and i.scope is Scope.WORKER]:
            workers = reg.workers_of(head)
            for w in workers:
                assert w.role is head.role, f"{w.describe()} serves another role than {head.describe()}"
                if head.state is State.DRAINING:
                    assert w.state is State.DRAINING or not w.slots, f"{w.describe()} serves for a stopped instance"
            if head.state in (State.PENDING, State.ACTIVE):
                serving = any(w.state is State.ACTIVE for w in workers)
                assert (head.state is State.ACTIVE) == serving, f"{head.describe()} is {head.state} with workers {workers}"

    def teardown(self) -> None:
        for p in self.alive:
            for s in p.socks:
                s.close()
        for p in self.alive:
            if p.inst is not None:
                self.broker.close_pending(p.inst)
        self.broker.close()


def consumes_nothing():
    """A rule with a target that did nothing: hypothesis takes ``multiple()`` as "no new value"."""
    from hypothesis.stateful import multiple

    return multiple()


SupervisorLogic.TestCase.settings = settings(max_examples=80, stateful_step_count=50, deadline=None,
                                             suppress_health_check=[HealthCheck.too_slow])
test_supervisor_logic = SupervisorLogic.TestCase


def test_the_stand_in_refuses_what_the_kernel_refuses() -> None:
    """BPF_NOEXIST and cookie-guarded clears: the fake must not be kinder than the kernel."""
    from helpers.fake_kernel import FakeGroup

    g = FakeGroup()
    with socket.socket() as a, socket.socket() as b:
        g.set_slot(3, a)
        with pytest.raises(OSError):
            g.set_slot(3, b)
        assert not g.clear_slot(3, socket_cookie(b))
        assert g.clear_slot(3, socket_cookie(a))
        assert g.slots() == {}
