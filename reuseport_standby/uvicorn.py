"""Run an ASGI app under uvicorn as the primary or standby instance of a service.

uvicorn serves the listening sockets the supervisor hands out
(``Server.run(sockets=...)``, or its multiprocess supervisor for
``workers > 1``, which gives every worker the same sockets).  This module
adds the two moments the supervisor has to hear about:

* **ready means serving.**  uvicorn awaits ``Config.callback_notify`` on a
  server's first tick, which comes after ASGI lifespan startup finished and
  the sockets are being served.  The callback writes the worker's pid to a
  pipe; a thread in the main process activates the instance on the first
  one.  The callback travels inside the pickled Config, so it works for
  spawned workers, ``--factory`` and worker restarts alike.  With
  ``REUSEPORT_STANDBY_HEALTH_PATH``, a process says so only once its app
  answered GET on that path with 2xx, called in its loop with the lifespan
  state (:mod:`reuseport_standby.health_check`).
* **stop means drain.**  The instance leaves its slots, keeps accepting for
  ``STOP_GRACE`` (what was already on its way arrives), and only then lets
  uvicorn close the listeners: single-process, at the start of
  ``Server.shutdown``; with workers, in the main process before it SIGTERMs
  them.  What is still queued when the last copy of a listener closes is
  migrated by the kernel to the other instance, and in-flight requests
  finish (bounded by ``timeout_graceful_shutdown``).

The listeners are owned by the main process for its whole life, so a worker
crash, ``--limit-max-requests`` or a SIGHUP worker restart never closes them:
the instance stays active and its queue waits for the next worker.  A worker
that stops while the listeners stay active (a SIGHUP restart,
``--limit-max-requests``) still accepts until the moment its shutdown starts,
and uvicorn's shutdown closes every connection that has not delivered a
request yet: a request accepted just before would be reset.  The config
given to uvicorn (:class:`StandbyConfig`) therefore wraps the HTTP protocol
so that shutdown waits up to ``FIRST_REQUEST_GRACE`` for such a connection's
first bytes, and serves that request before closing.  The same wrapper drains keep-alive
connections: from the moment the instance leaves its slots every response
says ``Connection: close``, and an idle keep-alive connection is closed only
after ``KEEPALIVE_DRAIN`` seconds without a request.  And the config's loop
factory paces accepts (:mod:`reuseport_standby.pacing`): a process holds at
most ``REUSEPORT_STANDBY_ACCEPT_AHEAD`` unread connections, so what a SIGKILL
would take with it stays in the kernel's queue, where it migrates.

**Worker scope** (``scope="worker"``, ``--scope worker``,
``REUSEPORT_STANDBY_SCOPE=worker``; with ``workers > 1``): every worker
registers with the supervisor on its own and serves listeners of its own.
uvicorn's multiprocess supervisor pickles one socket list to every worker
it spawns (at start, at a restart, for TTIN); in worker scope that list is a
ticket (:class:`WorkerSockets`) which, unpickled in the new worker, registers
it (parent: the main process) and becomes that worker's own listeners.  The
worker's first tick activates its slot; the first close of its listener
(uvicorn's shutdown, for whatever reason it stops) leaves its slot first, and
what is queued migrates to a sibling.  The main process keeps its own
registration, never activated, whose stop takes every worker out at once.

uvicorn is imported here only; the rest of the package does not need it.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from types import FrameType
from typing import Any, NamedTuple

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from .names import ENV_KEEPALIVE_DRAIN, ENV_ROLE, ENV_SCOPE, ENV_SERVICE
from . import health_check, pacing, protocol, recording
from .client import InstanceClient
from .outcomes import RECORDER, Outcomes, Reports
from .errors import ReuseportStandbyError
from .kernel.layout import WORKERS_PER_INSTANCE, Role
from .kernel import seccomp

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR = 0, 1
EXIT_STARTUP_FAILURE = STARTUP_FAILURE  # uvicorn's own: the app never started serving

# After leaving the slots, keep accepting this long before uvicorn's shutdown
# begins, so that what was already on its way (queued, or mid-handshake) is
# served here.  With migration the kernel would hand it to the other
# instance anyway; without it (plain SELECT, kernels before 5.14) this is
# what keeps a SIGTERM from resetting it.
STOP_GRACE = 0.2
#: seconds between two ticks of uvicorn's main loop while a process has no connection and served
#: nothing since the last tick (uvicorn's own: 0.1 s, kept while it serves)
IDLE_TICK = 1.0

# How long uvicorn's shutdown waits for a connection it accepted but has
# heard nothing from yet (see _first_request_grace).
FIRST_REQUEST_GRACE = 1.0

# Once shutdown began, how long an idle keep-alive connection may still
# bring its next request (served with Connection: close) before it is closed:
# a client that sends right after a response is never cut off mid-request.
# Overridden by $REUSEPORT_STANDBY_KEEPALIVE_DRAIN; see docs/uvicorn.md.
KEEPALIVE_DRAIN = 1.0

# uvicorn settings that the supervisor owns, and why each is refused.
REFUSED = {
    "host": "the supervisor owns the addresses: give them to 'reuseport-standby supervise --bind HOST:PORT'",
    "port": "the supervisor owns the addresses: give them to 'reuseport-standby supervise --bind HOST:PORT'",
    "uds": "the supervisor hands out TCP listeners only; a unix socket cannot share a port",
    "fd": "the supervisor hands out the listening sockets; an inherited fd would not be in its group",
    "backlog": "the supervisor sets the listen backlog of every socket it creates: use "
               "'reuseport-standby supervise --backlog N'",
    "reload": "reloading is a development feature, and a primary/standby pair is for production; "
              "use plain 'uvicorn --reload' while developing",
}


def run(
    app: Any,
    *,
    role: Role | str | None = None,
    service: str | None = None,
    control: str | None = None,
    app_dir: str | None = None,
    scope: str | None = None,
    **config: Any,
) -> int:
    """Serve ``app`` as this service's ``role`` instance until SIGTERM/SIGINT; return an exit status.

    ``config`` is any ``uvicorn.Config`` keyword (``workers``, ``factory``,
    ``lifespan``, ``timeout_graceful_shutdown``...) except the ones the
    supervisor owns (see ``REFUSED``).  ``role`` and ``service`` default to
    ``$REUSEPORT_STANDBY_ROLE`` and ``$REUSEPORT_STANDBY_SERVICE``;
    ``control`` to ``$REUSEPORT_STANDBY_CONTROL``; ``scope`` (``"instance"`` or
    ``"worker"``: listeners of its own for every worker) to
    ``$REUSEPORT_STANDBY_SCOPE``, else ``"instance"``.  Returns 0 after a clean
    stop, 1 if the supervisor refused to activate the instance, and 3
    (uvicorn's startup failure) if the app never started serving.
    """
    check_options(config)
    pacing.accept_ahead()  # a bad REUSEPORT_STANDBY_ACCEPT_AHEAD / _KEEPALIVE_DRAIN fails here, not in every worker
    keepalive_drain(None)
    health = health_check.from_env()  # REUSEPORT_STANDBY_HEALTH_PATH: a bad one, one line here
    the_role = resolve_role(role)
    the_service = protocol.check_service(service or os.environ.get(ENV_SERVICE)
                                         or protocol.DEFAULT_SERVICE)
    if app_dir is not None:
        sys.path.insert(0, app_dir)  # as uvicorn.run does; spawned workers inherit sys.path
    user_notify = config.pop("callback_notify", None)
    cfg = StandbyConfig(app, **config)
    if cfg.workers > 1 and not isinstance(app, str):
        raise ValueError("workers > 1 needs the application as an import string ('module:attribute'): "
                         "every worker process imports it itself")
    the_scope = resolve_scope(scope, cfg.workers)

    seccomp.forbid_group_steering()  # the app's own code must not steer the port (docs/security.md)
    client = InstanceClient(the_role, the_service, control=control, name=_instance_name(app, cfg.workers),
                            scope=the_scope)
    sockets = client.open()
    try:
        if client.backlog is not None:
            cfg.backlog = client.backlog  # uvicorn calls listen() again with it: keep the supervisor's
        spawn = multiprocessing.get_context("spawn")
        reader, writer = spawn.Pipe(duplex=False)
        leaving = spawn.Event() if cfg.workers > 1 else None  # workers hear "out of the slots" through it
        address = client.addresses[0]
        # Instance scope with workers: they report their outcomes to this process, whose heartbeats carry the
        # sum; worker scope: each worker's own client reports; a single process reports its own.
        reports = Reports()
        if cfg.workers > 1:
            client.outcomes = reports.total if the_scope == "instance" else None
        cfg.callback_notify = ServingNotice(writer, user_notify, leaving,
                                            None if health is None else (health, address.host, address.port),
                                            report=cfg.workers > 1 and the_scope == "instance")
        activation = Activation(client, per_worker=the_scope == "worker", reports=reports)
        relay = threading.Thread(target=_relay, args=(reader, activation), name="reuseport-standby-ready", daemon=True)
        relay.start()
        try:
            if cfg.workers > 1:
                given = sockets
                if the_scope == "worker":
                    given = WorkerSockets(_WorkerSpec(the_role.value, the_service, client.control_path, os.getpid()))
                assert leaving is not None
                status = _run_workers(cfg, given, activation, leaving)
            else:
                status = _run_single(cfg, sockets, activation)
        finally:
            writer.close()  # the relay sees EOF once no worker holds the other copy
            relay.join(1.0)
            reader.close()
            client.report()  # what the instance served while draining
        return EXIT_ERROR if activation.failed is not None else status
    finally:
        client.close()
        for sock in sockets:
            sock.close()


def check_options(config: dict[str, Any]) -> None:
    """Refuse uvicorn settings that would fight the supervisor (addresses, backlog, reload)."""
    for name, why in REFUSED.items():
        value = config.get(name)
        if value is not None and value is not False:
            raise ValueError(f"uvicorn option '{name}' is not allowed here: {why}")


def resolve_scope(scope: str | None, workers: int) -> str:
    value = scope or os.environ.get(ENV_SCOPE) or "instance"
    if value not in protocol.SCOPES:
        raise ValueError(f"scope must be 'instance' or 'worker', not {value!r}")
    if value == "worker":
        if workers > WORKERS_PER_INSTANCE:
            raise ValueError(f"worker scope gives every worker a slot of its own, and an instance may have at most "
                             f"{WORKERS_PER_INSTANCE} (two instances of a role overlap during a restart): "
                             f"--workers {workers} is too many")
        if workers <= 1:
            log.info("worker scope with a single process is the instance scope")
            return "instance"
    return value


def resolve_role(role: Role | str | None) -> Role:
    value = role if role is not None else os.environ.get(ENV_ROLE)
    if not value:
        raise ValueError("no role given: pass role='primary' or 'standby' (--role), or set REUSEPORT_STANDBY_ROLE")
    return value if isinstance(value, Role) else Role.parse(value)


def _instance_name(app: Any, workers: int) -> str:
    target = app if isinstance(app, str) else getattr(app, "__qualname__", type(app).__qualname__)
    return f"uvicorn {target}{f' ({workers} workers)' if workers > 1 else ''}"[:128]


class StandbyConfig(uvicorn.Config):
    """``uvicorn.Config`` for an instance of a pair: paced accepts, and connections that drain at shutdown.

    It is pickled to spawned workers like any Config (and a gunicorn
    ``UvicornWorker`` adopts the class), so the stock ``Server`` of every
    process that serves uses both:

    * ``get_loop_factory()``: the loop serves the handed-out sockets through
      :mod:`reuseport_standby.pacing` (``REUSEPORT_STANDBY_ACCEPT_AHEAD``);
    * ``load()``: the HTTP protocol lets a just-accepted connection deliver its
      request, and an idle keep-alive connection its next one, at shutdown
      (``REUSEPORT_STANDBY_KEEPALIVE_DRAIN``).
    """

    def load(self) -> None:
        global _loaded_config
        super().load()
        # Count what the app answers (recording.py): around what uvicorn serves, after its ASGI 2 / WSGI adapters
        self.loaded_app = recording.asgi(self.loaded_app)
        self.http_protocol_class = _first_request_grace(
            self.http_protocol_class, keepalive_drain(self.timeout_graceful_shutdown))
        lifespan_class = self.lifespan_class

        def recording_lifespan(config: uvicorn.Config) -> Any:
            # The server passes this object's state to every request: the health check passes it too.
            lifespan = lifespan_class(config)
            self.rs_app_state = lifespan.state
            return lifespan

        self.lifespan_class = recording_lifespan
        _loaded_config = self

    #: the lifespan state of the server serving with this config, once it started (see load())
    rs_app_state: dict[str, Any] | None = None

    def get_loop_factory(self) -> Callable[[], asyncio.AbstractEventLoop] | None:
        return pacing.pacing_loop_factory(super().get_loop_factory(), pacing.accept_ahead())


# The config this process serves with, once loaded (a process runs one server).
_loaded_config: StandbyConfig | None = None


def keepalive_drain(graceful_timeout: float | None, value: str | None = None) -> float:
    """Seconds an idle keep-alive connection may still bring a request once shutdown began.

    ``value``, else ``$REUSEPORT_STANDBY_KEEPALIVE_DRAIN``, else
    ``KEEPALIVE_DRAIN``; never longer than uvicorn's graceful-shutdown timeout,
    which cancels whatever is still running anyway.
    """
    raw = value if value is not None else os.environ.get(ENV_KEEPALIVE_DRAIN)
    try:
        drain = KEEPALIVE_DRAIN if raw is None or raw == "" else float(raw)
    except ValueError:
        raise ValueError(f"{ENV_KEEPALIVE_DRAIN} must be a number of seconds, not {raw!r}") from None
    if drain < 0:
        raise ValueError(f"{ENV_KEEPALIVE_DRAIN} must be 0 or more, not {drain}")
    return drain if graceful_timeout is None else min(drain, float(graceful_timeout))


CLOSE = (b"connection", b"close")


def _announce_close(server_state: Any, cycle: Any) -> None:
    """From now on every response of this process says ``Connection: close``.

    uvicorn copies ``server_state.default_headers`` into each new request
    cycle (and refreshes it only from its main loop, which is over once
    shutdown runs); a cycle whose response has not started yet gets it too.
    A header rather than a silent close after the response: the client then
    knows not to send its next request on this connection.
    """
    headers = getattr(server_state, "default_headers", None)
    if isinstance(headers, list) and CLOSE not in headers:
        server_state.default_headers = headers + [CLOSE]
    if cycle is not None and not getattr(cycle, "response_started", True):
        if CLOSE not in cycle.default_headers:
            cycle.default_headers = cycle.default_headers + [CLOSE]


def _first_request_grace(protocol_class: type[asyncio.Protocol], drain: float) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol whose ``shutdown()`` lets an idle connection bring one more request.

    Stock uvicorn closes an idle connection at once when shutdown begins:
    one accepted an instant earlier, whose request is on its way, is reset,
    and so is a keep-alive client's next request crossing the close.  Here
    an idle connection is given until a deadline (``FIRST_REQUEST_GRACE``
    from its accept if it has sent nothing yet, ``drain`` seconds from the
    shutdown if it has): a request arriving meanwhile is served, with
    ``Connection: close``, then the connection closes; at the deadline it
    closes.  Uses only the asyncio Protocol callbacks and uvicorn's
    ``shutdown()``, ``cycle`` and ``server_state``.
    """

    class FirstRequestGrace(protocol_class):  # type: ignore[valid-type, misc]
        _rs_made_at = 0.0
        _rs_heard = False
        _rs_deadline: float | None = None
        _rs_shutdown_pending = False
        _rs_transport: asyncio.BaseTransport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self._rs_made_at = time.monotonic()
            self._rs_transport = transport
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            self._rs_heard = True
            super().data_received(data)
            if (self._rs_shutdown_pending or _leaving) and self._rs_busy():
                self._rs_shutdown_pending = False
                self.shutdown()  # now with its request under way: served with Connection: close, then closed

        def _rs_busy(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is not None and not cycle.response_complete

        def shutdown(self) -> None:
            transport = self._rs_transport
            if transport is not None and transport.is_closing():
                return
            now = time.monotonic()
            if self._rs_deadline is None:
                self._rs_deadline = (self._rs_made_at + FIRST_REQUEST_GRACE) if not self._rs_heard else now + drain
                _announce_close(getattr(self, "server_state", None), getattr(self, "cycle", None))
            left = self._rs_deadline - now
            if not self._rs_busy() and left > 0:
                if not self._rs_shutdown_pending:
                    self._rs_shutdown_pending = True
                    asyncio.get_running_loop().call_later(left, self._rs_grace_over)
                return
            super().shutdown()

        def _rs_grace_over(self) -> None:
            if self._rs_shutdown_pending:
                self._rs_shutdown_pending = False
                self.shutdown()

    FirstRequestGrace.__name__ = FirstRequestGrace.__qualname__ = f"FirstRequestGrace{protocol_class.__name__}"
    return FirstRequestGrace


class ServingNotice:
    """``Config.callback_notify``: tells the main process that a server is serving.

    uvicorn awaits it from each server's first tick after startup (lifespan
    complete, sockets served) and then every ``timeout_notify`` seconds.  It
    must pickle, since it rides in the Config to spawned workers; the pipe
    end does (multiprocessing passes it to the child at spawn).

    With a health path (``health``: the path and the address the check
    names), the first tick starts a task in the server's loop that calls
    the app until it answers 2xx; only then does the process say it serves.
    """

    def __init__(self, conn: Connection, chained: Callable[[], Awaitable[None]] | None = None,
                 leaving: Any = None, health: tuple[health_check.HealthPath, str, int] | None = None,
                 report: bool = False) -> None:
        self.conn = conn
        self.chained = chained
        self.leaving = leaving  # with workers: a multiprocessing Event set when the instance leaves its slots
        self.health = health
        self.report = report  # instance scope with workers: this worker sends its outcomes to the main process
        self.sent = False
        self._checks: asyncio.Task[None] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_checks": None}

    async def __call__(self) -> None:
        if not self.sent:
            self.sent = True
            if self.report:
                reporter = _Reporter(self.conn)
                threading.Thread(target=reporter.every, args=(REPORT_INTERVAL,), name="reuseport-standby-outcomes",
                                 daemon=True).start()
                atexit.register(reporter.send)  # what it served while draining
            if self.leaving is not None:
                threading.Thread(target=_watch_leaving, args=(self.leaving, asyncio.get_running_loop()),
                                 name="reuseport-standby-leaving", daemon=True).start()
            if self.health is None:
                await self._serving()
            else:
                self._checks = asyncio.get_running_loop().create_task(self._healthy_then_serving(*self.health))
        if self.chained is not None:
            await self.chained()

    async def _serving(self) -> None:
        if _worker_client is not None:  # worker scope: this worker activates its own listeners
            await asyncio.get_running_loop().run_in_executor(None, _activate_worker, _worker_client)
        try:
            self.conn.send(os.getpid())  # a few bytes: one atomic pipe write
        except OSError as exc:
            log.warning("could not tell the main process that worker %d serves: %s", os.getpid(), exc)

    async def _healthy_then_serving(self, target: health_check.HealthPath, host: str, port: int) -> None:
        config = _loaded_config
        if config is None:  # not served through StandbyConfig: nothing to call the app with
            log.error("uvicorn process [%d]: no StandbyConfig loaded, so no health check; serving", os.getpid())
            await self._serving()
            return
        watch = health_check.Watch(target, f"uvicorn process [{os.getpid()}]", log)
        while True:
            verdict = await health_check.check_asgi(recording.unwrapped(config.loaded_app), target, host, port,
                                                    config.rs_app_state, config.root_path)
            if watch.record(verdict):
                break
            await asyncio.sleep(health_check.RETRY_INTERVAL)
        await self._serving()


#: seconds between a worker's reports of its outcomes to the main process (only when they changed)
REPORT_INTERVAL = 1.0


class _Reporter:
    """In an instance-scope worker: its cumulative outcomes, on the pipe that says it serves.

    A message of about 2 KB at most, under PIPE_BUF: one atomic write, never interleaved with
    another worker's.  Sent from a thread of its own, so a main process slow to read never holds
    up serving."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.last: dict[str, Any] | None = None
        self.lock = threading.Lock()

    def every(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            self.send()

    def send(self) -> None:
        # Bounded: the last report at exit never waits long on a periodic one stuck on a full pipe.
        if not self.lock.acquire(timeout=1.0):
            return
        try:
            wire = RECORDER.snapshot().to_wire()
            if wire == self.last:
                return
            try:
                self.conn.send(("outcomes", os.getpid(), wire))
            except (OSError, ValueError):
                return
            self.last = wire
        finally:
            self.lock.release()


# In a worker: True once the instance has left its slots (its main process said so), so that
# every request from then on is answered with Connection: close (see _first_request_grace).
_leaving = False


def _watch_leaving(leaving: Any, loop: asyncio.AbstractEventLoop) -> None:
    """A worker's thread: when the main process leaves the slots, tell this worker's loop.

    uvicorn's multiprocess supervisor stops its workers only after
    ``STOP_GRACE`` and its own signal poll (up to 0.5 s); responses sent
    meanwhile would still promise keep-alive to connections about to close.
    """
    leaving.wait()
    try:
        loop.call_soon_threadsafe(_notice_leaving)
    except RuntimeError:
        pass  # the loop is closed: this worker is gone already


def _notice_leaving() -> None:
    global _leaving
    _leaving = True
    log.info("uvicorn worker [%d]: instance out of the slots; responses say Connection: close", os.getpid())


class Activation:
    """Turns "a server is serving" and "we are stopping" into ready and stop, once each, in that order."""

    def __init__(self, client: InstanceClient, per_worker: bool = False, reports: Reports | None = None) -> None:
        self.client = client
        self.reports = reports if reports is not None else Reports()  # instance scope: the workers' outcomes
        self.per_worker = per_worker  # worker scope: each worker activates itself; this client never does
        self.active = threading.Event()
        self.failed: BaseException | None = None
        self.on_failure: Callable[[], None] = lambda: None
        self._stopping = False
        self._lock = threading.Lock()

    def serving(self, pid: int) -> None:
        with self._lock:
            if self._stopping or self.failed is not None:
                return
            if self.active.is_set() or self.per_worker:
                self.active.set()
                log.info("uvicorn process [%d] serving%s", pid, " its own listeners" if self.per_worker else "")
                return
            try:
                self.client.ready()
            except (ReuseportStandbyError, OSError, RuntimeError) as exc:
                self.failed = exc
                log.error("the supervisor did not activate this %s instance: %s; shutting down",
                          self.client.role.value, exc)
            else:
                self.active.set()
                log.info("uvicorn process [%d] serving: %s instance active", pid, self.client.role.value)
                return
        self.on_failure()

    def stop(self) -> None:
        """Leave the slots (idempotent, never raises): call before any listener stops accepting."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self.client.stop()


def _relay(reader: Connection, activation: Activation) -> None:
    """The workers' messages: a pid (it serves), or ("outcomes", pid, wire) (what it answered so far)."""
    while True:
        try:
            msg = reader.recv()
        except (EOFError, OSError):
            return
        except Exception as exc:  # a message that does not unpickle: dropped, the relay goes on
            log.debug("a worker's message was dropped: %s", exc)
            continue
        if isinstance(msg, int):
            activation.serving(msg)
        elif isinstance(msg, tuple) and len(msg) == 3 and msg[0] == "outcomes" and isinstance(msg[1], int):
            try:
                activation.reports.update(msg[1], Outcomes.from_wire(msg[2]), _pid_exists)
            except ValueError as exc:
                log.debug("a worker's report was dropped: %s", exc)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class _DrainingServer(uvicorn.Server):
    """A single-process server that leaves its slots before it stops accepting."""

    def __init__(self, config: StandbyConfig, before_close: Callable[[], None]) -> None:
        super().__init__(config)
        self._before_close = before_close
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        """uvicorn's main loop (``on_tick``: the date header, exit, --limit-max-requests), but an idle
        process -- a hot standby, most of its life -- wakes once a second instead of ten times; while
        it has connections or served since the last tick, every 0.1 s as uvicorn does.  A stop signal
        wakes it at once (``handle_exit``), so shutdown starts as early as before."""
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        served = self.server_state.total_requests
        should_exit = await self.on_tick(counter)
        while not should_exit:
            busy = bool(self.server_state.connections) or self.server_state.total_requests != served
            served = self.server_state.total_requests
            # on_tick refreshes the date header when the counter is a multiple of 10 (every second)
            counter = (counter + 1 if busy else (counter // 10 + 1) * 10) % 864000
            try:
                await asyncio.wait_for(self._wake.wait(), 0.1 if busy else IDLE_TICK)
            except asyncio.TimeoutError:
                pass
            should_exit = await self.on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)  # no lock taken: safe from a signal handler

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._before_close)
        for connection in list(self.server_state.connections):
            connection.shutdown()  # out of the slots: responses say Connection: close from now on
        await asyncio.sleep(STOP_GRACE)
        await super().shutdown(sockets)


class _DrainingMultiprocess(Multiprocess):
    """uvicorn's worker supervisor, leaving the slots before it stops its workers.

    uvicorn looks at its signals every 0.5 s; the slots are left at once, from
    a thread woken by the signal handler, because a SIGTERM sent to the whole
    process group (systemd's default KillMode, Ctrl-C) stops the workers'
    accepting within 0.1 s.  The main process's copies of the listeners are
    dropped when the workers are told to stop, so the last worker to close
    them is the one whose close migrates the queue.
    """

    def __init__(self, config: StandbyConfig, sockets: list[socket.socket], before_stop: Callable[[], None]) -> None:
        super().__init__(config, sockets)  # installs uvicorn's handlers, which queue the signal
        self._before_stop = before_stop
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, functools.partial(self._on_stop_signal, signal.getsignal(sig)))
        threading.Thread(target=self._stop_when_woken, name="reuseport-standby-stop", daemon=True).start()

    def _on_stop_signal(self, uvicorn_handler: Any, signum: int, frame: FrameType | None) -> None:
        try:
            os.write(self._wake_w, b"!")  # no lock may be taken in a signal handler: a thread does the work
        except OSError:
            pass
        if callable(uvicorn_handler):
            uvicorn_handler(signum, frame)

    def _stop_when_woken(self) -> None:
        try:
            os.read(self._wake_r, 1)
        except OSError:
            return
        self._before_stop()

    def terminate_all(self) -> None:
        self._before_stop()
        time.sleep(STOP_GRACE)  # the workers keep accepting meanwhile
        super().terminate_all()
        for sock in self.sockets:
            sock.close()

    def handle_ttin(self) -> None:
        if isinstance(self.sockets, WorkerSockets) and self.processes_num >= WORKERS_PER_INSTANCE:
            log.error("SIGTTIN ignored: in worker scope an instance has at most %d workers (one slot each)",
                      WORKERS_PER_INSTANCE)
            return
        super().handle_ttin()


# -- worker scope ------------------------------------------------------------------------------

_worker_client: InstanceClient | None = None  # in a worker-scope worker: its own registration

WORKER_STOP_TIMEOUT = 2.0


class _WorkerSpec(NamedTuple):
    role: str
    service: str
    control: str
    parent: int


class WorkerSockets(list):  # type: ignore[type-arg]
    """In worker scope, what uvicorn's multiprocess supervisor hands every worker it spawns.

    Empty in the main process.  Pickled into a worker (spawn), it unpickles as
    that worker's own listeners: the worker registers with the supervisor
    (``parent``: the main process) and receives them.
    """

    def __init__(self, spec: _WorkerSpec) -> None:
        super().__init__()
        self.spec = spec

    def __reduce__(self) -> tuple[Any, ...]:
        return (_open_worker_sockets, (self.spec,))


class _WorkerListener(socket.socket):
    """A worker's own listener: its first ``close()`` leaves the worker's slots before the socket closes."""

    _rs_client: InstanceClient | None = None

    def close(self) -> None:
        client, self._rs_client = self._rs_client, None
        if client is not None:
            client.stop()
        super().close()


def _open_worker_sockets(spec: _WorkerSpec) -> list[socket.socket]:
    """In a freshly spawned worker: register and take listeners of its own."""
    global _worker_client
    client = InstanceClient(spec.role, spec.service, control=spec.control, name="uvicorn worker",
                            parent=spec.parent, connect_timeout=10.0, stop_timeout=WORKER_STOP_TIMEOUT)
    socks = client.open()
    own: list[socket.socket] = []
    for sock in socks:
        listener = _WorkerListener(sock.family, sock.type, sock.proto, fileno=sock.detach())
        listener._rs_client = client
        own.append(listener)
    _worker_client = client
    atexit.register(client.report)  # what it served while draining, after its stop
    return own


def _activate_worker(client: InstanceClient) -> None:
    try:
        client.ready()
    except (ReuseportStandbyError, OSError, RuntimeError) as exc:
        if client.state == "stopped":
            return
        log.error("uvicorn worker [%d] was not activated (%s); it stops, and uvicorn starts another",
                  os.getpid(), exc)
        os.kill(os.getpid(), signal.SIGTERM)


def _run_single(cfg: StandbyConfig, sockets: list[socket.socket], activation: Activation) -> int:
    server = _DrainingServer(cfg, activation.stop)
    activation.on_failure = lambda: setattr(server, "should_exit", True)
    try:
        server.run(sockets=sockets)
    except SystemExit as exc:
        if exc.code == STARTUP_FAILURE:
            return EXIT_STARTUP_FAILURE  # uvicorn logged why
        raise
    except KeyboardInterrupt:
        pass  # uvicorn re-raises a SIGINT it handled, after draining: a clean stop
    finally:
        activation.stop()
    return EXIT_OK if server.started else EXIT_STARTUP_FAILURE


def _run_workers(cfg: StandbyConfig, sockets: list[socket.socket], activation: Activation, leaving: Any) -> int:
    def leave() -> None:
        activation.stop()
        leaving.set()

    supervisor = _DrainingMultiprocess(cfg, sockets, leave)
    activation.on_failure = supervisor.should_exit.set
    try:
        supervisor.run()
    finally:
        activation.stop()
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        return EXIT_STARTUP_FAILURE
    return EXIT_OK
