"""Health before traffic (issue 20, item 2): with a health path, a worker takes traffic only once its app
answers ``GET PATH`` with 2xx, called in process.

The fast tests build the WSGI environ and the ASGI scope and call small apps.  The others start a real
supervisor, gunicorn and uvicorn, and send real requests over 127.0.0.1: a healthy standby runs beside an
instance whose /healthz answers 503 until a flag file exists (tests/apps/health_app.py); every answer
says which role served it, so "no traffic" is read from the answers, not guessed from timing.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from helpers.procs import REPO, SupervisorProc, wait_for
from helpers.runs import Run
from helpers.servers import APPS, InstanceProc, gunicorn_cmd
from reuseport_standby import health_check
from reuseport_standby.canary import instance_outcomes
from reuseport_standby.kernel.sockets import Address
from reuseport_standby.loadgen import Load, exchange

HOST = "127.0.0.1"
HEALTH = {"REUSEPORT_STANDBY_HEALTH_PATH": "/healthz"}
#: how long an unhealthy instance is watched: long enough for several checks (every 0.5 s) and their logs
UNHEALTHY_FOR = 3.0


# -- fast: the environ, the scope, the verdicts, the path ----------------------------------------------

def test_wsgi_environ_is_a_get_from_localhost_to_the_listener() -> None:
    env = health_check.wsgi_environ(health_check.parse("/health%20z?full=1"), "127.0.0.1", 8123)
    assert env["REQUEST_METHOD"] == "GET" and env["PATH_INFO"] == "/health z" and env["QUERY_STRING"] == "full=1"
    assert (env["SERVER_NAME"], env["SERVER_PORT"], env["HTTP_HOST"]) == ("127.0.0.1", "8123", "127.0.0.1:8123")
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["HTTP_USER_AGENT"].startswith("reuseport-standby-health")
    assert env["wsgi.version"] == (1, 0) and env["wsgi.url_scheme"] == "http" and env["wsgi.input"].read() == b""
    assert isinstance(env["wsgi.input"], io.BytesIO)


def test_asgi_scope_carries_the_servers_lifespan_state_as_a_copy() -> None:
    state = {"db": "pool"}
    scope = health_check.asgi_scope(health_check.parse("/healthz?x=%2F"), "::1", 80, state)
    assert scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/healthz"
    assert scope["query_string"] == b"x=%2F" and scope["raw_path"] == b"/healthz"
    assert dict(scope["headers"])[b"host"] == b"[::1]:80" and scope["client"] == ("127.0.0.1", 0)
    assert scope["state"] == state and scope["state"] is not state
    assert "state" not in health_check.asgi_scope(health_check.parse("/h"), "h", 1)


def test_wsgi_verdicts_status_exception_and_closing() -> None:
    target = health_check.parse("/healthz")
    closed: list[bool] = []

    class Body(list):
        def close(self) -> None:
            closed.append(True)

    def app_for(status: str):
        def app(environ: dict, start_response) -> Body:
            start_response(status, [])
            return Body([b"x"])
        return app

    def lazy(environ: dict, start_response):  # start_response with the first chunk, as a generator may
        start_response("204 No Content", [])
        yield b""

    def boom(environ: dict, start_response):
        raise KeyError("db")

    assert health_check.check_wsgi(app_for("200 OK"), target, HOST, 1) == health_check.Verdict(True, "200 OK")
    assert health_check.check_wsgi(app_for("503 Service Unavailable"), target, HOST, 1).healthy is False
    assert health_check.check_wsgi(app_for("302 Found"), target, HOST, 1).healthy is False
    assert closed == [True, True, True]
    assert health_check.check_wsgi(lazy, target, HOST, 1).healthy is True
    assert health_check.check_wsgi(boom, target, HOST, 1) == health_check.Verdict(False, "raised KeyError: 'db'")


def test_asgi_verdicts_state_exception_and_timeout() -> None:
    target = health_check.parse("/healthz")

    async def app(scope: dict, receive, send) -> None:
        assert (await receive())["type"] == "http.request"
        await send({"type": "http.response.start", "status": 200 if scope["state"].get("up") else 503})
        await send({"type": "http.response.body", "body": b"ok"})

    async def crashes(scope: dict, receive, send) -> None:
        raise RuntimeError("no pool")

    async def hangs(scope: dict, receive, send) -> None:
        await asyncio.sleep(60)

    async def all_of_them() -> list[health_check.Verdict]:
        return [await health_check.check_asgi(app, target, HOST, 1, {"up": True}),
                await health_check.check_asgi(app, target, HOST, 1, {}),
                await health_check.check_asgi(crashes, target, HOST, 1, {}),
                await health_check.check_asgi(hangs, target, HOST, 1, {}, timeout=0.2)]

    started = time.monotonic()
    verdicts = asyncio.run(all_of_them())
    assert time.monotonic() - started < 3
    assert verdicts == [health_check.Verdict(True, "200 OK"), health_check.Verdict(False, "503 Service Unavailable"),
                        health_check.Verdict(False, "raised RuntimeError: no pool"),
                        health_check.Verdict(False, "no answer within 0.2 s")]


@pytest.mark.parametrize("value", ["healthz", "//evil.example/x", "/a b", "/a#frag", "/%ff", "/" + "a" * 2000])
def test_a_bad_health_path_is_refused(value: str) -> None:
    with pytest.raises(health_check.HealthPathError) as err:
        health_check.from_env({"REUSEPORT_STANDBY_HEALTH_PATH": value})
    assert "\n" not in str(err.value) and "REUSEPORT_STANDBY_HEALTH_PATH" in str(err.value)


def test_good_paths_and_no_path() -> None:
    assert health_check.from_env({}) is None and health_check.from_env({"REUSEPORT_STANDBY_HEALTH_PATH": ""}) is None
    assert health_check.parse("/-/ready?db=1&x=%2F") == health_check.HealthPath("/-/ready", "db=1&x=%2F")


def test_the_log_says_why_once_per_reason_not_once_per_retry(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    watch = health_check.Watch(health_check.parse("/healthz"), "worker 1", logging.getLogger("t"), lambda: now[0])
    with caplog.at_level(logging.INFO, "t"):
        for _ in range(20):  # 10 s of retries, one reason
            now[0] += 0.5
            assert not watch.record(health_check.Verdict(False, "503 Service Unavailable"))
        assert not watch.record(health_check.Verdict(False, "raised KeyError: 'db'"))
        now[0] += health_check.LOG_EVERY
        assert not watch.record(health_check.Verdict(False, "raised KeyError: 'db'"))
        assert watch.record(health_check.Verdict(True, "200 OK"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines
    assert "answered 503 Service Unavailable" in lines[0] and "raised KeyError" in lines[1]
    assert "after 22 failed checks" in lines[3]


def test_run_refuses_a_bad_health_path_in_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "reuseport_standby", "run", "--bind", "127.0.0.1:1",
                           "--health-path", "healthz", "--", "gunicorn", "app:app"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "the health path must be a path starting with" in proc.stderr


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
def test_an_instance_refuses_a_bad_health_path_at_start_in_one_line(server: str) -> None:
    cmd = (gunicorn_cmd("health_app:app") if server == "gunicorn"
           else [sys.executable, "-m", "reuseport_standby", "uvicorn", "health_app:asgi_app"])
    env = {**os.environ, "REUSEPORT_STANDBY_ROLE": "primary", "REUSEPORT_STANDBY_HEALTH_PATH": "healthz",
           "REUSEPORT_STANDBY_CONNECT_TIMEOUT": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=APPS, env=env)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "REUSEPORT_STANDBY_HEALTH_PATH must be a path starting with a single '/'" in lines[0]
    assert "troubleshooting.md#instance-settings-refused" in lines[0]


def test_run_takes_the_health_path_from_its_option_or_variable_and_passes_it_to_the_instances() -> None:
    from reuseport_standby import cli

    def config(argv: list[str], environ: dict[str, str]):
        args = cli.build_parser(environ).parse_args(["run", "--bind", "127.0.0.1:1", *argv, "--", "gunicorn", "a:b"])
        cli.envopts.check(args)
        return args.health_path

    assert config([], {}) is None
    assert config([], {"REUSEPORT_STANDBY_HEALTH_PATH": "/healthz"}) == "/healthz"
    assert config(["--health-path", "/ready?x=1"], {"REUSEPORT_STANDBY_HEALTH_PATH": "/healthz"}) == "/ready?x=1"
    with pytest.raises(cli.UsageError, match="REUSEPORT_STANDBY_HEALTH_PATH"):
        config([], {"REUSEPORT_STANDBY_HEALTH_PATH": "healthz"})
    # run's own variable is not inherited by its children: they get the value run was given, or none
    assert "REUSEPORT_STANDBY_HEALTH_PATH" in cli.option_variables()


# -- real servers ------------------------------------------------------------------------------------

def port_of(sup: SupervisorProc) -> int:
    return Address.parse(sup.binds[0]).port


def answered_by(port: int, n: int) -> Counter[str]:
    """n requests, one connection each: who answered them (the apps' first word: their role)."""
    seen: Counter[str] = Counter()
    for _ in range(n):
        kind, sock, body = exchange(HOST, port, "/", timeout=5)
        if sock is not None:
            sock.close()
        seen[body.split()[0].decode() if kind == "ok" and body else kind] += 1
    return seen


def healthy_standby(sup: SupervisorProc, tmp: Path) -> InstanceProc:
    """The other instance: a plain app with no health path, answering 'standby PID ...'."""
    return InstanceProc(gunicorn_cmd("wsgi_app:app", "--workers", "1"), sup, "standby",
                        env={"XDG_RUNTIME_DIR": str(tmp)}, cwd=APPS).start().wait_active()


def workers_active(sup: SupervisorProc, inst: InstanceProc) -> int:
    assert inst.proc is not None
    return sum(1 for i in sup.status()["instances"] if i.get("parent") == inst.proc.pid and i["state"] == "active")


def held_back_then_admitted(sup: SupervisorProc, primary: InstanceProc, flag: Path, workers: int,
                            worker_scope: bool) -> None:
    """While /healthz answers 503 the primary is pending and every request goes to the standby; once the flag
    file exists it becomes active and takes them."""
    port = port_of(sup)
    wait_for(lambda: primary.log().count("not healthy") >= workers, 30, 0.1,
             what=f"every worker to run its check\n{primary.log()[-3000:]}")
    deadline = time.monotonic() + UNHEALTHY_FOR
    seen: Counter[str] = Counter()
    while time.monotonic() < deadline:
        seen += answered_by(port, 10)
        assert primary.state() == "pending", primary.log()[-3000:]
        if worker_scope:
            assert workers_active(sup, primary) == 0
        time.sleep(0.1)
    assert set(seen) == {"standby"} and seen["standby"] >= 50, seen
    # one line per worker and reason, not one per retry (about 6 retries each by now)
    assert primary.log().count("not healthy") == workers, primary.log()[-3000:]
    assert "answered 503 Service Unavailable" in primary.log()

    flag.touch()
    started = time.monotonic()
    primary.wait_active(10)
    admitted = time.monotonic() - started
    if worker_scope:
        wait_for(lambda: workers_active(sup, primary) == workers, 10, 0.1, what="every worker active")
    after = answered_by(port, 20)
    assert after == Counter(primary=20), after
    # the probes are not requests: its outcomes count the 20, none of the 503s its checks got
    assert primary.proc is not None
    counted = wait_for(lambda: (o := instance_outcomes(sup.status(), primary.proc.pid)).requests >= 20 and o, 10, 0.2,
                       what="the primary's 20 requests in its outcomes")
    assert counted.requests == 20 and counted.errors == 0, counted.summary()
    print(f"\nactive {admitted:.2f} s after the flag file appeared; before it: {dict(seen)}")


#: gunicorn worker classes: (app, options); the ASGI app's /healthz needs its lifespan state in the scope
KINDS = {"sync": ("health_app:app", ()), "gthread": ("health_app:app", ("-k", "gthread", "--threads", "2")),
         "uvicorn-worker": ("health_app:asgi_app", ("-k", "uvicorn_worker.UvicornWorker")),
         "asgi": ("health_app:asgi_app", ("-k", "asgi"))}


@pytest.mark.kernel
@pytest.mark.parametrize("scope, kind", [("instance", "sync"), ("worker", "sync"), ("worker", "gthread"),
                                         ("instance", "uvicorn-worker"), ("worker", "asgi")])
def test_gunicorn_worker_without_a_2xx_gets_no_traffic(supervisor, short_tmp: Path, scope: str, kind: str) -> None:
    sup = supervisor()
    standby = healthy_standby(sup, short_tmp)
    flag = short_tmp / "healthy"
    app, options = KINDS[kind]
    primary = InstanceProc(gunicorn_cmd(app, "--workers", "2", *options), sup, "primary",
                           env={**HEALTH, "RS_TEST_HEALTH_FILE": str(flag), "XDG_RUNTIME_DIR": str(short_tmp),
                                "REUSEPORT_STANDBY_SCOPE": scope}, cwd=APPS).start()
    try:
        held_back_then_admitted(sup, primary, flag, workers=2, worker_scope=scope == "worker")
    finally:
        assert primary.stop() == 0, primary.log()[-3000:]
        standby.stop()


@pytest.mark.kernel
@pytest.mark.parametrize("workers, scope", [(1, "instance"), (2, "instance"), (2, "worker")])
def test_uvicorn_process_without_a_2xx_gets_no_traffic(supervisor, instances, short_tmp: Path, workers: int,
                                                       scope: str) -> None:
    sup = supervisor()
    standby = healthy_standby(sup, short_tmp)
    flag = short_tmp / "healthy"
    options = ("--workers", str(workers)) if workers > 1 else ()
    primary = instances.uvicorn(sup, "primary", "health_app:asgi_app", *options,
                                env={**HEALTH, "RS_TEST_HEALTH_FILE": str(flag),
                                     "REUSEPORT_STANDBY_SCOPE": scope}).start()
    try:
        held_back_then_admitted(sup, primary, flag, workers=workers, worker_scope=scope == "worker")
    finally:
        primary.stop()
        standby.stop()


@pytest.mark.kernel
@pytest.mark.parametrize("server", ["gunicorn", "gunicorn-uvicorn-worker", "gunicorn-asgi", "uvicorn"])
def test_a_health_check_that_raises_keeps_the_instance_out_and_says_why_once(supervisor, instances, short_tmp: Path,
                                                                            server: str) -> None:
    sup = supervisor()
    env = {**HEALTH, "RS_TEST_HEALTH_RAISE": "1", "XDG_RUNTIME_DIR": str(short_tmp)}
    if server == "uvicorn":
        inst = instances.uvicorn(sup, "primary", "health_app:asgi_app", env=env)
    else:
        app, kind = {"gunicorn": ("health_app:app", ()),
                     "gunicorn-uvicorn-worker": ("health_app:asgi_app", ("-k", "uvicorn_worker.UvicornWorker")),
                     "gunicorn-asgi": ("health_app:asgi_app", ("-k", "asgi"))}[server]
        inst = instances.track(InstanceProc(gunicorn_cmd(app, "--workers", "1", *kind), sup, "primary", env=env,
                                            cwd=APPS))
    inst.start()
    try:
        wait_for(lambda: "not healthy" in inst.log(), 30, 0.1, what=f"the check to fail\n{inst.log()[-3000:]}")
        time.sleep(UNHEALTHY_FOR)  # about six more checks
        assert inst.state() == "pending"
        kind, sock, _ = exchange(HOST, port_of(sup), "/", timeout=1.0)
        if sock is not None:
            sock.close()
        assert kind != "ok"  # nothing is active, so nothing answers: the anchor holds the connection
        log = inst.log()
        assert log.count("not healthy") == 1, log[-3000:]
        assert "raised RuntimeError: database unreachable (test)" in log
        assert "Traceback" not in log, log[-3000:]
    finally:
        inst.stop()


# -- run --health-path: a reload whose new instance never gets healthy rolls back ---------------------

@pytest.mark.kernel
def test_run_health_path_rolls_back_a_reload_whose_new_version_is_unhealthy(short_tmp: Path, pin_root: Path) -> None:
    version = short_tmp / "version"
    version.write_text("healthy")
    run = Run(short_tmp, pin_root, ["gunicorn", "-w", "2", "--graceful-timeout", "5", "health_app:app"],
              env={"RS_TEST_HEALTH_VERSION": str(version), "XDG_RUNTIME_DIR": str(short_tmp)},
              args=("--ready-timeout", "8", "--stop-timeout", "5", "--health-path", "/healthz"))
    try:
        before = wait_for(lambda: (a := run.active()) and set(a) == {"primary", "standby"} and a, 60, 0.1,
                          what=f"both active\n{run.log()[-3000:]}")
        with Load(HOST, run.port, concurrency=4, duration=120) as load:
            version.write_text("unhealthy")  # the next version imports and serves, but /healthz says 503
            started = time.monotonic()
            reload = subprocess.run([sys.executable, "-m", "reuseport_standby", "reload", "--service", run.service,
                                     "--control", run.control, "--timeout", "60"],
                                    capture_output=True, text=True, timeout=90, cwd=REPO)
            took = time.monotonic() - started
            assert reload.returncode != 0, reload.stderr
            assert "rolled back" in reload.stderr, reload.stderr
            wait_for(lambda: run.active() == before, 10, 0.1, what=f"the old instances serving\n{run.log()[-3000:]}")
            time.sleep(0.5)
            load.stop()
        print(f"\nreload rolled back after {took:.1f} s; under load: {load.result.summary()}")
        assert load.result.failed == 0, load.result.failures
        assert load.result.ok > 50
        assert set(load.result.served_by) <= {"primary", "standby"} and load.result.served_by["primary"] > 0
    finally:
        run.stop()
