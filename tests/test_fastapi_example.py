"""examples/fastapi_app, run with the commands its README gives, through restarts under load.

The same shape as the Starlette example's test (tests/test_uvicorn.py): a real supervisor, the two
instances as real ``reuseport-standby uvicorn`` processes with FastAPI's lifespan warm-up, real
clients on 127.0.0.1 opening a new connection per request.
"""

from __future__ import annotations

import http.client
import json
import re
import shlex
import signal
import time
from pathlib import Path

import pytest
from helpers.procs import REPO, SupervisorProc
from helpers.servers import InstanceProc
from helpers.uvicorn_runs import Instances

from reuseport_standby.kernel.sockets import Address
from reuseport_standby.loadgen import Load

EXAMPLE = REPO / "examples" / "fastapi_app"
CONCURRENCY = 6


def readme_commands(readme: Path) -> dict[str, list[str]]:
    """The ``reuseport-standby uvicorn`` command of each role, as the README shows it."""
    found = {}
    for line in readme.read_text().splitlines():
        m = re.fullmatch(r"\s*(reuseport-standby uvicorn --role (primary|standby) .+)", line)
        if m:
            found[m.group(2)] = shlex.split(m.group(1))
    assert set(found) == {"primary", "standby"}, f"{readme} lacks a primary or a standby command"
    return found


def request(host: str, port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"content-type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.kernel
def test_fastapi_example_serves_through_restarts(supervisor, instances: Instances) -> None:
    """SIGTERM the primary, the standby, the primary again under load: every request is answered."""
    pytest.importorskip("fastapi")
    commands = readme_commands(EXAMPLE / "README.md")
    sup: SupervisorProc = supervisor()
    address = Address.parse(sup.binds[0])
    host, port = address.host, address.port
    env = {"WARMUP_SECONDS": "1"}  # the README's 3 s, shortened to keep the suite quick

    def start(role: str) -> InstanceProc:
        return instances.track(InstanceProc(commands[role], sup, role, env=env, cwd=EXAMPLE)).start()

    running = {role: start(role).wait_active() for role in ("standby", "primary")}
    status, hello = request(host, port, "GET", "/")
    assert status == 200 and hello["role"] == "primary" and hello["message"] == "hello", hello
    with Load(host, port, concurrency=CONCURRENCY, duration=90) as load:
        time.sleep(0.3)
        for role in ("primary", "standby", "primary"):
            running[role].stop(signal.SIGTERM)
            running[role] = start(role).wait_active()
            time.sleep(0.3)
    result = load.result
    print(f"\n[example fastapi_app] {result.summary()}")
    assert result.failed == 0 and result.max_latency < 1.0, result.summary()
    assert result.ok > 100
    status, order = request(host, port, "POST", "/orders", {"item": "tea", "quantity": 2})
    assert status == 200 and order["accepted"] == {"item": "tea", "quantity": 2}, order
    status, invalid = request(host, port, "POST", "/orders", {"quantity": "many"})
    assert status == 422, invalid  # FastAPI's own validation, unchanged by the integration
