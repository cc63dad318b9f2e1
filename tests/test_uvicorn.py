"""``reuseport-standby uvicorn``: real uvicorn processes, a real supervisor, the running kernel.

Every client is on 127.0.0.1; every load is bounded in requests and seconds.
Run with ``-s`` to see the measured figures of each run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers.checks import check_traced
from helpers.procs import REPO, SupervisorProc, wait_for
from helpers.uvicorn_runs import CONFIGS, Instances, restart_example
from helpers.servers import (
    APPS,
    InstanceProc,
    Probe,
    Step,
    TracedReport,
    freeze_kill_traced,
    gunicorn_cmd,
    restart_traced,
    roll_traced,
)

from reuseport_standby import cli
from reuseport_standby.loadgen import Load
from reuseport_standby.kernel.sockets import Address

CONCURRENCY = 6
def target(sup: SupervisorProc) -> tuple[str, int]:
    a = Address.parse(sup.binds[0])
    return a.host, a.port


def start_pair(supervisor: Callable[..., SupervisorProc], instances: Instances, config: tuple[str, ...],
               extra: list[str] | None = None) -> tuple[SupervisorProc, Callable[[], InstanceProc], InstanceProc, InstanceProc]:
    sup = supervisor(extra=extra)
    standby = instances.uvicorn(sup, "standby", *config).start().wait_active()
    make_primary = lambda: instances.uvicorn(sup, "primary", *config)
    return sup, make_primary, make_primary().start().wait_active(), standby


def send_get(host: str, port: int, path: str = "/", timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    return s


def read_response(s: socket.socket) -> tuple[int, dict]:
    """(status, JSON body of a 200 or {}) read to EOF; (0, {}) when nothing came back. Closes ``s``."""
    data = b""
    with s:
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        return 0, {}
    status = int(head.split()[1])
    return status, json.loads(body) if status == 200 else {}


def http_get(host: str, port: int, path: str = "/", timeout: float = 10.0) -> tuple[int, dict]:
    """One request on a new connection: (status, JSON body or {}); (0, {}) when the connection fails."""
    try:
        return read_response(send_get(host, port, path, timeout))
    except OSError:
        return 0, {}


# -- command line -----------------------------------------------------------------------------

@pytest.mark.parametrize("option", ["--host=0.0.0.0", "--port=8000", "--uds=/tmp/x.sock", "--fd=3",
                                    "--backlog=64", "--reload"])
def test_cli_refuses_what_the_supervisor_owns(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["uvicorn", "--role", "primary", "asgi_role:app", option]) == 2
    assert f"{option.split('=')[0]} cannot be used here" in capsys.readouterr().err


def test_cli_needs_a_role(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REUSEPORT_STANDBY_ROLE", raising=False)
    assert cli.main(["uvicorn", "--factory", "asgi_role:create_app"]) == 2
    assert "Missing option '--role'" in capsys.readouterr().err


def test_run_refuses_what_the_supervisor_owns() -> None:
    from reuseport_standby.uvicorn import run

    with pytest.raises(ValueError, match="'port' is not allowed"):
        run("asgi_role:app", role="primary", port=8000)
    with pytest.raises(ValueError, match="no role given"):
        run("asgi_role:app", role="")


# -- restarts under load ------------------------------------------------------------------------

@pytest.mark.kernel
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_restarts_under_load(supervisor, instances, config: str) -> None:
    """SIGTERM x5, SIGKILL x5 (whole group) and rolling restart x5 of the primary, under load."""
    sup, make_primary, primary, _ = start_pair(supervisor, instances, CONFIGS[config])
    host, port = target(sup)
    traced = restart_traced(make_primary, primary, host=host, port=port,
                            schedule=("term",) * 5 + ("kill",) * 5, concurrency=CONCURRENCY)
    rolled = roll_traced(make_primary, make_primary().start().wait_active(), host=host, port=port,
                         times=5, concurrency=CONCURRENCY)
    print(f"\n[{config}] term/kill: {traced}\n[{config}] roll: {rolled}")
    by_kind = {**check_traced(traced, concurrency=CONCURRENCY), **check_traced(rolled, concurrency=CONCURRENCY)}
    assert sum(by_kind["term"]) == 0 and sum(by_kind["roll"]) == 0
    counters = sup.status()["addresses"][0]["counters"]
    assert counters["selected_standby"] > 0, "the standby took no traffic while the primary was down"


@pytest.mark.kernel
def test_contrast_without_migration(supervisor, instances) -> None:
    """The same restarts with the program loaded as plain SELECT: the queue of a closing listener is reset.

    SIGTERM loses nothing even so (the instance leaves its slots and drains
    its queue before it closes); what a SIGKILLed primary had queued is
    lost, on top of what it had in flight.
    """
    sup, make_primary, primary, _ = start_pair(supervisor, instances, CONFIGS["w1"], extra=["--no-migrate"])
    assert sup.status()["addresses"][0]["mode"] == "select"
    host, port = target(sup)
    traced = restart_traced(make_primary, primary, host=host, port=port,
                            schedule=("term",) * 5 + ("kill",) * 5, concurrency=CONCURRENCY)
    print(f"\n[no-migrate w1] {traced}")
    assert traced.load.failed > 0, f"plain SELECT lost nothing: {traced}"


@pytest.mark.kernel
@pytest.mark.parametrize("migrate", [True, False], ids=["select_or_migrate", "plain_select"])
def test_hung_primary_killed_under_load(supervisor, instances, migrate: bool) -> None:
    """A primary that stops accepting (SIGSTOP) for 0.3 s and is then SIGKILLed, x5, under load.

    Requests sent after the SIGSTOP were never accepted by the killed
    processes (4 per freeze are sent on purpose): with migration none of
    them fails; as plain SELECT they are reset.
    """
    sup, make_primary, primary, _ = start_pair(supervisor, instances, CONFIGS["w1"],
                                               extra=None if migrate else ["--no-migrate"])
    host, port = target(sup)
    traced, probes = freeze_kill_traced(make_primary, primary, host=host, port=port, times=5, probes=4,
                                        concurrency=CONCURRENCY)
    never_accepted = [len(traced.after_signal(s)) for s in traced.steps]
    print(f"\n[hung primary, {'migrate' if migrate else 'no-migrate'}] requests sent into the frozen queue: "
          f"{dict(probes)}; load requests sent after the SIGSTOP that failed: {never_accepted}; {traced}")
    if migrate:
        assert probes == {"ok": 20}
        check_traced(traced, concurrency=CONCURRENCY)
    else:
        assert probes == {"reset": 20}


@pytest.mark.kernel
@pytest.mark.parametrize("migrate", [True, False], ids=["select_or_migrate", "plain_select"])
def test_queue_of_frozen_primary_survives_its_kill(supervisor, instances, migrate: bool) -> None:
    """Requests queued on a primary that accepts nothing (SIGSTOP) when it is SIGKILLed.

    None was accepted by the killed processes, so with migration the standby
    answers every one; as plain SELECT every one is reset.
    """
    n = 20
    sup, _, primary, _ = start_pair(supervisor, instances, CONFIGS["w2"], extra=None if migrate else ["--no-migrate"])
    host, port = target(sup)
    assert primary.proc is not None
    os.killpg(primary.proc.pid, signal.SIGSTOP)
    try:
        clients = [send_get(host, port) for _ in range(n)]
        wait_for(lambda: _queued(sup, primary) >= n, 5, what=f"{n} requests queued on the primary")
    finally:
        primary.kill_group()
    outcome: Counter[str] = Counter()
    for c in clients:
        try:
            status, body = read_response(c)
            outcome[body.get("role", f"http_{status}")] += 1
        except ConnectionResetError:
            outcome["reset"] += 1
        except OSError as exc:
            outcome[type(exc).__name__] += 1
    print(f"\n[{'migrate' if migrate else 'no-migrate'}] {n} queued on a frozen, then killed primary: {dict(outcome)}")
    assert outcome == ({"standby": n} if migrate else {"reset": n})


def _queued(sup: SupervisorProc, inst: InstanceProc) -> int:
    for i in sup.status()["instances"]:
        if inst.proc is not None and i["pid"] == inst.proc.pid:
            return sum(q["queued"] or 0 for q in i["queues"].values())
    return 0


# -- ready means serving, stop means drain ---------------------------------------------------

@pytest.mark.kernel
@pytest.mark.parametrize("workers", [1, 2])
def test_slow_lifespan_gets_no_traffic_early(supervisor, instances, workers: int) -> None:
    delay = 3.0
    sup = supervisor(extra=["--backlog", "256"])
    host, port = target(sup)
    instances.uvicorn(sup, "standby", "asgi_role:app").start().wait_active()
    with Probe(host, port, threads=2, duration=30) as probe:
        time.sleep(0.3)
        t0, wall0 = time.monotonic(), time.time()
        primary = instances.uvicorn(sup, "primary", "asgi_role:app", "--workers", str(workers),
                        env={"STARTUP_DELAY": str(delay)}).start()
        time.sleep(delay - 1)
        assert primary.state() == "pending", "activated before lifespan startup finished"
        primary.wait_active(30)
        time.sleep(0.5)
    answers = probe.answers
    assert answers and all(a.status == 200 for a in answers), [a for a in answers if a.status != 200][:5]
    bodies = [(a, json.loads(a.body)) for a in answers]
    from_primary = [(a, b) for a, b in bodies if b["role"] == "primary"]
    assert from_primary, "the primary never answered"
    assert any(b["role"] == "standby" and a.sent > t0 + 1 for a, b in bodies), "the standby did not cover the start"
    first_sent = min(a.sent for a, _ in from_primary)
    assert first_sent >= t0 + delay, f"the primary got a request {first_sent - t0:.2f} s after start"
    assert all(b["ready_at"] >= wall0 + delay for _, b in from_primary)
    assert max(a.ended - a.sent for a in answers) < 1.0
    queues = next(i for i in sup.status()["instances"] if i["pid"] == primary.proc.pid)["queues"]
    assert {q["backlog"] for q in queues.values()} == {256}, f"uvicorn changed the supervisor's backlog: {queues}"
    print(f"\n[slow start, {workers} worker(s)] {len(answers)} answers, primary's first request "
          f"{first_sent - t0:.2f} s after start, max latency {max(a.ended - a.sent for a in answers) * 1000:.0f} ms")


@pytest.mark.kernel
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_stop_drains_in_flight_requests(supervisor, instances, workers: int, sig: signal.Signals) -> None:
    """A request in flight at SIGTERM/SIGINT completes; one longer than --timeout-graceful-shutdown is cut off."""
    sup = supervisor()
    host, port = target(sup)
    instances.uvicorn(sup, "standby", "asgi_role:app").start().wait_active()
    primary = instances.uvicorn(sup, "primary", "asgi_role:app", "--workers", str(workers),
                                "--timeout-graceful-shutdown", "2").start().wait_active()
    with ThreadPoolExecutor(2) as pool:
        short = pool.submit(http_get, host, port, "/slow?s=1")
        long = pool.submit(http_get, host, port, "/slow?s=20")
        time.sleep(0.3)
        with Load(host, port, concurrency=2, duration=20) as load:
            t = time.monotonic()
            rc = primary.stop(sig)
            stopped_after = time.monotonic() - t
        status, body = short.result(15)
        assert (status, body.get("role")) == (200, "primary")
        assert long.result(15)[0] != 200, "a request longer than --timeout-graceful-shutdown completed"
    result = load.result
    print(f"\n[drain on {sig.name}, {workers} worker(s)] primary exited {stopped_after:.1f} s after the signal; "
          f"meanwhile {result.summary()}")
    assert stopped_after < 2 + 3, "--timeout-graceful-shutdown did not bound the drain"
    assert rc == 0, f"exit status {rc} after a graceful {sig.name}"
    assert result.failed == 0 and result.max_latency < 1.0


@pytest.mark.kernel
def test_signal_to_the_whole_group(supervisor, instances) -> None:
    """SIGTERM/SIGINT to main process and workers at once (systemd's default KillMode, Ctrl-C), --workers 2.

    The workers stop accepting within 0.1 s of the signal; the main process
    leaves the slots at once, not at uvicorn's next 0.5 s look at its signals.
    """
    sup, make_primary, primary, _ = start_pair(supervisor, instances, CONFIGS["w2"])
    host, port = target(sup)
    steps: list[Step] = []
    with Load(host, port, concurrency=CONCURRENCY, duration=90) as load:
        time.sleep(0.3)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
            assert primary.proc is not None
            steps.append(Step(f"group {sig.name}", time.monotonic()))
            os.killpg(primary.proc.pid, sig)
            assert primary.proc.wait(20) == 0, primary.log()[-2000:]
            primary = make_primary().start().wait_active()
            time.sleep(0.3)
    report = TracedReport(load.result, steps)
    print(f"\n[group signals, 2 workers] {report}")
    check_traced(report, concurrency=CONCURRENCY)


@pytest.mark.kernel
def test_worker_crash_and_hup_keep_the_instance_active(supervisor, instances) -> None:
    """With --workers 2, a SIGKILLed worker and uvicorn's SIGHUP worker restarts never deactivate the instance.

    The killed worker's in-flight requests are lost, nothing else; the
    SIGHUP restarts lose nothing, although each old worker accepts until its
    shutdown starts (see reuseport_standby.uvicorn.FIRST_REQUEST_GRACE).
    """
    sup, _, primary, _ = start_pair(supervisor, instances, CONFIGS["w2"])
    host, port = target(sup)
    assert primary.proc is not None
    pid = primary.proc.pid
    states: Counter[str] = Counter()
    steps: list[Step] = []
    with Load(host, port, concurrency=CONCURRENCY, duration=90) as load:
        time.sleep(0.3)
        workers = uvicorn_workers(pid)
        assert len(workers) == 2, workers
        steps.append(Step("kill", time.monotonic()))
        os.kill(workers[0], signal.SIGKILL)
        workers = wait_for(lambda: _replaced(pid, {workers[0]}, workers[1:]), 20, what="a new worker")
        for _ in range(2):
            states[primary.state() or "gone"] += 1
            steps.append(Step("hup", time.monotonic()))
            primary.signal(signal.SIGHUP)
            old = set(workers)
            deadline = time.monotonic() + 30
            while old & set(uvicorn_workers(pid)) and time.monotonic() < deadline:
                states[primary.state() or "gone"] += 1
                time.sleep(0.1)
            workers = uvicorn_workers(pid)
            assert len(workers) == 2 and not old & set(workers), f"SIGHUP did not replace the workers: {workers}"
            time.sleep(0.3)
        states[primary.state() or "gone"] += 1
    report = TracedReport(load.result, steps)
    print(f"\n[worker crash + 2 HUP] states seen {dict(states)}; {report}")
    assert set(states) == {"active"}
    check_traced(report, concurrency=CONCURRENCY)
    counters = sup.status()["addresses"][0]["counters"]
    assert counters["selected_standby"] == 0, "traffic went to the standby: the primary was deactivated"


def uvicorn_workers(pid: int) -> list[int]:
    """uvicorn's worker processes: the spawned children of its main process (not the resource tracker)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = []
    for child in map(int, children):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(child)
        except OSError:
            pass
    return out


def _replaced(pid: int, gone: set[int], kept: list[int]) -> list[int] | None:
    now = uvicorn_workers(pid)
    return now if len(now) == 2 and not gone & set(now) and set(kept) <= set(now) else None


# -- startup failure and the programmatic form ---------------------------------------------------

@pytest.mark.kernel
@pytest.mark.parametrize("workers", [1, 2])
def test_failed_startup_exits_3_and_never_activates(supervisor, instances, workers: int) -> None:
    sup = supervisor()
    inst = instances.uvicorn(sup, "primary", "asgi_role:app", "--workers", str(workers), env={"STARTUP_FAIL": "1"}).start()
    assert inst.proc is not None
    assert inst.proc.wait(30) == 3, inst.log()[-2000:]
    assert "Application startup failed" in inst.log()
    assert "active in slots" not in inst.log()
    assert sup.status()["addresses"][0]["counters"]["selected_primary"] == 0


@pytest.mark.kernel
def test_programmatic_run(supervisor) -> None:
    """``reuseport_standby.uvicorn.run(app_object, role=..., **config)`` from a Python program."""
    sup = supervisor()
    host, port = target(sup)
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO); sys.path.insert(0, sys.argv[1]); "
        "import asgi_role; from reuseport_standby.uvicorn import run; "
        "raise SystemExit(run(asgi_role.create_app(), role='primary', service=sys.argv[2], control=sys.argv[3], "
        "timeout_graceful_shutdown=5, access_log=False))"
    )
    inst = InstanceProc([sys.executable, "-c", code, str(APPS), sup.service, sup.control], sup, "primary").start()
    try:
        inst.wait_active()
        assert http_get(host, port)[1].get("factory") is True
    finally:
        inst.stop(signal.SIGTERM)
    assert inst.proc is not None and inst.proc.returncode in (0, -signal.SIGTERM), inst.log()[-2000:]
    assert "stopped taking new connections" in inst.log()


# -- the example, with the commands its README gives ----------------------------------------------

@pytest.mark.kernel
def test_example_serves_through_restarts(supervisor, instances: Instances) -> None:
    """examples/asgi_app with its README's commands: restart primary, standby, primary under load."""
    sup = supervisor()
    result = restart_example(sup, instances, REPO / "examples" / "asgi_app", CONCURRENCY)
    host, port = target(sup)
    assert http_get(host, port)[1]["role"] == "primary"
    print(f"\n[example asgi_app] {result.summary()}")
    assert result.failed == 0 and result.max_latency < 1.0, result.summary()
    assert result.ok > 100


# -- mixed pairs: a gunicorn instance and a uvicorn instance of one service ------------------------

@pytest.mark.kernel
@pytest.mark.parametrize("primary_server", ["gunicorn", "uvicorn"])
def test_mixed_pair(supervisor, instances: Instances, short_tmp: Path, primary_server: str) -> None:
    """gunicorn (UvicornWorker, ``-c python:reuseport_standby.conf``) with uvicorn, either one the primary."""
    sup = supervisor()
    host, port = target(sup)

    def make(role: str, server: str) -> InstanceProc:
        if server == "uvicorn":
            return instances.uvicorn(sup, role, "asgi_role:app", "--workers", "2")
        cmd = gunicorn_cmd("asgi_role:app", "--workers", "2", "--worker-class", "uvicorn_worker.UvicornWorker",
                           "--graceful-timeout", "10")
        return instances.track(InstanceProc(cmd, sup, role, env={"XDG_RUNTIME_DIR": str(short_tmp)}, cwd=APPS))

    standby_server = "uvicorn" if primary_server == "gunicorn" else "gunicorn"
    make("standby", standby_server).start().wait_active()
    make_primary = lambda: make("primary", primary_server)
    primary = make_primary().start().wait_active()
    assert http_get(host, port)[1]["role"] == "primary"
    traced = restart_traced(make_primary, primary, host=host, port=port, schedule=("term", "kill") * 2,
                            concurrency=CONCURRENCY)
    print(f"\n[mixed: {primary_server} primary, {standby_server} standby] {traced}")
    check_traced(traced, concurrency=CONCURRENCY)
    assert sup.status()["addresses"][0]["counters"]["selected_standby"] > 0

