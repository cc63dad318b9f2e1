"""The gunicorn integration with real gunicorn masters, the running kernel and TCP on loopback.

Every test starts a supervisor of its own (``supervisor`` fixture), a
standby and a primary gunicorn, and drives a bounded load of one new
connection per request.  Failures are attributed to the fault that caused
them (``servers.TracedReport``): a SIGTERM may cost nothing; a SIGKILL may
cost only the requests already inside a killed worker.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import time
from pathlib import Path
from typing import Callable

import pytest

from helpers.checks import GUNICORN_CONCURRENCY, HELD_BY_WORKERS, MAX_LATENCY, check_faults
from helpers.procs import REPO, SupervisorProc, wait_for
from helpers.servers import APPS, InstanceProc, Probe, gunicorn_cmd, restart_traced, worker_pids
from reuseport_standby.gunicorn import compose
from reuseport_standby.loadgen import Load, LoadResult
from reuseport_standby.kernel.sockets import Address

HOST = "127.0.0.1"
CONCURRENCY = GUNICORN_CONCURRENCY
SETTLE = 0.4

WORKER_ARGS = {
    "sync": ["--workers", "2"],
    # gthread accepts up to worker_connections per worker, not threads: limit it so that
    # connections wait in the queue, as with sync, and a SIGKILL shows what migrates.
    "gthread": ["--workers", "2", "--worker-class", "gthread", "--threads", "2", "--worker-connections", "2"],
    # the stock class by its usual name: our post_worker_init gives it our shutdown (gunicorn_workers.adopt)
    "uvicorn": ["--workers", "2", "--worker-class", "uvicorn_worker.UvicornWorker"],
    "uvicorn-rs": ["--workers", "2", "--worker-class", "reuseport_standby.gunicorn_workers.UvicornWorker"],
    "gevent": ["--workers", "2", "--worker-class", "gevent"],
    "asgi": ["--workers", "2", "--worker-class", "asgi"],  # gunicorn >= 25's own asyncio worker
}
APP = {"sync": "wsgi_app:app", "gthread": "wsgi_app:app", "uvicorn": "asgi_app:app", "uvicorn-rs": "asgi_app:app",
       "gevent": "wsgi_app:app", "asgi": "asgi_app:app"}
# gevent and gunicorn's asgi worker accept as many connections as clients send (worker_connections,
# 1000 by default): a SIGKILL may take every request in flight, as with uvicorn unpaced.
HELD = {**HELD_BY_WORKERS, "uvicorn-rs": HELD_BY_WORKERS["uvicorn"], "gevent": CONCURRENCY, "asgi": CONCURRENCY}
pytestmark = pytest.mark.kernel


@pytest.fixture
def app_env(short_tmp: Path) -> dict[str, str]:
    """Environment of every test instance: a 5 ms request (so the queue is never empty), and a
    private directory for gunicorn's own control sockets."""
    return {"TEST_APP_REQUEST_DELAY": "0.005", "XDG_RUNTIME_DIR": str(short_tmp)}


def port_of(sup: SupervisorProc) -> int:
    return Address.parse(sup.binds[0]).port


def gunicorn(sup: SupervisorProc, role: str, kind: str, env: dict[str, str], *extra: str,
             config: str = "python:reuseport_standby.conf") -> InstanceProc:
    cmd = gunicorn_cmd(APP[kind], *WORKER_ARGS[kind], "--graceful-timeout", "10", *extra, config=config)
    return InstanceProc(cmd, sup, role, env=env, cwd=APPS)


def primary_answers(probe: Probe) -> list[tuple[float, float]]:
    """(sent, ready_at of the primary that answered) of every answer from a primary."""
    out = []
    for a in probe.answers:
        role, _, ready_at = a.body.split() if a.body else ("", "", "0")
        if role == "primary":
            out.append((a.sent, float(ready_at)))
    return out


# -- restarts -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sync", "gthread", "uvicorn", "gevent", "asgi"])
def test_primary_term_and_kill_lose_nothing_queued(supervisor, app_env: dict[str, str], kind: str) -> None:
    sup = supervisor()
    standby = gunicorn(sup, "standby", kind, app_env).start().wait_active()
    primary = gunicorn(sup, "primary", kind, app_env).start().wait_active()
    try:
        report = restart_traced(lambda: gunicorn(sup, "primary", kind, app_env), primary, host=HOST,
                                port=port_of(sup), schedule=("term", "kill") * 5, concurrency=CONCURRENCY,
                                settle=SETTLE)
    finally:
        standby.stop()
    print(f"\n{kind}: {report}")
    check_faults(report, HELD[kind])


@pytest.mark.parametrize("kind", ["sync", "gthread"])
def test_stopping_workers_let_go_of_the_listener_before_teardown(supervisor, app_env: dict[str, str],
                                                                  kind: str) -> None:
    """An app that takes 2 s to tear down must not hold its queue back that long.

    The queue of a stopping instance migrates when the last copy of the
    listener closes; the workers close theirs as they finish serving, not
    when the interpreter has finished exiting.  (gunicorn's sync worker leaves
    that to the interpreter; gthread closes them itself, and must keep working.)
    """
    env = {**app_env, "TEST_APP_EXIT_DELAY": "2"}
    sup = supervisor()
    standby = gunicorn(sup, "standby", kind, app_env).start().wait_active()
    primary = gunicorn(sup, "primary", kind, env).start().wait_active()
    try:
        report = restart_traced(lambda: gunicorn(sup, "primary", kind, env), primary, host=HOST, port=port_of(sup),
                                schedule=("term", "term"), concurrency=CONCURRENCY, settle=SETTLE)
    finally:
        standby.stop()
    print(f"\n{kind}, 2 s teardown: {report}")
    check_faults(report, HELD_BY_WORKERS[kind])


def test_without_migration_the_same_script_loses_connections(supervisor, app_env: dict[str, str]) -> None:
    """The contrast: plain SELECT, as the published demos load it; the queue of a closing primary is reset."""
    sup = supervisor(extra=["--no-migrate"])
    standby = gunicorn(sup, "standby", "sync", app_env).start().wait_active()
    primary = gunicorn(sup, "primary", "sync", app_env).start().wait_active()
    try:
        report = restart_traced(lambda: gunicorn(sup, "primary", "sync", app_env), primary, host=HOST,
                                port=port_of(sup), schedule=("term", "kill") * 5, concurrency=CONCURRENCY,
                                settle=SETTLE)
    finally:
        standby.stop()
    print(f"\nsync, no migration: {report}")
    assert report.load.failed > 0, f"plain SELECT lost nothing, so the test cannot tell: {report}"
    lost_beyond_workers = sum(len(report.after_signal(s)) + max(0, len(report.in_flight(s)) - HELD_BY_WORKERS["sync"])
                              for s in report.steps)
    assert lost_beyond_workers > 0 or any(report.failures_of(s) for s in report.steps if s.kind == "term"), report


def test_master_or_all_workers_killed(supervisor, app_env: dict[str, str]) -> None:
    """SIGKILL of the master alone: its orphaned workers finish and leave, their queue migrates.
    SIGKILL of every worker: the master keeps the listener and forks new workers; the queue waits for them."""
    sup = supervisor()
    standby = gunicorn(sup, "standby", "sync", app_env).start().wait_active()
    primary = gunicorn(sup, "primary", "sync", app_env).start().wait_active()
    try:
        report = restart_traced(lambda: gunicorn(sup, "primary", "sync", app_env), primary, host=HOST,
                                port=port_of(sup), schedule=("kill_master", "kill_workers") * 2,
                                concurrency=CONCURRENCY, settle=SETTLE)
    finally:
        standby.stop()
    print(f"\nsync, master or workers killed: {report}")
    check_faults(report, HELD_BY_WORKERS["sync"])


@pytest.mark.parametrize("kind,config_file", [("sync", False), ("gthread", False), ("uvicorn", False),
                                              ("uvicorn-rs", False), ("gevent", False), ("asgi", False),
                                              ("sync", True)],
                         ids=["sync", "gthread", "uvicorn", "uvicorn-ours", "gevent", "asgi", "sync-config-file"])
def test_hup_keeps_listeners_and_stays_active(supervisor, app_env: dict[str, str], short_tmp: Path, kind: str,
                                              config_file: bool) -> None:
    """The instance keeps its listeners and its slots through HUP; the queue waits for the new workers.

    An old worker shuts down while the instance is active, so it may have
    accepted a connection whose request is still unread.  Stock uvicorn's
    ``Server.shutdown`` would close it (the race Kludex/uvicorn pull request
    #3124 describes); the stock ``uvicorn_worker.UvicornWorker`` here runs
    with our config class (``post_worker_init``), which serves it instead.

    ``config_file``: the literal ``-c reuseport_standby.conf`` file, which gunicorn
    executes again at every HUP (a ``python:`` module it imports once).
    """
    sup = supervisor()
    config = "python:reuseport_standby.conf"
    if config_file:
        conf = short_tmp / "reuseport_standby.conf"
        conf.write_text((REPO / "examples" / "django_project" / "reuseport_standby.conf").read_text())
        config = str(conf)
    standby = gunicorn(sup, "standby", kind, app_env).start().wait_active()
    primary = gunicorn(sup, "primary", kind, app_env, config=config).start().wait_active()
    assert primary.proc is not None
    before = {i["id"] for i in sup.status()["instances"] if i["pid"] == primary.proc.pid}
    try:
        with Load(HOST, port_of(sup), concurrency=CONCURRENCY, duration=60) as load, \
                Probe(HOST, port_of(sup), threads=1, duration=60) as probe:
            time.sleep(SETTLE)
            for _ in range(2):
                old = set(worker_pids(primary.proc))
                primary.signal(signal.SIGHUP)
                wait_for(lambda old=old: len(set(worker_pids(primary.proc)) - old) == 2
                         and not old & set(worker_pids(primary.proc)), 20, what="new workers after HUP")
                time.sleep(SETTLE)
                assert primary.state() == "active"
            new = set(worker_pids(primary.proc))
            time.sleep(SETTLE)
        result = load.result
        after = {i["id"] for i in sup.status()["instances"] if i["pid"] == primary.proc.pid}
    finally:
        primary.stop()
        standby.stop()
    print(f"\n{kind}, {config}, 2 HUPs: {result.summary()}")
    if config_file:
        assert "valid Python extension" in primary.log(), "gunicorn did not read the config file"
    assert result.failed == 0, result.summary()
    assert result.max_latency < MAX_LATENCY, result.summary()
    assert after == before, "the instance re-registered instead of keeping its listeners"
    served_by = {int(a.body.split()[1]) for a in probe.answers if a.body.startswith("primary")}
    assert served_by & new, "the workers forked after the last HUP served nothing"


def test_supervisor_restart_is_invisible(supervisor, app_env: dict[str, str]) -> None:
    """SIGKILL the supervisor under load, start it again, then restart the primary through it."""
    sup = supervisor()
    standby = gunicorn(sup, "standby", "sync", app_env).start().wait_active()
    primary = gunicorn(sup, "primary", "sync", app_env).start().wait_active()
    try:
        with Load(HOST, port_of(sup), concurrency=CONCURRENCY, duration=60) as load:
            time.sleep(SETTLE)
            sup.kill()
            time.sleep(SETTLE)
            sup.start()
            wait_for(lambda: sorted(i["state"] for i in sup.status()["instances"]) == ["active", "active"], 15,
                     what="both instances re-announced to the new supervisor")
            primary.stop(signal.SIGTERM)
            primary = gunicorn(sup, "primary", "sync", app_env).start().wait_active()
            time.sleep(SETTLE)
        result = load.result
    finally:
        primary.stop()
        standby.stop()
    print(f"\nsupervisor restarted, then the primary: {result.summary()}")
    assert result.failed == 0, result.summary()
    assert result.max_latency < MAX_LATENCY, result.summary()


# -- ready means serving --------------------------------------------------------------------

@pytest.mark.parametrize("kind,extra,env", [
    ("sync", [], {"TEST_APP_IMPORT_DELAY": "3"}),
    ("sync", ["--preload"], {"TEST_APP_IMPORT_DELAY": "3"}),
    ("uvicorn", [], {"TEST_APP_LIFESPAN_DELAY": "3"}),
    ("asgi", [], {"TEST_APP_LIFESPAN_DELAY": "3"}),
    ("gevent", [], {"TEST_APP_IMPORT_DELAY": "3"}),
], ids=["sync-slow-import", "sync-preload-slow-import", "uvicorn-slow-lifespan", "asgi-slow-lifespan",
        "gevent-slow-import"])
def test_slow_primary_gets_nothing_before_it_serves(supervisor, app_env: dict[str, str], kind: str,
                                                     extra: list[str], env: dict[str, str]) -> None:
    sup = supervisor()
    standby = gunicorn(sup, "standby", kind, app_env).start().wait_active()
    try:
        with Load(HOST, port_of(sup), concurrency=CONCURRENCY, duration=60) as load, \
                Probe(HOST, port_of(sup), threads=2, duration=60) as probe:
            time.sleep(SETTLE)
            started = time.monotonic()
            primary = gunicorn(sup, "primary", kind, {**app_env, **env}, *extra).start().wait_active(30)
            waited = time.monotonic() - started
            time.sleep(1.0)
        result = load.result
        primary.stop()
    finally:
        standby.stop()
    print(f"\n{kind} {' '.join(extra)} {env}: active after {waited:.1f} s; {result.summary()}")
    assert waited >= 3.0, "the primary became active before its app could have been ready"
    assert result.failed == 0, result.summary()
    assert result.max_latency < MAX_LATENCY, result.summary()
    answers = primary_answers(probe)
    assert answers, "the primary never answered once it was ready"
    ready = min(r for _, r in answers)
    early = [sent for sent, _ in answers if sent < ready]
    assert not early, f"{len(early)} request(s) sent before the primary's app was ready were answered by it"
    assert any(a.body.startswith("standby") and a.sent >= started for a in probe.answers), \
        "the standby served nothing while the primary was starting"


# -- refusals ---------------------------------------------------------------------------------

def _refused(sup: SupervisorProc, inst: InstanceProc, needle: str) -> None:
    assert inst.proc is not None
    try:
        code = inst.proc.wait(30)
    finally:
        inst.stop()
    assert code not in (0, None), f"gunicorn started anyway:\n{inst.log()}"
    assert needle in inst.log(), inst.log()
    assert not [i for i in sup.status()["instances"] if i["state"] == "active"]


@pytest.mark.parametrize("extra,needle", [
    (["--reuse-port"], "reuse_port"),
    (["--bind", "127.0.0.1:1"], "instead of the supervisor's listeners"),
], ids=["reuse-port", "address-bind"])
def test_refuses_settings_it_would_defeat(supervisor, app_env: dict[str, str], extra: list[str], needle: str) -> None:
    sup = supervisor()
    _refused(sup, gunicorn(sup, "primary", "sync", app_env, *extra).start(), needle)


@pytest.mark.parametrize("hook,arg", [("post_worker_init", "worker"), ("on_starting", "server")])
def test_refuses_a_replaced_hook(supervisor, app_env: dict[str, str], short_tmp: Path, hook: str, arg: str) -> None:
    """A project config that replaces one of our hooks instead of composing it: gunicorn exits, saying how."""
    conf = short_tmp / "own_conf.py"
    conf.write_text(f"from reuseport_standby.conf import *\n\ndef {hook}({arg}):\n    pass\n")
    sup = supervisor()
    inst = InstanceProc(gunicorn_cmd(APP["sync"], config=str(conf)), sup, "primary", env=app_env, cwd=APPS).start()
    _refused(sup, inst, f"{hook} = reuseport_standby.gunicorn.compose(reuseport_standby.gunicorn.{hook}, ")


def test_refuses_daemon_mode(supervisor, app_env: dict[str, str], short_tmp: Path) -> None:
    """gunicorn's launcher exits 0 as it daemonizes; the daemon refuses, and says so in the error log."""
    sup = supervisor()
    errlog = short_tmp / "daemon.log"
    inst = gunicorn(sup, "primary", "sync", app_env, "--daemon", "--error-logfile", str(errlog)).start()
    assert inst.proc is not None
    inst.proc.wait(30)
    text = wait_for(lambda: errlog.exists() and "daemon mode" in errlog.read_text() and errlog.read_text(), 20,
                    what="the daemon's refusal in its error log")
    pids = {int(p) for p in re.findall(r"\[(\d+)\] \[ERROR\] reuseport-standby cannot run", text)}
    assert pids
    try:
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), 20, what="the refused daemon to exit")
    finally:
        for p in pids:  # it escaped the test's process group by daemonizing
            if Path(f"/proc/{p}").exists():
                os.kill(p, signal.SIGKILL)
    assert not [i for i in sup.status()["instances"] if i["state"] == "active"]


def test_missing_role_is_a_clear_error(supervisor, app_env: dict[str, str]) -> None:
    sup = supervisor()
    inst = gunicorn(sup, "primary", "sync", {**app_env, "REUSEPORT_STANDBY_ROLE": ""}).start()
    assert inst.proc is not None
    assert inst.proc.wait(30) != 0
    assert "REUSEPORT_STANDBY_ROLE is not set" in inst.log()


def test_compose_keeps_arity_and_order() -> None:
    calls: list[str] = []

    def a(server):  # noqa: ANN001
        calls.append("a")

    def b(server):  # noqa: ANN001
        calls.append("b")

    def two(server, worker):  # noqa: ANN001
        pass

    from gunicorn.util import get_arity

    hook = compose(a, b)
    assert get_arity(hook) == 1
    hook(object())
    assert calls == ["a", "b"]
    with pytest.raises(TypeError):
        compose(a, two)


# -- the examples, with the commands their READMEs give -------------------------------------

def readme_commands(readme: Path) -> dict[str, list[str]]:
    """The gunicorn command of each role, as the README shows it."""
    found = {}
    for line in readme.read_text().splitlines():
        m = re.fullmatch(r"\s*REUSEPORT_STANDBY_ROLE=(primary|standby) (gunicorn .+)", line)
        if m:
            found[m.group(1)] = shlex.split(m.group(2))
    assert set(found) == {"primary", "standby"}, f"{readme} lacks a primary or a standby command"
    return found


def restart_both_under_load(sup: SupervisorProc,
                            make: dict[str, Callable[[], InstanceProc]]) -> tuple[LoadResult, dict[str, str]]:
    insts = {role: make[role]().start().wait_active() for role in ("standby", "primary")}
    logs = {}
    try:
        with Load(HOST, port_of(sup), concurrency=CONCURRENCY, duration=90) as load:
            time.sleep(SETTLE)
            for role in ("primary", "standby", "primary"):
                insts[role].stop(signal.SIGTERM)
                logs[role] = insts[role].log()
                time.sleep(SETTLE / 2)
                insts[role] = make[role]().start().wait_active()
                time.sleep(SETTLE)
        result = load.result
    finally:
        for inst in insts.values():
            inst.stop()
    return result, logs


@pytest.mark.parametrize("example", ["flask_app", "django_project"])
def test_example_serves_through_restarts(supervisor, short_tmp: Path, example: str) -> None:
    directory = REPO / "examples" / example
    commands = readme_commands(directory / "README.md")
    sup = supervisor()
    env = {"XDG_RUNTIME_DIR": str(short_tmp)}

    def starter(role: str) -> Callable[[], InstanceProc]:
        return lambda: InstanceProc(commands[role], sup, role, env=env, cwd=directory)

    result, logs = restart_both_under_load(sup, {r: starter(r) for r in ("primary", "standby")})
    print(f"\n{example}: {result.summary()}")
    assert result.failed == 0, result.summary()
    assert result.max_latency < MAX_LATENCY, result.summary()
    assert result.ok > 100
    if example == "flask_app":
        assert "flask example: worker" in logs["primary"], "the project's own composed hook did not run"
