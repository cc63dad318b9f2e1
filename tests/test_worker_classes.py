"""uvicorn's gunicorn workers by their stock names get our shutdown behaviour from our hooks.

``post_worker_init`` gives any worker that serves through a ``uvicorn.Config``
our :class:`~reuseport_standby.uvicorn.StandbyConfig`
(:func:`reuseport_standby.gunicorn_workers.adopt`).  The fast tests check the
adoption on real worker objects; the kernel test shows, with real gunicorn
masters on loopback, what it changes at a SIGTERM, and its contrast (the same
hooks, with the stock config put back) what a stock worker does instead.
(Failover under load of every worker class: tests/test_gunicorn.py,
tests/test_worker_scope.py.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import uvicorn_worker
from gunicorn.config import Config as GunicornConfig
from gunicorn.glogging import Logger
from gunicorn.workers.sync import SyncWorker

from helpers.procs import SupervisorProc
from helpers.servers import APPS, InstanceProc, gunicorn_cmd
from reuseport_standby import gunicorn_workers
from reuseport_standby.kernel.sockets import Address
from reuseport_standby.names import ENV_ACCEPT_AHEAD, ENV_KEEPALIVE_DRAIN
from reuseport_standby.uvicorn import FIRST_REQUEST_GRACE, StandbyConfig


def _worker(cls: type) -> Any:
    cfg = GunicornConfig()
    return cls(1, os.getpid(), [], None, 30, cfg, Logger(cfg))


# -- adoption, on real worker objects ---------------------------------------------------------

def _deprecated_uvicorn_worker() -> type:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from uvicorn.workers import UvicornWorker
    return UvicornWorker


@pytest.mark.parametrize("cls", [uvicorn_worker.UvicornWorker, uvicorn_worker.UvicornH11Worker,
                                 _deprecated_uvicorn_worker()],
                         ids=["uvicorn_worker", "uvicorn_worker-h11", "uvicorn.workers"])
def test_stock_uvicorn_workers_are_adopted(cls: type) -> None:
    worker = _worker(cls)
    assert gunicorn_workers.is_uvicorn_worker_class(cls)
    assert type(worker.config) is uvicorn.Config
    fields = dict(vars(worker.config))
    assert gunicorn_workers.adopt(worker)
    assert type(worker.config) is StandbyConfig
    assert vars(worker.config) == fields  # same settings (keep-alive, notify, limit_max_requests...)
    assert gunicorn_workers.adopt(worker)  # idempotent
    assert type(worker.config) is StandbyConfig


def test_a_projects_own_config_subclass_keeps_its_overrides() -> None:
    class Tuned(uvicorn.Config):
        def tuned(self) -> str:
            return "kept"

    worker = _worker(uvicorn_worker.UvicornWorker)
    worker.config.__class__ = Tuned
    assert gunicorn_workers.adopt(worker)
    assert isinstance(worker.config, StandbyConfig) and isinstance(worker.config, Tuned)
    assert worker.config.tuned() == "kept"


def test_other_workers_are_left_alone() -> None:
    worker = _worker(SyncWorker)
    assert not gunicorn_workers.is_uvicorn_worker_class(SyncWorker)
    assert not gunicorn_workers.adopt(worker)
    assert not hasattr(worker, "config")


def test_our_class_name_still_works() -> None:
    worker = _worker(gunicorn_workers.UvicornWorker)
    assert gunicorn_workers.is_uvicorn_worker_class(gunicorn_workers.UvicornWorker)
    assert type(worker.config) is StandbyConfig


def test_bad_settings_are_found_in_the_master(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked by on_starting (one line, the master exits) rather than when a worker boots."""
    monkeypatch.setenv(ENV_ACCEPT_AHEAD, "many")
    monkeypatch.setenv(ENV_KEEPALIVE_DRAIN, "-1")
    problems = gunicorn_workers.check_settings()
    assert len(problems) == 2 and ENV_ACCEPT_AHEAD in problems[0] and ENV_KEEPALIVE_DRAIN in problems[1]
    monkeypatch.delenv(ENV_ACCEPT_AHEAD)
    monkeypatch.delenv(ENV_KEEPALIVE_DRAIN)
    assert gunicorn_workers.check_settings() == []


# -- a request sent just after SIGTERM, on a connection accepted before it -------------------

# The contrast: our hooks, with the stock uvicorn config put back after post_worker_init.
STOCK_CONFIG = """\
from reuseport_standby.conf import *
from reuseport_standby import gunicorn as _rs
import uvicorn


def _stock(worker):
    worker.config.__class__ = uvicorn.Config


post_worker_init = _rs.compose(_rs.post_worker_init, _stock)
"""

ACCEPTED_BEFORE = 0.2  # connect, then SIGTERM this much later: the workers have accepted
SENT_AFTER = 0.45  # SIGTERM, then the request: the workers' shutdown has begun (uvicorn ticks every 0.1 s)


def _outcome(s: socket.socket) -> str:
    try:
        with s:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    return "eof"
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n")
                           if line.startswith(b"content-length:")), 0)
            while len(body) < length:
                chunk = s.recv(65536)
                if not chunk:
                    return "truncated"
                body += chunk
            closes = b"connection: close" in head.lower()
            return f"{json.loads(body.decode())['role']}{' close' if closes else ''}"
    except ConnectionResetError:
        return "reset"
    except (OSError, ValueError) as exc:
        return type(exc).__name__


@pytest.mark.kernel
@pytest.mark.parametrize("stock", [False, True], ids=["adopted", "stock-config"])
def test_stock_uvicorn_worker_serves_a_request_sent_just_after_sigterm(supervisor, short_tmp: Path,
                                                                       stock: bool) -> None:
    """``-k uvicorn_worker.UvicornWorker`` with our config: a connection accepted before SIGTERM is served.

    ``k`` clients connect to the primary and send nothing yet; the primary
    is sent SIGTERM ``ACCEPTED_BEFORE`` later and the clients send their
    request ``SENT_AFTER`` after that, within ``FIRST_REQUEST_GRACE`` of the
    accept.  Adopted, every one is answered by the primary with
    ``Connection: close``.  With the stock config (the contrast), uvicorn's
    shutdown closed every connection without a request at once, and every
    request fails: what, under load, resets a request accepted an instant
    before the shutdown.
    """
    assert ACCEPTED_BEFORE + SENT_AFTER < FIRST_REQUEST_GRACE
    k = 6
    sup: SupervisorProc = supervisor()
    config = "python:reuseport_standby.conf"
    if stock:
        conf = short_tmp / "stock_uvicorn_conf.py"
        conf.write_text(STOCK_CONFIG)
        config = str(conf)

    def make(role: str, config: str) -> InstanceProc:
        cmd = gunicorn_cmd("asgi_role:app", "--workers", "2", "--worker-class", "uvicorn_worker.UvicornWorker",
                           "--graceful-timeout", "10", config=config)
        return InstanceProc(cmd, sup, role, env={"XDG_RUNTIME_DIR": str(short_tmp)}, cwd=APPS)

    standby = make("standby", "python:reuseport_standby.conf").start().wait_active()
    primary = make("primary", config).start().wait_active()
    try:
        time.sleep(1.0)  # both workers serving
        a = Address.parse(sup.binds[0])
        conns = [socket.create_connection((a.host, a.port), timeout=10) for _ in range(k)]
        time.sleep(ACCEPTED_BEFORE)
        primary.signal(signal.SIGTERM)
        time.sleep(SENT_AFTER)
        for c in conns:
            try:
                c.sendall(f"GET / HTTP/1.1\r\nHost: {a.host}\r\n\r\n".encode())
            except OSError:
                pass  # the outcome says how it failed
        seen = Counter(_outcome(c) for c in conns)
        assert primary.proc is not None
        primary.proc.wait(15)
    finally:
        primary.stop()
        standby.stop()
    print(f"\n[{'stock config' if stock else 'adopted'}] {k} requests sent {SENT_AFTER} s after SIGTERM on "
          f"connections accepted before it: {dict(seen)}")
    if stock:
        assert not seen["primary close"] and not seen["primary"], seen
        assert sum(seen.values()) == k and not seen["standby"], seen
    else:
        assert seen == {"primary close": k}, f"{seen}\n{primary.log()[-3000:]}"


@pytest.mark.kernel
@pytest.mark.parametrize("worker_class", ["uvicorn_worker.UvicornWorker", "asgi"])
def test_a_bad_uvicorn_setting_stops_the_master_with_one_line(supervisor, short_tmp: Path, worker_class: str) -> None:
    """Checked in the master: else every worker would fail its boot on it, and gunicorn fork another."""
    sup: SupervisorProc = supervisor()
    cmd = gunicorn_cmd("asgi_role:app", "--workers", "2", "--worker-class", worker_class)
    inst = InstanceProc(cmd, sup, "primary", env={"XDG_RUNTIME_DIR": str(short_tmp), ENV_ACCEPT_AHEAD: "many"},
                        cwd=APPS).start()
    assert inst.proc is not None
    try:
        code = inst.proc.wait(30)
    finally:
        inst.stop()
    log = inst.log()
    assert code == 1, log
    assert f"{ENV_ACCEPT_AHEAD} must be a whole number" in log and "Traceback" not in log, log
    assert not [i for i in sup.status()["instances"] if i["state"] == "active"]
