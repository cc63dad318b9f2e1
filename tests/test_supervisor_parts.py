"""The supervisor's parts one by one, without root: slot arithmetic, health decisions, the options
object, and scenarios of the broker against the in-memory maps."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import pytest

from conftest import free_port
from helpers.fake_kernel import FakeKernel, memory_broker
from reuseport_standby import cli, protocol
from reuseport_standby.errors import ProtocolError, SlotsFull
from reuseport_standby.kernel.layout import Config, Role
from reuseport_standby.kernel.sockets import Address, socket_cookie
from reuseport_standby.names import Scope, State
from reuseport_standby.supervisor import health, slots
from reuseport_standby.supervisor.broker import Broker
from reuseport_standby.supervisor.options import SuperviseOptions
from reuseport_standby.supervisor.registry import Instance, Progress

USER = 4242 if os.geteuid() != 4242 else 4243  # a uid no quota exempts (not root, not ours)
PIDS = iter(range(2**30 + 10_000, 2**31))


def req(op: str, nfds: int = 0, **fields: object) -> protocol.Request:
    return protocol.parse_request(json.dumps({"v": protocol.VERSION, "op": op, **fields}).encode(), nfds)


# -- slot arithmetic -----------------------------------------------------------------------------------

def test_a_promote_swaps_the_ranges() -> None:
    assert slots.role_range(Role.PRIMARY, False) == range(0, 32)
    assert slots.role_range(Role.PRIMARY, True) == range(32, 64)
    assert slots.role_of_slot(40, swapped=True) is Role.PRIMARY


def test_free_slot_skips_taken_and_says_what_to_do_when_full() -> None:
    assert slots.free_slot({0, 1, 3}, Role.PRIMARY, False) == 2
    with pytest.raises(SlotsFull, match="stop an old standby instance first"):
        slots.free_slot(set(range(32, 64)), Role.STANDBY, False, "127.0.0.1:8000")


def test_live_config_drops_the_disabled_mark_of_an_emptied_slot() -> None:
    cfg = Config(disabled=(1 << 2) | (1 << 5))
    new = slots.live_config(cfg, {0, 2, 33})
    assert new.disabled == 1 << 2, "slot 5 was emptied by the kernel: its mark must not outlive it"
    assert new.live == ((0,), (33,))


def test_disabled_config_leaves_the_slot_out_of_the_table() -> None:
    cfg = slots.disabled_config(Config(), [1], True, {0, 1, 2})
    assert cfg.live[0] == (0, 2)
    assert slots.disabled_config(cfg, [1], False, {0, 1, 2}).live[0] == (0, 1, 2)


# -- health ------------------------------------------------------------------------------------------------

def _inst(**kw: object) -> Instance:
    return Instance(id=1, conn=None, pid=1, uid=0, **kw)  # type: ignore[arg-type]


def test_heartbeat_overdue_after_three_intervals_and_at_least_a_second() -> None:
    inst = _inst(heartbeat=0.1, last_heartbeat=100.0)
    assert health.heartbeat_overdue(inst, 100.9) == ""
    assert "no heartbeat for 1.1 s" in health.heartbeat_overdue(inst, 101.1)
    assert health.heartbeat_overdue(_inst(heartbeat=None, last_heartbeat=0.0), 1e6) == ""


def test_stalled_only_when_connections_wait_and_none_is_accepted() -> None:
    a = Address("127.0.0.1", 8000)
    inst = _inst(progress={a: Progress(hits=10, queued=0, last=0.0)})
    assert health.stalled(inst, 1.0, 2.0, {a: (10, 5)}) == ""       # 5 waiting since now
    assert health.stalled(inst, 2.5, 2.0, {a: (12, 5)}) == ""       # 2 new hits, queue same: 2 accepted
    assert "waited 2.0 s" in health.stalled(inst, 4.5, 2.0, {a: (12, 5)})
    assert health.stalled(inst, 9.0, 0.0, {a: (12, 5)}) == "", "0 turns stall detection off"


def test_recovery_waits_longer_after_each_demotion_and_needs_a_heartbeat() -> None:
    assert [health.recovery_cooldown(n, 2.0) for n in (1, 2, 3, 10)] == [2.0, 4.0, 8.0, 60.0]
    inst = _inst(heartbeat=1.0, demoted_at=100.0, demotions=1, last_heartbeat=99.0)
    assert not health.may_recover(inst, 103.0, "demote", 2.0), "silent since the demotion"
    inst.last_heartbeat = 101.0
    assert health.may_recover(inst, 103.0, "demote", 2.0)
    assert not health.may_recover(inst, 103.0, "kill", 2.0)


# -- the options object --------------------------------------------------------------------------------------

def test_options_round_trip_through_the_command_line() -> None:
    """``supervise``'s parser and SuperviseOptions.argv agree on every flag."""
    opts = SuperviseOptions(service="web", binds=("127.0.0.1:8000", "[::1]:8000"), control="/tmp/x.sock",
                            backlog=64, group="nogroup", pin_root="/sys/fs/bpf/x", migrate=False, mount_bpffs=True,
                            stall_timeout=0.5, on_hang="kill", loader="bcc", bpf_source="/tmp/v.c",
                            max_connections_per_uid=9, metrics=Address("127.0.0.1", 9100))
    args = cli.build_parser().parse_args(opts.argv())
    assert SuperviseOptions.from_args(args) == opts
    assert SuperviseOptions(service="web", binds=("127.0.0.1:8000",)).argv() == [
        "supervise", "--service", "web", "--bind", "127.0.0.1:8000"], "defaults are left out"
    assert opts.command()[:3] == [sys.executable, "-m", "reuseport_standby"]


@pytest.mark.parametrize("change, message", [
    ({"binds": ()}, "at least one --bind"),
    ({"binds": ("127.0.0.1:1", "127.0.0.1:1")}, "twice"),
    ({"on_hang": "explode"}, "--on-hang"),
    ({"stall_timeout": -1}, "--stall-timeout"),
    ({"max_connections_per_uid": 0}, "--max-connections-per-uid"),
    ({"bpf_source": "/x.c"}, "--loader bcc"),
    ({"service": "a.b"}, "bad service name"),
])
def test_options_refuse_what_cannot_work(change: dict, message: str) -> None:
    base = {"service": "web", "binds": ("127.0.0.1:8000",)}
    with pytest.raises(ValueError, match=message):
        SuperviseOptions(**{**base, **change}).check()


# -- broker scenarios against the in-memory maps -------------------------------------------------------------

@pytest.fixture
def broker():
    with memory_broker("parts", addresses=2) as b:
        yield b


def hello(b: Broker, role: str = "primary", uid: int = USER, **fields: object) -> Instance:
    inst = b.registry.new(None, next(PIDS), uid)
    _, fds = b.handle(inst, req("hello", role=role, pid=inst.pid, **fields), [])
    b.held += [socket.socket(fileno=os.dup(fd)) for fd in fds]  # type: ignore[attr-defined]
    return inst


def test_readopt_keeps_the_per_user_quota(broker: Broker) -> None:
    """Listeners collected through hellos and readopted as active must not take more slots than hello may."""
    kept: list[list[socket.socket]] = []
    for _ in range(3):
        inst = hello(broker)
        kept.append(broker.held[-2:])  # type: ignore[attr-defined]
        broker.disconnected(inst)  # drop it: hello's quota frees, the listeners stay with the peer
    results = []
    for socks in kept:
        inst = broker.registry.new(None, next(PIDS), USER)
        try:
            broker.handle(inst, req("readopt", 2, role="primary", pid=inst.pid, active=True), socks)
            results.append(inst.state.value)
        except ProtocolError as exc:
            results.append(exc.code)
            broker.disconnected(inst)
    assert results == ["active", "active", "quota"]
    assert len([s for s in next(iter(broker.states.values())).group.slots() if s < 32]) == 2


def test_a_stopping_instance_takes_all_its_workers_out(broker: Broker) -> None:
    head = hello(broker, scope="worker")
    workers = [hello(broker, parent=head.pid) for _ in range(5)]
    for w in workers:
        broker.handle(w, req("ready"), [])
    assert head.state is State.ACTIVE and all(w.state is State.ACTIVE for w in workers)
    assert {len(st.group.slots()) for st in broker.states.values()} == {6}  # 5 workers + parking
    broker.handle(head, req("stop"), [])
    assert all(w.state is State.DRAINING and not w.slots for w in workers)
    assert {len(st.group.slots()) for st in broker.states.values()} == {1}
    assert all(st.group.read_config().live == ((), ()) for st in broker.states.values())


def test_a_worker_of_a_drained_instance_joins_drained(broker: Broker) -> None:
    root = broker.registry.new(None, 1, 0)
    head = hello(broker, scope="worker")
    first = hello(broker, parent=head.pid)
    broker.handle(first, req("ready"), [])
    broker.handle(root, req("drain", role="primary"), [])
    later = hello(broker, parent=head.pid)
    broker.handle(later, req("ready"), [])
    assert later.state is State.DRAINED
    assert all(st.group.read_config().live[0] == () for st in broker.states.values())


def test_drain_by_pid_takes_out_that_instance_and_its_workers_only(broker: Broker) -> None:
    """A canary reload drains the old standby while the new one, same role, takes the standby's share."""
    root = broker.registry.new(None, 1, 0)
    old = hello(broker, role="standby", scope="worker")
    old_workers = [hello(broker, role="standby", parent=old.pid) for _ in range(2)]
    new = hello(broker, role="standby")
    for inst in (*old_workers, new):
        broker.handle(inst, req("ready"), [])
    broker.handle(root, req("drain", role="standby", pid=old.pid), [])
    assert all(w.state is State.DRAINED for w in old_workers) and new.state is State.ACTIVE
    new_slots = set(new.slots.values())
    assert all(set(st.group.read_config().live[1]) == new_slots for st in broker.states.values())
    with pytest.raises(ProtocolError, match=f"no active standby instance with pid {old.pid} to drain"):
        broker.handle(root, req("drain", role="standby", pid=old.pid), [])
    broker.handle(root, req("undrain", role="standby", pid=old.pid), [])
    assert all(w.state is State.ACTIVE for w in old_workers)
    assert all(len(st.group.read_config().live[1]) == 3 for st in broker.states.values())
    with pytest.raises(ProtocolError, match="pid must be a positive integer"):
        req("drain", role="standby", pid="1")


def test_slots_full_is_refused_at_hello_with_what_to_do(broker: Broker) -> None:
    for _ in range(32):
        broker.handle(hello(broker, uid=0), req("ready"), [])
    inst = broker.registry.new(None, next(PIDS), 0)
    with pytest.raises(SlotsFull, match="stop an old primary instance first"):
        broker.handle(inst, req("hello", role="primary", pid=inst.pid), [])


def test_status_of_two_addresses_and_sixteen_workers_is_one_document(broker: Broker) -> None:
    root = broker.registry.new(None, 1, 0)
    for role in ("primary", "standby"):
        head = hello(broker, role=role, uid=0, scope="worker", name="h" * 128)
        for _ in range(16):
            broker.handle(hello(broker, role=role, uid=0, parent=head.pid, name="w" * 128), req("ready"), [])
    t0 = time.perf_counter()
    reply, _ = broker.handle(root, req("status"), [])
    frames = protocol.frames(reply, [])
    print(f"\nstatus of 2 addresses x 34 instances: {len(json.dumps(reply))} bytes, {len(frames)} frame(s), "
          f"{(time.perf_counter() - t0) * 1e3:.1f} ms")
    assert len(reply["status"]["instances"]) == 34
    assert all(st["slots"] for st in reply["status"]["addresses"])
    assert len(frames) > 1 and all(len(data) <= protocol.MAX_MESSAGE for data, _ in frames)
    assert all(i["scope"] in (Scope.INSTANCE.value, Scope.WORKER.value) for i in reply["status"]["instances"])


def test_sockets_the_kernel_kept_in_slots_are_readopted_whatever_the_quota(broker: Broker) -> None:
    """After a supervisor restart, refusing an instance whose socket is still in its slot would leave
    a slot nobody manages; the quota applies to slots taken anew (found by the stateful test)."""
    serving = []
    for _ in range(2):
        broker.handle(hello(broker), req("ready"), [])
        serving.append(broker.held[-2:])  # type: ignore[attr-defined]
    groups = {a: st.group for a, st in broker.states.items()}
    for st in broker.states.values():  # the supervisor dies: its anchors close, the kernel keeps the rest
        st.group.socket_closed(socket_cookie(st.anchor))  # type: ignore[attr-defined]
        st.anchor.close()
    broker.states.clear()
    restarted = Broker("parts", broker.addresses, backlog=16, open_group=groups.__getitem__, queues=dict,
                       stall_timeout=0)
    restarted.open()
    restarted.held = broker.held  # type: ignore[attr-defined]
    try:
        hello(restarted)
        hello(restarted)  # two new instances of that user came first: its quota is used up
        for socks in serving:
            inst = restarted.registry.new(None, next(PIDS), USER)
            restarted.handle(inst, req("readopt", 2, role="primary", pid=inst.pid, active=True), socks)
            assert inst.state is State.ACTIVE
        for a, st in restarted.states.items():
            owned = {i.cookies[a] for i in restarted.registry if a in i.slots}
            assert {c for slot, c in st.group.slots().items() if slot != 64} == owned, "a slot nobody owns"
    finally:
        for inst in restarted.registry:
            restarted.close_pending(inst)
        restarted.close()


def test_an_idle_service_polls_its_queues_once_a_second_and_a_hang_is_caught_as_fast() -> None:
    """sock_diag is most of an idle supervisor's CPU: while no connection is selected to an active
    listener its queue stays empty, so it is polled once per QUIET_POLL, not every tick.  The first
    connection is seen at the next tick all the same, and a hang demoted stall_timeout after it."""
    from reuseport_standby.kernel.diag import ListenerQueue
    from reuseport_standby.supervisor.broker import QUIET_POLL

    address = Address("127.0.0.1", free_port())
    kernel = FakeKernel()
    depth: dict[int, int] = {}
    polls: list[float] = []
    clock = [0.0]

    def queues() -> dict[int, ListenerQueue]:
        polls.append(clock[0])
        return {c: ListenerQueue(cookie=c, family=2, port=address.port, queued=q, backlog=16, uid=0)
                for c, q in depth.items()}

    b = Broker("idle", [address], backlog=16, open_group=kernel.open_group, queues=queues, stall_timeout=2.0)
    b.open()
    held: list[socket.socket] = []
    try:
        inst = b.registry.new(None, next(PIDS), USER)
        _, fds = b.handle(inst, req("hello", role="primary", pid=inst.pid), [])
        held += [socket.socket(fileno=os.dup(fd)) for fd in fds]
        b.handle(inst, req("ready"), [])
        assert inst.state is State.ACTIVE
        cookie, slot, group = inst.cookies[address], inst.slots[address], kernel.groups[address]
        depth[cookie] = 0
        polls.clear()

        def tick(until: float) -> None:
            while clock[0] < until - 1e-9:
                clock[0] = round(clock[0] + 0.1, 1)
                b.check_health(clock[0], lambda what: None)

        tick(5.0)  # idle: 50 ticks
        assert len(polls) <= 5.0 / QUIET_POLL + 1, polls
        # Traffic: a connection is selected every tick and accepted at once; every tick polls.
        before = len(polls)
        for _ in range(10):
            group.hits[slot] = group.hits.get(slot, 0) + 1
            tick(clock[0] + 0.1)
        assert len(polls) - before == 10
        # The instance hangs: 3 connections selected at 6.0 s, queued, never accepted.
        tick(6.0)
        group.hits[slot] += 3
        depth[cookie] = 3
        tick(7.9)
        assert inst.state is State.ACTIVE
        tick(8.2)
        assert inst.state is State.DEMOTED and "waited 2.0 s" in (inst.demoted_for or ""), inst.demoted_for
    finally:
        for s in held:
            s.close()
        b.close()
