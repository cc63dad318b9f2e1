"""uvicorn instances: accept pacing (a SIGKILL loses only what was being served) and keep-alive drain.

Real supervisor, real uvicorn processes, real TCP on 127.0.0.1; every wait
is bounded.  Each test runs with the feature on and, as the contrast that
shows it can fail, off (``REUSEPORT_STANDBY_ACCEPT_AHEAD=0``,
``REUSEPORT_STANDBY_KEEPALIVE_DRAIN=0``).  Run with ``-s`` for the figures.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections import Counter

import pytest
from helpers.procs import SupervisorProc, wait_for
from helpers.servers import APPS, InstanceProc, gunicorn_cmd
from helpers.uvicorn_runs import CONFIGS

from reuseport_standby import pacing
from reuseport_standby.kernel.sockets import Address
from reuseport_standby.names import ENV_ACCEPT_AHEAD, ENV_KEEPALIVE_DRAIN

AHEAD = 2  # the bound the tests set: small, so that a few idle clients fill it


def _target(sup: SupervisorProc) -> tuple[str, int]:
    a = Address.parse(sup.binds[0])
    return a.host, a.port


def _queued(sup: SupervisorProc, inst: InstanceProc) -> int:
    for i in sup.status()["instances"]:
        if inst.proc is not None and i["pid"] == inst.proc.pid:
            return sum(q["queued"] or 0 for q in i["queues"].values())
    return 0


def _read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status, lower-cased headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"EOF before a response ({len(data)} bytes)")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("EOF inside a body")
        body += chunk
    return int(lines[0].split()[1]), headers, body[:length]


def _outcome(s: socket.socket) -> str:
    """Who answered a request sent on ``s`` ('primary'/'standby'), or how it failed."""
    try:
        with s:
            status, _, body = _read_response(s)
            return json.loads(body)["role"] if status == 200 else f"http_{status}"
    except ConnectionResetError:
        return "reset"
    except OSError as exc:
        return type(exc).__name__


# uvicorn standalone, uvicorn --workers 2, and gunicorn with the stock uvicorn_worker.UvicornWorker (2 workers),
# which our post_worker_init gives the same config (reuseport_standby.gunicorn_workers.adopt)
SERVERS = ["w1", "w2", "gunicorn"]
WORKERS = {"w1": 1, "w2": 2, "gunicorn": 2, "asgi": 2}
#: gunicorn's own ASGI worker (-k asgi) is paced too (reuseport_standby.gunicorn._pace_asgi); it has no
#: keep-alive drain of ours, so it is in the SIGKILL test only
PACED = [*SERVERS, "asgi"]


def _pair(supervisor, instances, server: str, env: dict[str, str], short_tmp) -> tuple[SupervisorProc, InstanceProc]:
    sup = supervisor()
    if server in ("gunicorn", "asgi"):
        worker_class = "uvicorn_worker.UvicornWorker" if server == "gunicorn" else "asgi"
        cmd = gunicorn_cmd("asgi_role:app", "--workers", "2", "--worker-class", worker_class, "--graceful-timeout", "10")
        make = lambda role, e: instances.track(InstanceProc(cmd, sup, role, env={"XDG_RUNTIME_DIR": str(short_tmp),
                                                                                     **e}, cwd=APPS))
    else:
        make = lambda role, e: instances.uvicorn(sup, role, *CONFIGS[server], env=e)
    make("standby", {}).start().wait_active()
    primary = make("primary", env).start().wait_active()
    if WORKERS[server] > 1:
        time.sleep(1.0)  # every worker serving, not just the first (the instance is active with its first)
    return sup, primary


@pytest.mark.parametrize("config", PACED)
@pytest.mark.parametrize("paced", [True, False], ids=["paced", "unpaced"])
def test_sigkill_loses_only_what_was_accepted_ahead(supervisor, instances, short_tmp, config: str, paced: bool) -> None:
    """Clients queued behind a full accept-ahead budget are migrated to the standby when the primary is killed.

    ``AHEAD`` idle connections per worker (connected, nothing sent) fill the
    primary's budget; ``n`` clients then send a slow request.  Paced, they
    wait in the kernel's queue, and after SIGKILL the standby answers every
    one.  Unpaced (the contrast), asyncio accepted them all at once and they
    die with the primary.
    """
    workers = WORKERS[config]
    n = 8
    sup, primary = _pair(supervisor, instances, config, {ENV_ACCEPT_AHEAD: str(AHEAD) if paced else "0"}, short_tmp)
    host, port = _target(sup)
    idle = [socket.create_connection((host, port), timeout=10) for _ in range(AHEAD * workers)]
    time.sleep(0.3)  # accepted (paced: up to the budget, then the primary stops accepting)
    clients = []
    for _ in range(n):
        c = socket.create_connection((host, port), timeout=10)
        c.sendall(f"GET /slow?s=5 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        clients.append(c)
    try:
        wait_for(lambda: _queued(sup, primary) >= n, 2.0, what=f"{n} requests queued on the primary")
    except (TimeoutError, AssertionError, RuntimeError):
        pass  # unpaced: accepted at once, never queued; the outcome below tells
    queued = _queued(sup, primary)
    primary.kill_group()
    outcome = Counter(_outcome(c) for c in clients)
    for s in idle:
        s.close()
    print(f"\n[{config}, {'paced' if paced else 'unpaced'}] {queued} of {n} queued at the SIGKILL: {dict(outcome)}")
    if paced:
        assert outcome == {"standby": n}
    else:
        assert outcome["standby"] == 0, outcome


NEXT_REQUEST_AFTER = 1.2


def _request(s: socket.socket, host: str, path: str = "/") -> None:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())


@pytest.mark.parametrize("config", SERVERS)
@pytest.mark.parametrize("drain", [True, False], ids=["drain", "no-drain"])
def test_keepalive_connections_drain_through_a_graceful_stop(supervisor, instances, short_tmp, config: str,
                                                            drain: bool) -> None:
    """An idle keep-alive connection's next request, sent while the instance stops, is served with Connection: close.

    ``k`` keep-alive clients each get one response from the primary; the
    primary is sent SIGTERM, and each sends its next request
    ``NEXT_REQUEST_AFTER`` later, when every process's shutdown has begun
    (uvicorn ``--workers`` stops its children up to 0.5 s + ``STOP_GRACE``
    after the signal) and within the 3 s drain the test sets.  With the
    drain every one is answered by the primary with ``Connection: close``
    and the connection then closes; without it (the contrast) uvicorn closed
    the idle connections first and every next request fails.
    """
    k = 6
    env = {ENV_KEEPALIVE_DRAIN: "3" if drain else "0"}
    sup, primary = _pair(supervisor, instances, config, env, short_tmp)
    host, port = _target(sup)
    conns = [socket.create_connection((host, port), timeout=10) for _ in range(k)]
    for c in conns:
        _request(c, host)
        status, headers, body = _read_response(c)
        assert status == 200 and json.loads(body)["role"] == "primary"
        assert headers.get("connection", "").lower() != "close"  # keep-alive before the stop
    primary.signal(signal.SIGTERM)
    time.sleep(NEXT_REQUEST_AFTER)
    sent = []
    for c in conns:  # all at once, so that none waits for another's answer
        try:
            _request(c, host)
            sent.append(None)
        except OSError as exc:
            sent.append(exc)
    seen: Counter[str] = Counter()
    for c, failed in zip(conns, sent):
        try:
            if failed is not None:
                raise failed
            status, headers, body = _read_response(c)
            closed = headers.get("connection", "").lower() == "close"
            eof = c.recv(1) == b""  # the server closes after a Connection: close response
            seen[f"{json.loads(body)['role']}{' close' if closed else ''}{' eof' if eof else ''}"] += 1
        except ConnectionResetError:
            seen["reset"] += 1
        except OSError as exc:
            seen[type(exc).__name__] += 1
        finally:
            c.close()
    assert primary.proc is not None
    primary.proc.wait(15)
    print(f"\n[{config}, {'drain' if drain else 'no drain'}] next request on {k} keep-alive connections "
          f"{NEXT_REQUEST_AFTER} s after SIGTERM: {dict(seen)}")
    if drain:
        assert seen == {"primary close eof": k}
    else:
        assert seen["primary close eof"] == 0, seen


# -- the paced listener alone (no supervisor, no kernel program) ------------------------------

class _Echo(asyncio.Protocol):
    made = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        type(self).made += 1
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


@pytest.mark.parametrize("limit", [2, 0], ids=["paced", "asyncio"])
def test_paced_listener_holds_at_most_limit_unread(limit: int) -> None:
    """Silent clients beyond the bound stay in the listener's queue; each first byte lets one more in.

    With ``limit`` 0 (the contrast: asyncio's own ``create_server``) every
    silent client is accepted at once.  Then every client sends, and every
    one is echoed (pacing resumes as connections are read); a pipelined
    second message on the same connection is echoed too.
    """
    n = 5
    _Echo.made = 0

    async def scenario() -> tuple[int, int, list[bytes]]:
        loop = asyncio.get_running_loop()
        pacing.pace(loop, limit)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        server = await loop.create_server(_Echo, sock=listener)
        clients = [socket.create_connection(listener.getsockname(), timeout=5) for _ in range(n)]
        await asyncio.sleep(0.3)
        held = _Echo.made
        unread = getattr(server, "unread", -1)
        echoed = []
        for i, c in enumerate(clients):
            c.setblocking(False)
            await loop.sock_sendall(c, f"a{i};b{i};".encode())
        for c in clients:
            got = b""
            while len(got) < 6:
                got += await asyncio.wait_for(loop.sock_recv(c, 64), 5)
            echoed.append(got)
            c.close()
        server.close()
        return held, unread, echoed

    held, unread, echoed = asyncio.run(scenario())
    print(f"\n[limit {limit}] {held} of {n} silent clients accepted; echoes: {echoed}")
    assert echoed == [f"a{i};b{i};".encode() for i in range(n)]
    if limit:
        assert (held, unread) == (limit, limit)
    else:
        assert held == n


def test_workers_say_connection_close_as_soon_as_the_instance_leaves(supervisor, instances, short_tmp) -> None:
    """uvicorn ``--workers``: a request answered before the children's own shutdown already says Connection: close.

    The main process leaves the slots at SIGTERM but stops its children
    only after ``STOP_GRACE`` and its signal poll; it tells them at once
    (a multiprocessing Event), so a keep-alive client's next request 0.3 s
    after SIGTERM is answered with ``Connection: close`` (not a keep-alive
    promise the shutdown then breaks).
    """
    k = 6
    sup, primary = _pair(supervisor, instances, "w2", {ENV_KEEPALIVE_DRAIN: "3"}, short_tmp)
    host, port = _target(sup)
    conns = [socket.create_connection((host, port), timeout=10) for _ in range(k)]
    for c in conns:
        _request(c, host)
        assert _read_response(c)[1].get("connection", "").lower() != "close"
    primary.signal(signal.SIGTERM)
    time.sleep(0.3)
    for c in conns:
        _request(c, host)
    said = Counter()
    for c in conns:
        with c:
            status, headers, _ = _read_response(c)
            said[f"{status} {headers.get('connection', 'keep-alive').lower()}"] += 1
    print(f"\n[w2] responses 0.3 s after SIGTERM: {dict(said)}")
    assert said == {"200 close": k}


# -- the settings ---------------------------------------------------------------------------

def test_settings_are_checked_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad values name their variable; the drain never outlasts the graceful-shutdown timeout."""
    from reuseport_standby.uvicorn import KEEPALIVE_DRAIN, keepalive_drain

    monkeypatch.delenv(ENV_ACCEPT_AHEAD, raising=False)
    monkeypatch.delenv(ENV_KEEPALIVE_DRAIN, raising=False)
    assert pacing.accept_ahead() == pacing.DEFAULT_ACCEPT_AHEAD
    assert keepalive_drain(None) == KEEPALIVE_DRAIN
    assert keepalive_drain(0.25) == 0.25
    assert pacing.accept_ahead("0") == 0 and keepalive_drain(None, "0") == 0
    for bad in ("-1", "many"):
        with pytest.raises(ValueError, match=ENV_ACCEPT_AHEAD):
            pacing.accept_ahead(bad)
    for bad in ("-1", "soon"):
        with pytest.raises(ValueError, match=ENV_KEEPALIVE_DRAIN):
            keepalive_drain(None, bad)
    loop = asyncio.new_event_loop()
    try:
        assert pacing.pacing_loop_factory(None, 0) is None  # off: uvicorn's own choice of loop, untouched
        assert "create_server" not in vars(pacing.pace(loop, 0))
        assert "create_server" in vars(pacing.pace(loop, 3))
    finally:
        loop.close()
