"""Outcomes end to end: real gunicorn and uvicorn instances count what their app answered, and the
supervisor's ``status`` shows per instance (the sum over its entry and its workers' entries) exactly what
the clients were sent, within a heartbeat or two.

Real supervisor, real servers, real HTTP over 127.0.0.1; every request count and wait is bounded.
"""

from __future__ import annotations

import http.client
import time
from collections import Counter
from pathlib import Path

import pytest

from helpers.procs import SupervisorProc, wait_for
from helpers.servers import APPS, InstanceProc, gunicorn_cmd, uvicorn_instance, worker_pids
from reuseport_standby.kernel.sockets import Address
from reuseport_standby.outcomes import Outcomes

pytestmark = pytest.mark.kernel

#: what the clients send, and what each path counts as
PLAN = {"/ok": 24, "/fail": 6, "/raise": 4, "/missing": 3}
EXPECTED = {"2xx": 24, "5xx": 6, "exception": 4, "4xx": 3}
VERSION = "e2e-1.0"


def send_plan(sup: SupervisorProc) -> Counter[int]:
    """Every request on a connection of its own (so every worker gets some); the statuses the clients saw."""
    addr = Address.parse(sup.binds[0])
    seen: Counter[int] = Counter()
    for path, n in PLAN.items():
        for _ in range(n):
            conn = http.client.HTTPConnection(addr.host, addr.port, timeout=10)
            try:
                conn.request("GET", path, headers={"Connection": "close"})
                resp = conn.getresponse()
                resp.read()
                seen[resp.status] += 1
            finally:
                conn.close()
    return seen


def instance_total(sup: SupervisorProc, pid: int) -> tuple[dict[str, int], list[dict]]:
    """The canary's view: the sum over the status entries with pid == P or parent == P."""
    entries = [e for e in sup.status()["instances"] if e["pid"] == pid or e["parent"] == pid]
    total = Outcomes()
    for e in entries:
        total = total + Outcomes.from_wire(e["outcomes"])
    return {k: v for k, v in total.counts.items() if v}, entries


def check_counts(sup: SupervisorProc, inst: InstanceProc, serving_entries: int) -> list[dict]:
    assert inst.proc is not None
    seen = send_plan(sup)
    assert seen == Counter({200: 24, 500: 10, 404: 3}), seen  # a raise is answered 500 by the server
    last: list[tuple[dict[str, int], list[dict]]] = []

    def equal() -> bool:
        last[:] = [instance_total(sup, inst.proc.pid)]
        return last[0][0] == EXPECTED

    try:
        wait_for(equal, 15.0, 0.2, what="the instance's outcomes to reach what was sent")
    except TimeoutError:
        raise AssertionError(f"status says {last[0][0] if last else None}, sent {EXPECTED}\n{inst.log()[-3000:]}")
    total, entries = last[0]
    assert all(e["version"] == VERSION for e in entries)
    latency = sum(c for e in entries for _, c in e["outcomes"].get("latency", []))
    assert latency == sum(PLAN.values())
    assert len([e for e in entries if e["outcomes"]]) >= serving_entries, entries
    # stable: a further heartbeat adds nothing
    time.sleep(1.5)
    assert instance_total(sup, inst.proc.pid)[0] == EXPECTED
    return entries


GUNICORN = {
    "sync, instance scope": ("sync", "instance"),
    "sync, worker scope": ("sync", "worker"),
    "gthread": ("gthread", "instance"),
    "gevent": ("gevent", "instance"),
    "asgi": ("asgi", "instance"),
    "uvicorn_worker": ("uvicorn_worker.UvicornWorker", "instance"),
}


@pytest.mark.parametrize("kind", list(GUNICORN))
def test_gunicorn_counts_what_it_answered(supervisor, short_tmp: Path, kind: str) -> None:
    """Every worker class serves the app our hook wrapped; two workers' counts add up in the instance."""
    worker_class, scope = GUNICORN[kind]
    sup = supervisor()
    app = "outcomes_app:app" if worker_class in ("sync", "gthread", "gevent") else "outcomes_app:asgi"
    inst = InstanceProc(gunicorn_cmd(app, "--workers", "2", "--worker-class", worker_class, "--graceful-timeout", "5"),
                        sup, "primary", cwd=APPS,
                        env={"REUSEPORT_STANDBY_SCOPE": scope, "REUSEPORT_STANDBY_VERSION": VERSION,
                             "XDG_RUNTIME_DIR": str(short_tmp)})
    try:
        inst.start().wait_active()
        assert inst.proc is not None
        wait_for(lambda: len(worker_pids(inst.proc)) == 2, 15, what="two workers")
        entries = check_counts(sup, inst, serving_entries=2 if scope == "worker" else 1)
        if scope == "worker":
            assert {e["parent"] for e in entries} == {None, inst.proc.pid}
    finally:
        inst.stop()


UVICORN = {"standalone": (), "workers 2": ("--workers", "2"), "workers 2, worker scope": ("--workers", "2", "--scope", "worker")}


@pytest.mark.parametrize("kind", list(UVICORN))
def test_uvicorn_counts_what_it_answered(supervisor, instances, kind: str) -> None:
    sup = supervisor()
    inst = instances.track(uvicorn_instance(sup, "primary", "outcomes_app:asgi", "--no-access-log", *UVICORN[kind],
                                            env={"REUSEPORT_STANDBY_VERSION": VERSION}))
    inst.start().wait_active()
    if UVICORN[kind]:
        assert inst.proc is not None
        wait_for(lambda: len(worker_pids(inst.proc)) >= 2, 15, what="two workers")
    check_counts(sup, inst, serving_entries=2 if "worker scope" in kind else 1)
    inst.stop()


def test_gunicorn_instance_keeps_a_killed_workers_counts(supervisor, short_tmp: Path) -> None:
    """Instance scope: a worker that dies keeps its counts in the master's sum (it never goes down)."""
    import os
    import signal

    sup = supervisor()
    inst = InstanceProc(gunicorn_cmd("outcomes_app:app", "--workers", "2"), sup, "primary", cwd=APPS,
                        env={"REUSEPORT_STANDBY_VERSION": VERSION, "XDG_RUNTIME_DIR": str(short_tmp)})
    try:
        inst.start().wait_active()
        assert inst.proc is not None
        check_counts(sup, inst, serving_entries=1)
        killed = set(worker_pids(inst.proc))
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: len(worker_pids(inst.proc)) == 2 and not set(worker_pids(inst.proc)) & killed, 15,
                 what="replacement workers")
        time.sleep(2.5)  # a few heartbeats of the master with fresh workers
        assert instance_total(sup, inst.proc.pid)[0] == EXPECTED
    finally:
        inst.stop()
