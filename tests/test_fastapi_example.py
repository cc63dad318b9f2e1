"""examples/fastapi_app, run with the commands its README gives, through restarts under load.

The same shape as the Starlette example's test (tests/test_uvicorn.py): a real supervisor, the two
instances as real ``reuseport-standby uvicorn`` processes with FastAPI's lifespan warm-up, real
clients on 127.0.0.1 opening a new connection per request.  The contrast: the same app as two plain
``SO_REUSEPORT`` uvicorns (bench/plain_uvicorn.py), the same SIGTERM under the same load, loses
requests.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers.procs import REPO, SupervisorProc
from helpers.uvicorn_runs import Instances, restart_example

from reuseport_standby.kernel.sockets import Address
from reuseport_standby.loadgen import Load

EXAMPLE = REPO / "examples" / "fastapi_app"
CONCURRENCY = 6


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
    sup: SupervisorProc = supervisor()
    result = restart_example(sup, instances, EXAMPLE, CONCURRENCY)
    address = Address.parse(sup.binds[0])
    host, port = address.host, address.port
    status, hello = request(host, port, "GET", "/")
    assert status == 200 and hello["role"] == "primary" and hello["message"] == "hello", hello
    print(f"\n[example fastapi_app] {result.summary()}")
    assert result.failed == 0 and result.max_latency < 1.0, result.summary()
    assert result.ok > 100
    status, order = request(host, port, "POST", "/orders", {"item": "tea", "quantity": 2})
    assert status == 200 and order["accepted"] == {"item": "tea", "quantity": 2}, order
    status, invalid = request(host, port, "POST", "/orders", {"quantity": "many"})
    assert status == 422, invalid  # FastAPI's own validation, unchanged by the integration


def _plain_uvicorn(port: int) -> subprocess.Popen:
    """The example app under plain uvicorn on a SO_REUSEPORT socket of its own: no supervisor, no BPF."""
    env = {**os.environ, "WARMUP_SECONDS": "1", "PYTHONPATH": os.pathsep.join([str(EXAMPLE), str(REPO)])}
    # Through runpy, not as a script: a script's own directory comes first on sys.path, and bench/ has an app.py.
    run = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    return subprocess.Popen([sys.executable, "-c", run, str(REPO / "bench" / "plain_uvicorn.py"), "127.0.0.1", str(port),
                             "app:app", "--workers", "2", "--timeout-graceful-shutdown", "20"], cwd=EXAMPLE, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_for_new_pid(port: int, known: set[int], timeout: float = 20.0) -> None:
    """Until a worker we have not seen answers: the restarted instance serves (the kernel hashes to it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, body = request("127.0.0.1", port, "GET", "/")
        except OSError:
            status, body = 0, {}
        if status == 200 and body["pid"] not in known:
            return
        if status == 200:
            known.add(body["pid"])
        time.sleep(0.05)
    raise AssertionError(f"no new worker answered on {port} within {timeout} s")


def test_contrast_plain_reuseport_loses_requests_at_the_same_sigterm() -> None:
    """Without the supervisor's program, SIGTERM of one of two plain SO_REUSEPORT uvicorns resets the
    connections the kernel kept hashing to its listener while it shut down.  Up to 5 restarts, stopping
    at the first loss; bounded in time by the load's own duration."""
    from conftest import free_port

    port = free_port()
    procs = {role: _plain_uvicorn(port) for role in ("primary", "standby")}
    known: set[int] = set()
    try:
        _wait_for_new_pid(port, known)
        with Load("127.0.0.1", port, concurrency=CONCURRENCY, duration=120) as load:
            time.sleep(0.3)
            for _ in range(5):
                procs["primary"].send_signal(signal.SIGTERM)
                procs["primary"].wait(30)
                procs["primary"] = _plain_uvicorn(port)
                _wait_for_new_pid(port, known)
                time.sleep(0.3)
                if load.result.failed:
                    break
        result = load.result
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    print(f"\n[plain SO_REUSEPORT, fastapi_app] {result.summary()}")
    assert result.failed > 0, result.summary()
