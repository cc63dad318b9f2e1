"""An idle uvicorn instance wakes once a second, not ten times, and still stops at once (issue 19, item 4).

The integration's server (reuseport_standby.uvicorn._DrainingServer) in a real process on a plain
loopback socket: no supervisor or kernel program is involved in what is measured, so this runs in the
fast tier.  The contrast is uvicorn's own Server in the same harness.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

HARNESS = r"""
import json, signal, socket, sys, time
import uvicorn
from reuseport_standby.uvicorn import StandbyConfig, _DrainingServer

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})

sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen(16)
cfg = StandbyConfig(app, lifespan="off", log_level="warning")
server = _DrainingServer(cfg, lambda: None) if sys.argv[1] == "ours" else uvicorn.Server(cfg)
ticks = []
on_tick = server.on_tick
async def counted(counter):
    ticks.append((time.monotonic(), counter))
    return await on_tick(counter)
server.on_tick = counted
signal.signal(signal.SIGTERM, lambda *_: None)  # what uvicorn re-raises after its drain, so that we report
print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
server.run(sockets=[sock])
print(json.dumps({"ticks": ticks, "stopped": time.monotonic()}), flush=True)
"""


def run_idle(kind: str, idle: float, requests: int = 0,
             connected: bool = False) -> tuple[list[tuple[float, int]], float, float]:
    """(ticks, SIGTERM time, exit time) of a server left idle for ``idle`` seconds after ``requests``
    (``connected``: with a client connected all along, which keeps it busy)."""
    proc = subprocess.Popen([sys.executable, "-c", HARNESS, kind], stdout=subprocess.PIPE, text=True)
    client = None
    try:
        port = json.loads(proc.stdout.readline())["port"]
        for _ in range(requests):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                assert r.read() == b"ok"
        if connected:
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
        start = time.monotonic()
        time.sleep(idle)
        term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if client is not None:
            client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    report = json.loads(out.strip().splitlines()[-1])
    ticks = [(t, c) for t, c in report["ticks"] if t >= start]
    return ticks, term, report["stopped"]


@pytest.mark.parametrize("kind,most", [("ours", 5), ("stock", None)])
def test_an_idle_instance_ticks_once_a_second_and_stops_at_once(kind: str, most: int | None) -> None:
    ticks, term, stopped = run_idle(kind, 3.0, requests=3)
    idle_ticks = [t for t in ticks if t[0] < term]
    print(f"\n[{kind}] {len(idle_ticks)} ticks in 3 s idle; stopped {stopped - term:.2f} s after SIGTERM")
    if most is None:
        assert len(idle_ticks) >= 20, "the contrast: uvicorn's own loop ticks every 0.1 s"
    else:
        assert len(idle_ticks) <= most, idle_ticks
        # the date header is refreshed at every idle (1 s) tick: on_tick does it on multiples of 10
        assert all(c % 10 == 0 for (t, c), (t0, _) in zip(idle_ticks[1:], idle_ticks) if t - t0 > 0.5), idle_ticks
    assert stopped - term < 0.9, f"stopped {stopped - term:.2f} s after SIGTERM"


def test_an_instance_with_a_connection_ticks_as_uvicorn_does() -> None:
    """Busy (a connection open): every 0.1 s, so --limit-max-requests and the rest behave as in uvicorn,
    from the first tick that sees it (at most IDLE_TICK after the connection came)."""
    ticks, term, _ = run_idle("ours", 3.0, connected=True)
    late = [t for t, _ in ticks if term - 1.8 < t < term]
    assert len(late) >= 14, ticks
