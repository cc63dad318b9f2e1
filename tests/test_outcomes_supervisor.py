"""Outcomes on the supervisor's side: the heartbeat's ``outcomes`` and hello's ``version`` parsed strictly,
kept per instance (a departed worker's counts stay with its instance), shown in ``status``, and a live
supervisor unharmed by every bad report."""

from __future__ import annotations

import json
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.fake_kernel import memory_broker
from reuseport_standby import protocol
from reuseport_standby.client import InstanceClient, app_version, request
from reuseport_standby.errors import ProtocolError
from reuseport_standby.outcomes import BUCKETS, MAX_COUNT, Outcomes
from reuseport_standby.supervisor.broker import Broker
from reuseport_standby.supervisor.registry import Instance
from reuseport_standby.supervisor.view import status

USER = 4242 if os.geteuid() != 4242 else 4243
PIDS = iter(range(2**30 + 20_000, 2**31))

BAD_OUTCOMES = [
    [], "2xx", 7, {"2xx": -1}, {"2xx": 1.5}, {"2xx": True}, {"2xx": "3"},
    {"2xx": MAX_COUNT}, {"7xx": 1}, {"latency": {}}, {"latency": [[0]]}, {"latency": [[0, 1, 2]]},
    {"latency": [[BUCKETS, 1]]}, {"latency": [[-1, 1]]}, {"latency": [[True, 1]]}, {"latency": [["0", 1]]},
    {"latency": [[0, -1]]}, {"latency": [[0, 1]] * (BUCKETS + 1)}, {"latency": "x"},
]


def req(op: str, nfds: int = 0, **fields: object) -> protocol.Request:
    return protocol.parse_request(json.dumps({"v": protocol.VERSION, "op": op, **fields}).encode(), nfds)


@pytest.mark.parametrize("bad", BAD_OUTCOMES, ids=[json.dumps(b)[:40] for b in BAD_OUTCOMES])
def test_bad_outcomes_are_malformed_with_a_reason(bad: object) -> None:
    with pytest.raises(ProtocolError) as exc:
        req("heartbeat", outcomes=bad)
    assert exc.value.code == "malformed"
    assert any(word in str(exc.value) for word in ("outcomes", "count", "bucket")), exc.value


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**60, 2**60) | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["2xx", "5xx", "latency", "exception", "x"]), inner, max_size=4),
                    max_leaves=20))
def test_any_outcomes_either_parse_or_are_malformed(value: object) -> None:
    try:
        parsed = req("heartbeat", outcomes=value)
    except ProtocolError as exc:
        assert exc.code == "malformed"
        return
    if value is not None:
        assert isinstance(parsed.outcomes, Outcomes)
        assert Outcomes.from_wire(parsed.outcomes.to_wire()) == parsed.outcomes


@pytest.mark.parametrize("version, ok", [("1.2.3", True), ("gen7", True), ("v" * 64, True), ("v" * 65, False),
                                         ("", False), ("a b", False), ("é", False), ("x\n", False), (3, False)])
def test_version_is_printable_and_short(version: object, ok: bool) -> None:
    if ok:
        assert req("hello", role="primary", pid=1, version=version).version == version
    else:
        with pytest.raises(ProtocolError, match="'version'"):
            req("hello", role="primary", pid=1, version=version)


def test_version_from_the_environment() -> None:
    assert app_version({"REUSEPORT_STANDBY_VERSION": "2.0", "REUSEPORT_STANDBY_GENERATION": "4"}) == "2.0"
    assert app_version({"REUSEPORT_STANDBY_GENERATION": "4"}) == "gen4"
    assert app_version({}) is None
    assert app_version({"REUSEPORT_STANDBY_VERSION": "bad version"}) is None  # left out, never a refused hello


# -- the broker keeps them --------------------------------------------------------------------------------

@pytest.fixture
def broker():
    with memory_broker("outcomes", addresses=1) as b:
        yield b


def hello(b: Broker, **fields: object) -> Instance:
    inst = b.registry.new(None, next(PIDS), USER)
    _, fds = b.handle(inst, req("hello", role="primary", pid=inst.pid, **fields), [])
    b.held += [socket.socket(fileno=os.dup(fd)) for fd in fds]  # type: ignore[attr-defined]
    return inst


def beat(b: Broker, inst: Instance, ok: int, fail: int = 0) -> None:
    wire = {"2xx": ok, "5xx": fail, "latency": [[3, ok + fail]]} if ok + fail else {}
    b.handle(inst, req("heartbeat", outcomes=wire), [])


def totals(b: Broker, pid: int) -> dict[str, int]:
    """What the canary code computes: the sum over the status entries with pid == P or parent == P."""
    total = Outcomes()
    for entry in status(b)["instances"]:
        if entry["pid"] == pid or entry["parent"] == pid:
            total = total + Outcomes.from_wire(entry["outcomes"])
    return {k: v for k, v in total.counts.items() if v}


def test_status_shows_version_and_cumulative_outcomes(broker: Broker) -> None:
    inst = hello(broker, version="1.4.0")
    broker.handle(inst, req("ready"), [])
    beat(broker, inst, 90, 10)
    beat(broker, inst, 180, 20)  # cumulative: replaces, never adds
    entry = next(e for e in status(broker)["instances"] if e["pid"] == inst.pid)
    assert entry["version"] == "1.4.0"
    assert entry["outcomes"] == {"2xx": 180, "5xx": 20, "latency": [[3, 200]]}
    assert entry["requests"]["requests"] == 200 and entry["requests"]["error_rate"] == 0.1
    broker.handle(inst, req("heartbeat"), [])  # a heartbeat without outcomes changes nothing
    assert totals(broker, inst.pid) == {"2xx": 180, "5xx": 20}


def test_a_departed_workers_counts_stay_with_its_instance(broker: Broker) -> None:
    head = hello(broker, scope="worker", version="gen3")
    workers = [hello(broker, parent=head.pid, version="gen3") for _ in range(3)]
    for i, w in enumerate(workers):
        broker.handle(w, req("ready"), [])
        beat(broker, w, 10 * (i + 1), i)
    before = totals(broker, head.pid)
    assert before == {"2xx": 60, "5xx": 3}
    broker.disconnected(workers[1])  # exits (max_requests, a crash): its counts move to its head
    assert totals(broker, head.pid) == before
    head_entry = next(e for e in status(broker)["instances"] if e["pid"] == head.pid)
    assert head_entry["outcomes"]["2xx"] == 20
    beat(broker, head, 0)  # the head's own (empty) report never wipes what it inherited
    assert totals(broker, head.pid) == before
    stranger = hello(broker, parent=head.pid + 1)  # another instance's worker: not in this sum
    beat(broker, stranger, 5)
    assert totals(broker, head.pid) == before


# -- a live supervisor ---------------------------------------------------------------------------------

def test_live_supervisor_refuses_bad_reports_one_by_one_and_keeps_counting(control_plane) -> None:
    sup = control_plane()
    inst = InstanceClient("primary", sup.service, control=sup.control, reconnect=False)
    inst.version = "9.9"
    for s in inst.open():
        s.close()
    inst.ready()
    conn = inst._conn
    assert conn is not None
    for bad in BAD_OUTCOMES + [{"2xx": 1, "latency": [[0, 1]] * 2000}]:
        raw = json.dumps({"v": 1, "op": "heartbeat", "outcomes": bad}).encode()
        conn.sendmsg([raw])
        conn.settimeout(5)
        data, _, _ = protocol.recv(conn)
        reply = json.loads(data)
        assert reply["ok"] is False and reply["error"] in ("malformed", "too_large"), reply
    reply, _ = request(conn, {"op": "heartbeat", "outcomes": {"2xx": 7, "4xx": 1, "latency": [[5, 8]]}})
    assert reply["ok"] is True
    entry = next(e for e in sup.status()["instances"] if e["pid"] == os.getpid())
    assert entry["version"] == "9.9" and entry["state"] == "active"
    assert entry["requests"]["requests"] == 8 and entry["outcomes"]["4xx"] == 1
    assert sup.proc.poll() is None
    inst.close()


def test_metrics_per_instance_role_and_version(broker: Broker) -> None:
    from prometheus_client.core import CollectorRegistry
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from reuseport_standby.metrics import outcome_metrics

    inst = hello(broker, version="2.1")
    broker.handle(inst, req("ready"), [])
    broker.handle(inst, req("heartbeat", outcomes={"2xx": 5, "5xx": 2, "latency": [[0, 3], [9, 4]]}), [])

    class Collector:
        def collect(self):  # type: ignore[no-untyped-def]
            yield from outcome_metrics("svc", broker.registry)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())  # type: ignore[arg-type]
    samples = [s for fam in text_string_to_metric_families(generate_latest(registry).decode()) for s in fam.samples]
    labels = {"service": "svc", "instance": str(inst.id), "pid": str(inst.pid), "role": "primary", "version": "2.1"}
    counts = {s.labels["kind"]: s.value for s in samples if s.name == "reuseport_standby_requests_total"
              and {k: s.labels[k] for k in labels} == labels}
    assert counts["2xx"] == 5 and counts["5xx"] == 2 and counts["exception"] == 0
    buckets = [(s.labels["le"], s.value) for s in samples if s.name == "reuseport_standby_request_duration_seconds_bucket"]
    assert buckets[0] == ("0.0001", 3.0) and buckets[-1] == ("+Inf", 7.0)
    values = [v for _, v in buckets]
    assert values == sorted(values), "cumulative"
    assert dict(buckets)["0.0004"] == 3.0 and dict(buckets)["0.0008"] == 7.0  # bucket 9 (476 µs) in the next
    assert len(buckets) == 21


def test_status_text_shows_requests_errors_and_p99(broker: Broker) -> None:
    from reuseport_standby.status import render

    head = hello(broker, scope="worker", version="gen2")
    w = hello(broker, parent=head.pid)
    broker.handle(w, req("ready"), [])
    broker.handle(w, req("heartbeat", outcomes={"2xx": 95, "exception": 5, "latency": [[20, 100]]}), [])
    plain = hello(broker)
    text = render({**status(broker), "supervisor": None})
    assert "requests 100, errors 5 (5.00%), p99 3.2 ms; version gen2" in text, text
    assert text.count("requests ") == 1  # an instance that answered nothing and has no version says nothing
    assert plain.pid and f"pid {plain.pid}" in text


def test_a_masters_table_of_worker_reports_never_goes_down_and_stays_bounded() -> None:
    from reuseport_standby.outcomes import Reports

    def o(n: int) -> Outcomes:
        return Outcomes.from_wire({"2xx": n, "latency": [[0, n]]} if n else {})

    reports = Reports(limit=4)
    reports.update(100, o(5), lambda pid: True)
    reports.update(101, o(7), lambda pid: True)
    reports.update(100, o(9), lambda pid: True)  # cumulative: replaces its own last report
    assert reports.total().requests == 16
    reports.update(100, o(2), lambda pid: True)  # lower than before: pid 100 is a new process now
    assert reports.total().requests == 9 + 7 + 2
    alive = {100, 101}
    for pid in range(200, 210):  # ten workers come and go
        reports.update(pid, o(1), lambda p: p in alive or p == pid)
    assert len(reports.by_pid) <= 4 + 1 and reports.total().requests == 18 + 10
