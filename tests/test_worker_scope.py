"""Worker scope (issue 10): every gunicorn / uvicorn worker has listeners of its own.

Real supervisor, real gunicorn and uvicorn, the running kernel, 127.0.0.1
only; every load is bounded in requests and seconds.  Run with ``-s`` to see
the measured figures (they are quoted in docs/benchmarks.md).
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import time
from collections import Counter

from pathlib import Path

import pytest
from conftest import free_port
from helpers.procs import SupervisorProc, stop_process_group, wait_for
from helpers.servers import APPS, BIN, InstanceProc, gunicorn_cmd, restart_traced, worker_pids
from helpers.checks import HELD_BY_WORKERS, check_faults
from helpers.checks import check_traced
from helpers.uvicorn_runs import CONFIGS, Instances

from reuseport_standby import status as status_mod
from reuseport_standby.kernel.layout import WORKERS_PER_INSTANCE
from reuseport_standby.loadgen import Load, LoadResult
from reuseport_standby.kernel.sockets import Address

pytestmark = pytest.mark.kernel

HOST = "127.0.0.1"
CONCURRENCY = 8
SETTLE = 0.4
WORKER_SCOPE = {"REUSEPORT_STANDBY_SCOPE": "worker"}
RECYCLE = ["--workers", "4", "--max-requests", "200", "--max-requests-jitter", "20"]
RECYCLE_SECONDS = 20.0


@pytest.fixture
def app_env(short_tmp: Path) -> dict[str, str]:
    """A 5 ms request (so queues are never empty), and a private directory for gunicorn's control sockets."""
    return {"TEST_APP_REQUEST_DELAY": "0.005", "XDG_RUNTIME_DIR": str(short_tmp)}


def port_of(sup: SupervisorProc) -> int:
    return Address.parse(sup.binds[0]).port


def gunicorn(sup: SupervisorProc, role: str, env: dict[str, str], *args: str, scope: str = "worker",
             app: str = "wsgi_app:app") -> InstanceProc:
    return InstanceProc(gunicorn_cmd(app, "--graceful-timeout", "10", *args), sup, role,
                        env={**env, "REUSEPORT_STANDBY_SCOPE": scope}, cwd=APPS)


def workers_of(sup: SupervisorProc, inst: InstanceProc) -> list[dict]:
    assert inst.proc is not None
    return [i for i in sup.status()["instances"] if i.get("parent") == inst.proc.pid]


def active_workers(sup: SupervisorProc, inst: InstanceProc) -> int:
    return sum(1 for w in workers_of(sup, inst) if w["state"] == "active")


def by_pid(result: LoadResult) -> Counter[int]:
    """Requests answered per worker pid (the test apps answer "ROLE PID ..." or JSON with "pid")."""
    pids: Counter[int] = Counter()
    for r in result.requests:
        if r.kind == "ok" and r.answer:
            m = re.search(r'"pid": (\d+)', r.answer)
            pids[int(m.group(1)) if m else int(r.answer.split()[1])] += 1
    return pids


def cov(counts: list[int]) -> float:
    """Coefficient of variation of the per-worker request counts."""
    return statistics.pstdev(counts) / statistics.mean(counts)


# -- max_requests recycling: the headline ------------------------------------------------------

def test_recycling_loses_nothing_in_worker_scope_but_does_with_gunicorn_reuse_port(
        supervisor, app_env: dict[str, str], short_tmp: Path) -> None:
    """gunicorn sync, 4 workers, max_requests 200 (+ jitter 20), bounded load: dozens of recycles.

    Worker scope: a recycled worker leaves its slot, and its queue migrates to
    a sibling when its listener closes: no request fails.  The same load on
    plain gunicorn ``--reuse-port`` (one socket per worker, no BPF): a worker
    that exits resets its queue.
    """
    sup = supervisor()
    standby = gunicorn(sup, "standby", app_env, "--workers", "2").start().wait_active()
    primary = gunicorn(sup, "primary", app_env, *RECYCLE).start().wait_active()
    wait_for(lambda: active_workers(sup, primary) == 4, 20, what="4 active primary workers")
    before = sup.status()["addresses"][0]["counters"]
    try:
        ours = Load(HOST, port_of(sup), concurrency=CONCURRENCY, duration=RECYCLE_SECONDS, request_ids=True).start().wait()
        after = sup.status()["addresses"][0]["counters"]
    finally:
        primary.stop()
        standby.stop()
    recycles = primary.log().count("Autorestarting worker")
    migrated = after["migrated_primary"] - before["migrated_primary"]
    standby_share = ours.served_by["standby"] / max(1, ours.ok)

    plain_port = free_port()
    log_path = short_tmp / "plain.log"
    with open(log_path, "wb") as log_file:
        plain = subprocess.Popen([str(BIN / "gunicorn"), "--reuse-port", "--bind", f"{HOST}:{plain_port}", *RECYCLE,
                                  "wsgi_app:app"], cwd=APPS, env={**os.environ, **app_env},
                                 stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True)
    try:
        wait_for(lambda: len(worker_pids(plain)) == 4 and _answers(plain_port), 20, what="plain gunicorn up")
        theirs = Load(HOST, plain_port, concurrency=CONCURRENCY, duration=RECYCLE_SECONDS).start().wait()
    finally:
        stop_process_group(plain)
    plain_recycles = log_path.read_text(errors="replace").count("Autorestarting worker")

    print(f"\nworker scope: {recycles} recycles, {migrated} requests migrated to a sibling, "
          f"standby answered {standby_share:.1%}: {ours.summary()}"
          f"\ngunicorn --reuse-port: {plain_recycles} recycles: {theirs.summary()}")
    assert recycles >= 20, f"too few recycles to mean anything: {recycles}"
    assert ours.failed == 0, ours.summary()
    assert migrated > 0, "no queued request was handed to a sibling: the test did not exercise migration"
    assert plain_recycles >= 20, f"too few recycles to mean anything: {plain_recycles}"
    assert theirs.failed > 0, f"plain --reuse-port lost nothing over {plain_recycles} recycles: {theirs.summary()}"
    assert set(theirs.failures) <= {"reset", "eof", "refused"}, theirs.summary()


def _answers(port: int) -> bool:
    from reuseport_standby.loadgen import one_request

    kind, sock = one_request(HOST, port, timeout=2)
    if sock is not None:
        sock.close()
    return kind == "ok"


# -- balance ---------------------------------------------------------------------------------

@pytest.mark.parametrize("server", ["gunicorn-sync", "uvicorn"])
def test_balance_of_worker_and_instance_scope(supervisor, app_env: dict[str, str], instances: Instances,
                                              server: str) -> None:
    """Per-worker share of requests (4 workers, no recycling, 8 clients): CoV in each scope, printed."""
    figures = {}
    for scope in ("instance", "worker"):
        sup = supervisor()
        if server == "gunicorn-sync":
            primary = gunicorn(sup, "primary", app_env, "--workers", "4", scope=scope)
        else:
            primary = instances.uvicorn(sup, "primary", "asgi_role:app", "--workers", "4", "--scope", scope)
        primary.start().wait_active()
        assert primary.proc is not None
        try:
            wait_for(lambda p=primary: len(worker_pids(p.proc)) >= 4, 20, what="4 workers")
            if scope == "worker":
                wait_for(lambda s=sup, p=primary: active_workers(s, p) == 4, 20, what="4 active workers")
            time.sleep(1.5)  # every worker has imported the app and waits
            result = Load(HOST, port_of(sup), concurrency=CONCURRENCY, duration=6, request_ids=True).start().wait()
        finally:
            primary.stop()
        counts = by_pid(result)
        assert result.failed == 0 and len(counts) == 4, (result.summary(), counts)
        shares = sorted(c / result.ok for c in counts.values())
        figures[scope] = cov(list(counts.values()))
        print(f"\n{server}, {scope} scope: {result.ok} requests, shares {', '.join(f'{s:.1%}' for s in shares)}, "
              f"CoV {figures[scope]:.3f}")
    assert figures["worker"] < 0.15, f"worker scope should spread by hash: {figures}"


# -- failover -------------------------------------------------------------------------------

# The stock uvicorn_worker.UvicornWorker by its usual name (our post_worker_init adopts it);
# gevent monkeypatches sockets and threads after post_fork registered the worker.
WORKER_CLASS_ARGS = {
    "sync": [],
    "gthread": ["--worker-class", "gthread", "--threads", "2", "--worker-connections", "2"],
    "uvicorn": ["--worker-class", "uvicorn_worker.UvicornWorker"],
    "gevent": ["--worker-class", "gevent"],
    "asgi": ["--worker-class", "asgi"],
}
# What a SIGKILL may take: gevent and gunicorn's asgi worker accept as many as clients send.
HELD = {**HELD_BY_WORKERS, "gevent": HELD_BY_WORKERS["uvicorn"], "asgi": HELD_BY_WORKERS["uvicorn"]}


@pytest.mark.parametrize("kind", list(WORKER_CLASS_ARGS))
def test_gunicorn_primary_restarts_lose_nothing_in_worker_scope(supervisor, app_env: dict[str, str],
                                                                 kind: str) -> None:
    args = ["--workers", "2", *WORKER_CLASS_ARGS[kind]]
    app = "asgi_app:app" if kind in ("uvicorn", "asgi") else "wsgi_app:app"
    sup = supervisor()
    standby = gunicorn(sup, "standby", app_env, *args, app=app).start().wait_active()
    primary = gunicorn(sup, "primary", app_env, *args, app=app).start().wait_active()
    try:
        report = restart_traced(lambda: gunicorn(sup, "primary", app_env, *args, app=app), primary, host=HOST,
                                port=port_of(sup), schedule=("term", "kill") * 3, concurrency=CONCURRENCY,
                                settle=SETTLE)
    finally:
        standby.stop()
    print(f"\ngunicorn {kind}, worker scope: {report}")
    check_faults(report, HELD[kind])
    assert sum(report.by_kind()["term"]) == 0


def test_uvicorn_primary_restarts_lose_nothing_in_worker_scope(supervisor, instances: Instances) -> None:
    sup = supervisor()
    config = (*CONFIGS["w2"], "--scope", "worker")
    standby = instances.uvicorn(sup, "standby", *config).start().wait_active()
    make_primary = lambda: instances.uvicorn(sup, "primary", *config)
    primary = make_primary().start().wait_active()
    assert primary.proc is not None
    wait_for(lambda: active_workers(sup, primary) == 2, 20, what="2 active uvicorn workers")
    a = Address.parse(sup.binds[0])
    report = restart_traced(make_primary, primary, host=a.host, port=a.port, schedule=("term", "kill") * 3,
                            concurrency=6)
    standby.stop()
    print(f"\nuvicorn --workers 2, worker scope: {report}")
    by_kind = check_traced(report, concurrency=6)
    assert sum(by_kind["term"]) == 0


# -- worker changes: HUP, TTIN/TTOU, uvicorn restarts -----------------------------------------

def test_gunicorn_hup_ttin_ttou_in_worker_scope(supervisor, app_env: dict[str, str]) -> None:
    """HUP (all workers replaced), TTIN (a worker added), TTOU (one removed) under load: nothing fails."""
    sup = supervisor()
    standby = gunicorn(sup, "standby", app_env, "--workers", "2").start().wait_active()
    primary = gunicorn(sup, "primary", app_env, "--workers", "3").start().wait_active()
    assert primary.proc is not None
    wait_for(lambda: active_workers(sup, primary) == 3, 20, what="3 active workers")
    try:
        with Load(HOST, port_of(sup), concurrency=CONCURRENCY, duration=60) as load:
            time.sleep(SETTLE)
            old = set(worker_pids(primary.proc))
            primary.signal(signal.SIGHUP)
            wait_for(lambda: not old & set(worker_pids(primary.proc)) and active_workers(sup, primary) == 3, 20,
                     what="3 new active workers after HUP")
            time.sleep(SETTLE)
            primary.signal(signal.SIGTTIN)
            wait_for(lambda: active_workers(sup, primary) == 4, 20, what="a 4th active worker after TTIN")
            time.sleep(SETTLE)
            text = status_mod.render({"source": "supervisor", **sup.status()})
            primary.signal(signal.SIGTTOU)
            wait_for(lambda: len(worker_pids(primary.proc)) == 3 and active_workers(sup, primary) == 3, 20,
                     what="3 active workers after TTOU")
            time.sleep(SETTLE)
            assert primary.state() == "active"
        result = load.result
    finally:
        primary.stop()
        standby.stop()
    print(f"\nHUP, TTIN, TTOU in worker scope: {result.summary()}\n{text}")
    assert result.failed == 0, result.summary()
    assert "worker scope: 4 of 4 worker(s) active" in text and "[gunicorn worker " in text, text
    assert result.served_by["primary"] > result.served_by["standby"]


def test_uvicorn_worker_restarts_in_worker_scope(supervisor, instances: Instances) -> None:
    """uvicorn's own worker restarts: --limit-max-requests (with jitter) and SIGHUP, under load."""
    sup = supervisor()
    config = (*CONFIGS["w2"], "--scope", "worker")
    standby = instances.uvicorn(sup, "standby", *config).start().wait_active()
    primary = instances.uvicorn(sup, "primary", *config, "--limit-max-requests", "300",
                                "--limit-max-requests-jitter", "60").start().wait_active()
    assert primary.proc is not None
    wait_for(lambda: active_workers(sup, primary) == 2, 20, what="2 active uvicorn workers")
    a = Address.parse(sup.binds[0])
    try:
        with Load(a.host, a.port, concurrency=6, duration=60, request_ids=True) as load:
            time.sleep(3)
            for _ in range(2):
                primary.signal(signal.SIGHUP)
                time.sleep(3)
        result = load.result
        workers_seen = len(by_pid(result))
        wait_for(lambda: primary.state() == "active", 10, what="the primary active again")
    finally:
        primary.stop()
        standby.stop()
    restarts = primary.log().count("Terminated child process") + primary.log().count("died")
    print(f"\nuvicorn worker restarts in worker scope: {workers_seen} worker pids answered, "
          f"{restarts} restarts logged: {result.summary()}")
    assert result.failed == 0, result.summary()
    assert workers_seen > 4, "no worker was replaced"


# -- limits ------------------------------------------------------------------------------------

def test_too_many_workers_is_refused_at_start(supervisor, app_env: dict[str, str], instances: Instances) -> None:
    sup = supervisor()
    too_many = str(WORKERS_PER_INSTANCE + 1)
    g = gunicorn(sup, "primary", app_env, "--workers", too_many).start()
    u = instances.uvicorn(sup, "primary", "asgi_role:app", "--workers", too_many, "--scope", "worker").start()
    assert g.proc is not None and u.proc is not None
    try:
        assert g.proc.wait(30) != 0
        assert u.proc.wait(30) == 2
    finally:
        g.stop()
    assert f"at most {WORKERS_PER_INSTANCE}" in g.log(), g.log()
    assert f"at most {WORKERS_PER_INSTANCE} workers" in u.log(), u.log()
    wait_for(lambda: not sup.status()["instances"], 10, what="the refused instances to be gone")
