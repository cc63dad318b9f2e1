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
  spawned workers, ``--factory`` and worker restarts alike.
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
first bytes, and serves that request before closing.

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

from .names import ENV_ROLE, ENV_SCOPE, ENV_SERVICE
from . import protocol
from .client import InstanceClient
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

# How long uvicorn's shutdown waits for a connection it accepted but has
# heard nothing from yet (see _first_request_grace).
FIRST_REQUEST_GRACE = 1.0

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
        reader, writer = multiprocessing.get_context("spawn").Pipe(duplex=False)
        cfg.callback_notify = ServingNotice(writer, user_notify)
        activation = Activation(client, per_worker=the_scope == "worker")
        relay = threading.Thread(target=_relay, args=(reader, activation), name="reuseport-standby-ready", daemon=True)
        relay.start()
        try:
            if cfg.workers > 1:
                given = sockets
                if the_scope == "worker":
                    given = WorkerSockets(_WorkerSpec(the_role.value, the_service, client.control_path, os.getpid()))
                status = _run_workers(cfg, given, activation)
            else:
                status = _run_single(cfg, sockets, activation)
        finally:
            writer.close()  # the relay sees EOF once no worker holds the other copy
            relay.join(1.0)
            reader.close()
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
    """``uvicorn.Config`` whose HTTP protocol lets a just-accepted connection deliver its request at shutdown.

    It is pickled to spawned workers like any Config, so the workers' stock
    ``Server`` loads the wrapped protocol too.
    """

    def load(self) -> None:
        super().load()
        self.http_protocol_class = _first_request_grace(self.http_protocol_class)


def _first_request_grace(protocol_class: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol whose ``shutdown()`` spares connections with nothing received yet.

    Uses only the asyncio Protocol callbacks and uvicorn's ``shutdown()``:
    a connection that has received no byte for less than
    ``FIRST_REQUEST_GRACE`` seconds gets ``shutdown()`` again when its first
    data arrives or the grace ends, whichever comes first.
    """

    class FirstRequestGrace(protocol_class):  # type: ignore[valid-type, misc]
        _rs_made_at = 0.0
        _rs_heard = False
        _rs_shutdown_pending = False
        _rs_transport: asyncio.BaseTransport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self._rs_made_at = time.monotonic()
            self._rs_transport = transport
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            self._rs_heard = True
            super().data_received(data)
            if self._rs_shutdown_pending:
                self._rs_shutdown_pending = False
                self.shutdown()  # now with its request under way: served, then closed

        def shutdown(self) -> None:
            transport = self._rs_transport
            if transport is not None and transport.is_closing():
                return
            left = FIRST_REQUEST_GRACE - (time.monotonic() - self._rs_made_at)
            if not self._rs_heard and left > 0:
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
    """

    def __init__(self, conn: Connection, chained: Callable[[], Awaitable[None]] | None = None) -> None:
        self.conn = conn
        self.chained = chained
        self.sent = False

    async def __call__(self) -> None:
        if not self.sent:
            self.sent = True
            if _worker_client is not None:  # worker scope: this worker activates its own listeners
                await asyncio.get_running_loop().run_in_executor(None, _activate_worker, _worker_client)
            try:
                self.conn.send(os.getpid())  # a few bytes: one atomic pipe write
            except OSError as exc:
                log.warning("could not tell the main process that worker %d serves: %s", os.getpid(), exc)
        if self.chained is not None:
            await self.chained()


class Activation:
    """Turns "a server is serving" and "we are stopping" into ready and stop, once each, in that order."""

    def __init__(self, client: InstanceClient, per_worker: bool = False) -> None:
        self.client = client
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
    while True:
        try:
            pid = reader.recv()
        except (EOFError, OSError):
            return
        activation.serving(pid)


class _DrainingServer(uvicorn.Server):
    """A single-process server that leaves its slots before it stops accepting."""

    def __init__(self, config: StandbyConfig, before_close: Callable[[], None]) -> None:
        super().__init__(config)
        self._before_close = before_close

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._before_close)
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


def _run_workers(cfg: StandbyConfig, sockets: list[socket.socket], activation: Activation) -> int:
    supervisor = _DrainingMultiprocess(cfg, sockets, activation.stop)
    activation.on_failure = supervisor.should_exit.set
    try:
        supervisor.run()
    finally:
        activation.stop()
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        return EXIT_STARTUP_FAILURE
    return EXIT_OK
