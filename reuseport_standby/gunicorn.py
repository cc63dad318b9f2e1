"""The gunicorn integration: listeners from the supervisor, ready when serving, leave before draining.

Used through :mod:`reuseport_standby.conf` (``gunicorn -c python:reuseport_standby.conf app:app``);
the hooks here are plain functions so that a project's own gunicorn config
can import them and :func:`compose` them with its own.

- **Listeners.**  When the config is imported, the gunicorn master registers
  with the supervisor and binds the sockets it receives as ``fd://N``.
  gunicorn adopts them and keeps them across its own HUP reloads.
- **Ready means serving.**  Every gunicorn worker calls ``Worker.notify()``
  (its heartbeat) from its serving loop, never before: sync and gthread
  once their listeners are polled, ``uvicorn_worker.UvicornWorker`` only
  after ASGI lifespan startup and ``create_server``.  The first heartbeat of
  a worker writes its pid to a pipe; a thread in the master reads it and
  asks the supervisor to activate the instance.  With
  ``REUSEPORT_STANDBY_HEALTH_PATH``, a worker reports only once its app
  answered GET on that path with 2xx (:mod:`reuseport_standby.health_check`).
- **Leave before draining.**  ``Arbiter.stop()`` is where every shutdown
  (SIGTERM, SIGINT, SIGQUIT, a halt after a boot failure) closes the
  listeners and signals the workers.  It is wrapped so the instance first
  leaves its slots: nothing new arrives, what is queued migrates when the
  last copy of the listener closes, what was accepted completes.  Workers
  close their copies as soon as their serving loop returns, so the queue
  does not wait for their interpreters to tear down.
- **uvicorn workers** (``uvicorn_worker.UvicornWorker`` and its kin, by
  their stock names).  ``post_worker_init`` gives their uvicorn config our
  class before they serve (:mod:`reuseport_standby.gunicorn_workers`): a
  connection accepted just before a shutdown is served, not reset; accepts
  are paced; idle keep-alive connections drain.
- **Worker scope** (``REUSEPORT_STANDBY_SCOPE=worker``).  Every worker is a
  client of the supervisor of its own: in ``post_fork`` it registers (with
  the master's pid as its parent) and serves listeners of its own instead of
  the master's, which are never activated.  Its first heartbeat activates its
  own slot; the moment it begins to exit (``alive`` turns false: SIGTERM,
  SIGQUIT, ``max_requests``) it leaves its slot, and what is queued on its
  listener when that closes migrates to a sibling.  The master's stop takes
  every worker out of the traffic at once.
"""

from __future__ import annotations

import _thread
import asyncio
import fcntl
import functools
import inspect
import json
import logging
import os
import signal
import struct
import sys
import termios
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .names import ENV_CONNECT_TIMEOUT, ENV_CONTROL, ENV_ROLE, ENV_SCOPE, ENV_SERVICE
from . import health_check, protocol, recording
from .client import InstanceClient
from .outcomes import RECORDER, Outcomes, Reports
from .errors import ReuseportStandbyError
from .kernel.layout import WORKERS_PER_INSTANCE, Role
from .kernel import seccomp

if TYPE_CHECKING:
    import socket

    from gunicorn.arbiter import Arbiter
    from gunicorn.workers.base import Worker

log = logging.getLogger(__name__)


# A worker-scope worker: how long it waits for the supervisor when it starts (gunicorn
# kills a worker that has not booted within its timeout anyway), and for the answer to
# 'stop' when it begins to exit.
WORKER_CONNECT_TIMEOUT = 10.0
WORKER_STOP_TIMEOUT = 2.0

#: seconds between a worker's reports of its outcomes to the master (instance scope; only when they changed)
REPORT_INTERVAL = 1.0
#: workers whose last report the master keeps apart; beyond it, those of exited workers are summed into one
REPORTS_KEPT = 256
#: a report line's prefix on the ready pipe ("O <pid> <outcomes json>\n"); a pid alone says "serving"
_REPORT = b"O "
_PIPE_BUF = 4096  # what one write to a pipe moves atomically (POSIX: at least 512; Linux: 4096)

WORKER_BOOT_ERROR = 3  # gunicorn.arbiter.Arbiter.WORKER_BOOT_ERROR: the master halts on it
_HOOK_MARK = "__reuseport_standby_hook__"


class ConfigurationError(ReuseportStandbyError, RuntimeError):
    """gunicorn settings that would defeat the integration.

    A RuntimeError so that gunicorn prints just the message and exits 1.
    """

    see = "instance-settings-refused"


@dataclass(frozen=True)
class Settings:
    """Where this instance belongs, from the environment."""

    role: Role
    service: str = protocol.DEFAULT_SERVICE
    control: str | None = None
    connect_timeout: float = 30.0
    scope: str = "instance"
    health: health_check.HealthPath | None = None  # REUSEPORT_STANDBY_HEALTH_PATH: 2xx there before traffic

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        role = env.get(ENV_ROLE, "")
        if not role:
            raise ConfigurationError(
                f"{ENV_ROLE} is not set: start gunicorn with {ENV_ROLE}=primary or {ENV_ROLE}=standby")
        try:
            parsed_role = Role.parse(role)
        except ValueError as exc:
            raise ConfigurationError(f"{ENV_ROLE}: {exc}") from None
        try:
            service = protocol.check_service(env.get(ENV_SERVICE) or protocol.DEFAULT_SERVICE)
        except ValueError as exc:
            raise ConfigurationError(f"{ENV_SERVICE}: {exc}") from None
        try:
            timeout = float(env.get(ENV_CONNECT_TIMEOUT, "30"))
        except ValueError:
            raise ConfigurationError(f"{ENV_CONNECT_TIMEOUT} must be a number of seconds") from None
        scope = env.get(ENV_SCOPE) or "instance"
        if scope not in protocol.SCOPES:
            raise ConfigurationError(f"{ENV_SCOPE} must be 'instance' (one set of listeners per gunicorn) or "
                                     f"'worker' (one per worker), not {scope!r}")
        try:
            health = health_check.from_env(env)
        except health_check.HealthPathError as exc:
            raise ConfigurationError(str(exc)) from None
        return cls(role=parsed_role, service=service, control=env.get(ENV_CONTROL) or None, connect_timeout=timeout,
                   scope=scope, health=health)


class GunicornInstance:
    """This gunicorn master's membership in its service: one per master process."""

    def __init__(self, settings: Settings, client: InstanceClient, fds: list[int]) -> None:
        self.settings = settings
        self.client = client
        self.fds = fds
        self._owner = os.getpid()
        self._server: Arbiter | None = None
        self._ready_r = -1
        self._ready_w = -1
        self.worker_client: InstanceClient | None = None  # worker scope, in a worker: its own
        self._health_task: asyncio.Task[None] | None = None  # an ASGI worker's checks, until healthy
        # Instance scope, in the master: every worker's last report (cumulative), and those of exited workers
        # summed, so the instance's total never goes down.  Read by the heartbeat thread.
        self.reports = Reports(REPORTS_KEPT)
        client.outcomes = None if self.worker_scope else self.workers_outcomes

    @property
    def worker_scope(self) -> bool:
        return self.settings.scope == "worker"

    @classmethod
    def open(cls, settings: Settings) -> "GunicornInstance":
        """Register with the supervisor and take this instance's listeners."""
        seccomp.forbid_group_steering()  # before the app is imported (docs/security.md, "Program integrity")
        client = InstanceClient(settings.role, settings.service, control=settings.control, name="gunicorn",
                                connect_timeout=settings.connect_timeout, scope=settings.scope)
        socks = client.open()
        # gunicorn dups each fd://N and closes N, so the socket objects must let go of them.
        return cls(settings, client, [s.detach() for s in socks])

    @property
    def binds(self) -> list[str]:
        return [f"fd://{fd}" for fd in self.fds]

    @property
    def control_socket(self) -> str:
        """A path for gunicorn's own control socket (gunicorn >= 25) that is this instance's alone.

        gunicorn's default is one path per user, so a primary and a standby
        would take it from each other, and the first to exit would unlink
        the other's.  Same directory as gunicorn's default, one name per
        service and role.
        """
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        base = runtime if runtime and os.path.isdir(runtime) else os.path.join(os.path.expanduser("~"), ".gunicorn")
        return os.path.join(base, f"gunicorn-{self.settings.service}-{self.settings.role.value}.ctl")

    # -- master ---------------------------------------------------------------------
    def attach(self, server: "Arbiter") -> None:
        """In the master, before listeners exist: check settings, wire ready and stop."""
        if self._server is not None:
            return
        problems = self.problems(server)
        if problems:
            message = "reuseport-standby cannot run this gunicorn:\n  - " + "\n  - ".join(problems)
            if server.cfg.errorlog != "-" or server.cfg.daemon:
                server.log.error(message)  # gunicorn prints the exception to stderr, which may be gone
            if server.pidfile is not None:
                server.pidfile.unlink()
            raise ConfigurationError(message)
        self._server = server
        self._open_ready_pipe()
        server.stop = self._leave_first(server.stop)
        if self.worker_scope:
            server.handle_ttin = self._bounded_ttin(server, server.handle_ttin)
        server.log.info("reuseport-standby: %s instance %s of service %s on %s; active once a worker serves%s%s",
                        self.client.role.value, self.client.instance_id, self.client.service,
                        ", ".join(map(str, self.client.addresses)),
                        "" if self.settings.health is None else f" and answers GET {self.settings.health} with 2xx",
                        " (worker scope: every worker has listeners of its own)" if self.worker_scope else "")

    def problems(self, server: "Arbiter") -> list[str]:
        """What in gunicorn's final settings would make it misbehave with these listeners."""
        cfg = server.cfg
        found = []
        if cfg.daemon or os.getpid() != self._owner:
            found.append("daemon mode forks the master away from its supervisor connection: run gunicorn in the "
                         "foreground (systemd, a container, supervisord) and drop --daemon / daemon = True")
        if cfg.reuse_port:
            found.append("reuse_port = True gives every worker a socket of its own and ignores the supervisor's: "
                         "drop --reuse-port / reuse_port")
        bind = list(cfg.bind)
        if sorted(bind) != sorted(self.binds):
            others = [b for b in bind if b not in self.binds]
            found.append(f"gunicorn was given bind {others or bind} instead of the supervisor's listeners "
                         f"{self.binds}: the supervisor owns the addresses (reuseport-standby supervise --bind), "
                         f"so drop -b/--bind, bind = ... and any bind in GUNICORN_CMD_ARGS")
        if os.environ.get("GUNICORN_FD") or os.environ.get("GUNICORN_PID"):
            found.append("this master was re-executed by USR2, which cannot keep supervisor listeners: "
                         "restart the instance instead (the other instance carries the traffic meanwhile)")
        if os.environ.get("LISTEN_FDS") and os.environ.get("LISTEN_PID") == str(os.getpid()):
            found.append("systemd socket activation (LISTEN_FDS) would replace the supervisor's listeners: "
                         "remove the .socket unit from this service")
        if not getattr(cfg.post_worker_init, _HOOK_MARK, False):
            found.append("post_worker_init is not reuseport-standby's, so this instance would never become ready: "
                         "keep yours with post_worker_init = reuseport_standby.gunicorn.compose("
                         "reuseport_standby.gunicorn.post_worker_init, your_hook)")
        if _is_uvicorn_worker_class(cfg.worker_class) or _is_asgi_worker_class(cfg.worker_class):
            from .gunicorn_workers import check_settings

            found.extend(check_settings())
        if self.worker_scope:
            if cfg.workers > WORKERS_PER_INSTANCE:
                found.append(f"{ENV_SCOPE}=worker gives every worker a slot of its own, and an instance may have at "
                             f"most {WORKERS_PER_INSTANCE} (two instances of a role overlap during a restart): "
                             f"--workers {cfg.workers} is too many; use at most {WORKERS_PER_INSTANCE}, or the "
                             f"instance scope")
            if not getattr(cfg.post_fork, _HOOK_MARK, False):
                found.append("post_fork is not reuseport-standby's, so in worker scope the workers would never get "
                             "listeners of their own: keep yours with post_fork = reuseport_standby.gunicorn.compose("
                             "reuseport_standby.gunicorn.post_fork, your_hook)")
        return found

    def _bounded_ttin(self, server: "Arbiter", handle_ttin: Callable[[], None]) -> Callable[[], None]:
        @functools.wraps(handle_ttin)
        def handle_ttin_bounded() -> None:
            if server.num_workers >= WORKERS_PER_INSTANCE:
                server.log.error("reuseport-standby: TTIN ignored: in worker scope an instance has at most %d "
                                 "workers (one slot each)", WORKERS_PER_INSTANCE)
                return
            handle_ttin()

        return handle_ttin_bounded

    def _open_ready_pipe(self) -> None:
        self._ready_r, self._ready_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._ready_w, False)  # a worker must never wait on the master
        threading.Thread(target=self._read_ready_pipe, name="reuseport-standby-ready", daemon=True).start()

    def _read_ready_pipe(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._ready_r, 512)
            except OSError:
                return
            if not chunk:
                return
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > _PIPE_BUF:
                pending = b""  # no line is this long: never buffer without bound
            for line in lines:
                if line.isdigit():
                    self._worker_serving(int(line))
                elif line.startswith(_REPORT):
                    self._worker_report(line[len(_REPORT):])

    def _worker_report(self, line: bytes) -> None:
        """A worker's cumulative outcomes: "<pid> <json>".  A line that does not parse is dropped."""
        pid_text, _, wire = line.partition(b" ")
        try:
            pid = int(pid_text)
            outcomes = Outcomes.from_wire(json.loads(wire))
        except ValueError as exc:
            log.debug("reuseport-standby: a worker's report was dropped: %s", exc)
            return
        self.reports.update(pid, outcomes, lambda p: p in (getattr(self._server, "WORKERS", None) or {}))

    def workers_outcomes(self) -> Outcomes:
        """What this instance's workers answered, the exited ones included (the master's heartbeats carry it)."""
        return self.reports.total()

    def flush_reports(self, wait: float = 0.5) -> None:
        """In the master, workers gone: take the reports still in the pipe, and send the sum a last time."""
        deadline = time.monotonic() + wait
        buf = bytearray(4)
        while self._ready_r >= 0 and time.monotonic() < deadline:
            try:
                fcntl.ioctl(self._ready_r, termios.FIONREAD, buf)
            except OSError:
                break
            if struct.unpack("i", buf)[0] == 0:
                time.sleep(0.02)  # the reader may still be on its last line
                break
            time.sleep(0.01)
        self.client.report()

    def _worker_serving(self, pid: int) -> None:
        if self.client.state != "pending":
            log.debug("reuseport-standby: worker %d is serving", pid)
            return
        log.info("reuseport-standby: worker %d is serving; activating this instance", pid)
        try:
            self.client.ready()
        except RuntimeError:
            return  # the instance began to stop in the meantime
        except (ReuseportStandbyError, OSError) as exc:
            log.error("reuseport-standby: the supervisor did not activate this instance (%s); shutting down "
                      "so that it can be restarted", exc)
            os.kill(self._owner, signal.SIGTERM)

    def _leave_first(self, stop: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(stop)
        def leave_then_stop(graceful: bool = True) -> None:
            self.leave()
            stop(graceful)

        return leave_then_stop

    def leave(self) -> None:
        """Leave the slots: no new connection arrives; the listeners keep serving their queue."""
        if self.client.state in ("pending", "active"):
            self.client.stop()

    def close(self) -> None:
        if not self.worker_scope:
            self.flush_reports()
        self.client.close()

    # -- workers ----------------------------------------------------------------------
    def watch(self, worker: "Worker") -> None:
        """In a worker whose app is loaded, before its serving loop.

        Reports the worker's first heartbeat (it serves), and closes its
        listener copies the moment its serving loop returns.  With a health
        path, a worker reports only once its app answers it with 2xx: a
        WSGI worker checks before its serving loop (where the app is loaded
        and nothing else runs), an ASGI worker in its event loop after
        lifespan startup, from the first heartbeat on.
        """
        heartbeat = worker.notify
        run = worker.run
        own = self.worker_client
        health = self.settings.health
        asgi = _is_uvicorn_worker_class(type(worker)) or _is_asgi_worker_class(type(worker))

        def report() -> None:
            if own is not None:
                self._activate_worker(worker, own)
                return
            try:
                os.write(self._ready_w, b"%d\n" % os.getpid())
            except OSError as exc:
                log.warning("reuseport-standby: could not tell the master that worker %d serves: %s", os.getpid(), exc)

        def first_heartbeat() -> None:
            worker.notify = heartbeat
            heartbeat()
            if health is not None and asgi:
                self._health_task = asyncio.get_running_loop().create_task(
                    self._asgi_healthy_then(worker, health, report))
                return
            report()

        def run_then_release() -> None:
            try:
                if health is not None and not asgi:
                    self._wsgi_healthy(worker, health, heartbeat)
                run()
            finally:
                self.release(worker)
                if own is not None:
                    own.report()  # what it served while draining
                else:
                    self._report_to_master()

        if own is None:
            threading.Thread(target=self._report_every, args=(REPORT_INTERVAL,), name="reuseport-standby-outcomes",
                             daemon=True).start()
        worker.notify = first_heartbeat
        worker.run = run_then_release  # gunicorn calls self.run() right after post_worker_init
        if own is not None:
            _leave_when_exiting(worker, own)

    def _check_address(self) -> tuple[str, int]:
        address = self.client.addresses[0]
        return address.host, address.port

    def _wsgi_healthy(self, worker: "Worker", target: health_check.HealthPath, heartbeat: Callable[[], None]) -> None:
        """Before a WSGI worker's serving loop: call the app until it answers 2xx, or the worker is told to exit.

        gunicorn's own heartbeat goes on meanwhile, so the arbiter does not take
        the wait for a hang; a single check that hangs is ended by its
        ``--timeout`` (the worker is killed, and another forked)."""
        host, port = self._check_address()
        watch = health_check.Watch(target, f"worker {os.getpid()}", log)
        script_name = os.environ.get("SCRIPT_NAME", "")
        while worker.alive:
            heartbeat()
            if watch.record(health_check.check_wsgi(recording.unwrapped(worker.wsgi), target, host, port,
                                                    script_name)):
                return
            time.sleep(health_check.RETRY_INTERVAL)

    async def _asgi_healthy_then(self, worker: "Worker", target: health_check.HealthPath,
                                 report: Callable[[], None]) -> None:
        """In an ASGI worker's loop, after lifespan startup: check until 2xx, then report it serves."""
        try:
            app, state, root_path = _asgi_target(worker)
        except AttributeError as exc:  # a worker class that keeps its app elsewhere: say so, take no traffic
            log.error("reuseport-standby: worker %d cannot call its app for the health check (%s); it takes no "
                      "traffic", os.getpid(), exc)
            return
        host, port = self._check_address()
        watch = health_check.Watch(target, f"worker {os.getpid()}", log)
        while worker.alive:
            verdict = await health_check.check_asgi(app, target, host, port, state, root_path)
            if watch.record(verdict):
                report()
                return
            await asyncio.sleep(health_check.RETRY_INTERVAL)
    def _report_every(self, interval: float) -> None:
        """A worker's thread (instance scope): its cumulative outcomes to the master, when they changed."""
        while True:
            time.sleep(interval)
            self._report_to_master()

    _last_report: bytes = b""

    def _report_to_master(self) -> None:
        line = b"%s%d %s\n" % (_REPORT, os.getpid(),
                               json.dumps(RECORDER.snapshot().to_wire(), separators=(",", ":")).encode())
        if line == self._last_report or len(line) > _PIPE_BUF:
            return  # unchanged; or too long to be written atomically (cannot happen: at most ~2 KB)
        try:
            os.write(self._ready_w, line)  # non-blocking: a full pipe drops this report, the next one catches up
        except OSError:
            return
        self._last_report = line

    @staticmethod
    def release(worker: "Worker") -> None:
        """In a worker that is done serving: close its copies of the listeners now.

        A stopping instance's queue migrates when the last copy of its
        listener closes.  Left to the interpreter, a worker's copies close
        only once it has torn down (hundreds of milliseconds for a Django
        app), and the queue waits that long.  Listeners the master still
        holds (HUP, worker recycling) stay open.
        """
        for sock in worker.sockets:
            try:
                sock.close()  # in worker scope, leaves the worker's slot first (_WorkerListener)
            except OSError:
                pass

    # -- worker scope ---------------------------------------------------------------------
    def open_worker(self, worker: "Worker") -> None:
        """In a freshly forked worker (``post_fork``): register as a worker and take listeners of its own.

        The master's listeners, inherited by the fork, are closed here: they are
        never activated in worker scope.  Failing to reach the supervisor ends
        the worker with status 1 (not gunicorn's boot error, which would halt
        the master): gunicorn forks another.
        """
        _patch_first(worker)
        client = InstanceClient(self.settings.role, self.settings.service, control=self.settings.control,
                                name=f"gunicorn worker {worker.age}", parent=self._owner,
                                connect_timeout=min(WORKER_CONNECT_TIMEOUT, self.settings.connect_timeout),
                                stop_timeout=WORKER_STOP_TIMEOUT)
        try:
            socks = client.open()
        except (ReuseportStandbyError, OSError) as exc:
            worker.log.error("reuseport-standby: worker %d got no listeners of its own: %s", os.getpid(), exc)
            time.sleep(1.0)  # gunicorn forks a replacement at once: do not spin
            raise SystemExit(1) from None
        for inherited in worker.sockets:
            inherited.close()
        worker.sockets = [_WorkerListener.wrap(sock, worker, client) for sock in socks]
        self.worker_client = client

    def _activate_worker(self, worker: "Worker", client: InstanceClient) -> None:
        """The worker's first heartbeat (it serves): put its own listeners into slots."""
        try:
            reply = client.ready()
        except (ReuseportStandbyError, OSError, RuntimeError) as exc:
            if client.state != "stopped":
                worker.log.error("reuseport-standby: worker %d was not activated (%s); it exits, and gunicorn "
                                 "forks another", os.getpid(), exc)
            worker.alive = False
            return
        worker.log.debug("reuseport-standby: worker %d active in slots %s", os.getpid(), reply.get("slots"))

    def _after_fork_in_child(self) -> None:
        if self._ready_r >= 0:
            os.close(self._ready_r)  # only the master reads; workers only write
            self._ready_r = -1


_current: GunicornInstance | None = None
_current_lock = threading.Lock()


def current() -> GunicornInstance:
    """This process's instance, registering with the supervisor on first use.

    Idempotent, so a config file that gunicorn re-executes on HUP does not
    register a second time.
    """
    global _current
    with _current_lock:
        if _current is None:
            _current = GunicornInstance.open(Settings.from_env())
        return _current


def _after_fork_in_child() -> None:
    if _current is not None:
        _current._after_fork_in_child()


def _patch_first(worker: "Worker") -> None:
    """A gevent worker: monkeypatch before the worker's supervisor client makes its socket and thread.

    gevent patches in the worker's ``init_process``, after ``post_fork``; a
    thread started before that breaks when it ends (gevent's documented
    rule: patch before anything else).  gunicorn's own patch then finds
    everything patched already.
    """
    ggevent = sys.modules.get("gunicorn.workers.ggevent")
    if ggevent is not None and isinstance(worker, ggevent.GeventWorker):
        from gevent import monkey

        monkey.patch_all()


def _leave_when_exiting(worker: "Worker", client: InstanceClient) -> None:
    """Leave the worker's slots the moment it begins to exit.

    Every gunicorn worker says so by setting ``alive`` to false: on SIGTERM,
    SIGQUIT or SIGINT (in the signal handler), and when ``max_requests`` is
    reached.  The worker's class is swapped for a subclass whose ``alive``
    setter starts the ``stop()`` in a thread, a greenlet in a gevent worker
    (never blocking a signal handler on I/O); closing the listeners (``release``) waits for it, so the worker
    has left its slots before its queue migrates.
    """
    started: list[bool] = []

    def leave() -> None:
        # Not threading.Thread().start(): it waits for the thread to start, which a signal handler
        # running inside gevent's hub may not do.  (A greenlet once gevent has patched _thread.)
        if not started:
            started.append(True)
            _thread.start_new_thread(client.stop, ())

    base = type(worker)

    class Leaving(base):  # type: ignore[misc, valid-type]
        @property
        def alive(self) -> bool:
            return self.__dict__.get("_rs_alive", True)

        @alive.setter
        def alive(self, value: bool) -> None:
            self.__dict__["_rs_alive"] = value
            if not value:
                leave()

    Leaving.__name__ = Leaving.__qualname__ = base.__name__
    worker.__dict__["_rs_alive"] = worker.__dict__.pop("alive", True)
    worker.__class__ = Leaving


def _listener_classes() -> tuple[type, type]:
    from gunicorn.sock import TCP6Socket, TCPSocket

    class Listener4(_WorkerListener, TCPSocket):
        pass

    class Listener6(_WorkerListener, TCP6Socket):
        pass

    return Listener4, Listener6


class _WorkerListener:
    """A worker's own listener, as gunicorn's workers take them (``gunicorn.sock.TCPSocket``).

    ``close()`` leaves the worker's slots first: whichever code path closes
    a listener (the sync worker's release, gthread's end of drain, uvicorn's
    shutdown), the supervisor has stopped routing here before the queue
    migrates to a sibling.
    """

    _rs_client: InstanceClient | None = None

    @classmethod
    def wrap(cls, sock: "socket.socket", worker: "Worker", client: InstanceClient) -> Any:
        import socket as _socket

        v4, v6 = _listener_classes()
        kind = v6 if sock.family == _socket.AF_INET6 else v4
        addr = sock.getsockname()[:2]
        listener = kind(addr, worker.cfg, worker.log, fd=sock.detach())
        listener._rs_client = client
        return listener

    def close(self) -> None:
        client, self._rs_client = self._rs_client, None
        if client is not None:
            client.stop()
        super().close()  # type: ignore[misc]


os.register_at_fork(after_in_child=_after_fork_in_child)


class _ToGunicornErrorLog(logging.Handler):
    """Send this package's records to gunicorn's error log, at gunicorn's level."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger("gunicorn.error")
        if record.levelno >= target.getEffectiveLevel():
            target.handle(record)


def _route_logging() -> None:
    pkg = logging.getLogger(__package__ or "reuseport_standby")
    if pkg.handlers or logging.getLogger().handlers:
        return  # the app or the operator configured logging already
    pkg.addHandler(_ToGunicornErrorLog())
    pkg.setLevel(logging.DEBUG)
    pkg.propagate = False


def _hook(fn: Callable[..., None]) -> Callable[..., None]:
    setattr(fn, _HOOK_MARK, True)
    return fn


@_hook
def on_starting(server: "Arbiter") -> None:
    """gunicorn hook (master, settings final, no listeners yet)."""
    _route_logging()
    current().attach(server)


@_hook
def post_fork(server: "Arbiter", worker: "Worker") -> None:
    """gunicorn hook (worker, just forked): in worker scope, listeners of the worker's own."""
    if _current is not None and _current.worker_scope:
        _current.open_worker(worker)


@_hook
def post_worker_init(worker: "Worker") -> None:
    """gunicorn hook (worker, app loaded, before its serving loop)."""
    if _current is None or _current._ready_w < 0:
        log.critical("reuseport-standby: this worker cannot report that it serves, because the master did not "
                     "run reuseport-standby's on_starting hook; keep yours with on_starting = "
                     "reuseport_standby.gunicorn.compose(reuseport_standby.gunicorn.on_starting, your_hook)")
        sys.exit(WORKER_BOOT_ERROR)
    _standby_uvicorn(worker)
    _pace_asgi(worker)
    _record(worker)
    _current.watch(worker)


def _record(worker: "Worker") -> None:
    """Count what the worker's app answers (reuseport_standby/recording.py), by what serves it.

    sync, gthread, gevent and eventlet call ``worker.wsgi``; gunicorn's ``-k asgi`` serves
    ``worker.asgi`` (read per connection and by its lifespan, after this hook); a uvicorn worker
    serves through its config, whose ``StandbyConfig.load()`` wraps the app uvicorn loaded (after
    its ASGI 2/WSGI adapters).  tornado's worker may serve a tornado app: left alone.
    """
    cls = type(worker)
    if _is_uvicorn_worker_class(cls):
        return
    if _is_asgi_worker_class(cls):
        worker.asgi = recording.asgi(worker.asgi)  # type: ignore[attr-defined]
        return
    gtornado = sys.modules.get("gunicorn.workers.gtornado")
    if gtornado is not None and issubclass(cls, gtornado.TornadoWorker):
        return
    worker.wsgi = recording.wsgi(worker.wsgi)


def _is_uvicorn_worker_class(cls: type) -> bool:
    if "uvicorn" not in sys.modules:
        return False  # no uvicorn worker class was loaded
    from .gunicorn_workers import is_uvicorn_worker_class

    return is_uvicorn_worker_class(cls)


def _standby_uvicorn(worker: "Worker") -> None:
    """A uvicorn worker (stock ``uvicorn_worker.UvicornWorker`` included) gets our shutdown, pacing and drain."""
    if _is_uvicorn_worker_class(type(worker)):
        from .gunicorn_workers import adopt

        if adopt(worker):
            log.debug("reuseport-standby: worker %d serves through StandbyConfig", os.getpid())


def _is_asgi_worker_class(cls: type) -> bool:
    """gunicorn's own ASGI worker (``-k asgi``), paced like uvicorn's, or a subclass."""
    gasgi = sys.modules.get("gunicorn.workers.gasgi")
    return gasgi is not None and isinstance(cls, type) and issubclass(cls, gasgi.ASGIWorker)


def _asgi_target(worker: "Worker") -> tuple[Any, dict[str, Any] | None, str]:
    """(app, lifespan state, root_path) of an ASGI worker, as its server passes them to a request."""
    if _is_asgi_worker_class(type(worker)):  # gunicorn's -k asgi: worker.state is its lifespan state
        return (recording.unwrapped(worker.asgi), getattr(worker, "state", None),
                getattr(worker.cfg, "root_path", "") or "")
    config = worker.config  # a uvicorn worker, adopted: StandbyConfig.load() recorded the lifespan state
    return recording.unwrapped(config.loaded_app), getattr(config, "rs_app_state", None), config.root_path


def _pace_asgi(worker: "Worker") -> None:
    """gunicorn's own ASGI worker (``-k asgi``) serves each listener with ``loop.create_server(sock=...)`` on
    a loop it made before this hook: paced, it takes at most REUSEPORT_STANDBY_ACCEPT_AHEAD unread
    connections from the kernel's queue (0, the default: as it does by itself; reuseport_standby/pacing.py)."""
    if not _is_asgi_worker_class(type(worker)):
        return
    from . import pacing

    limit = pacing.accept_ahead()
    if limit:
        pacing.pace(worker.loop, limit)
        log.debug("reuseport-standby: asgi worker %d accepts at most %d unread connections", os.getpid(), limit)


@_hook
def on_exit(server: "Arbiter") -> None:
    """gunicorn hook (master, workers gone)."""
    if _current is not None:
        _current.close()


HOOKS: dict[str, Callable[..., None]] = {"on_starting": on_starting, "post_fork": post_fork,
                                          "post_worker_init": post_worker_init, "on_exit": on_exit}


def _arity(fn: Callable[..., Any]) -> int:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds for p in inspect.signature(fn).parameters.values())


def compose(*hooks: Callable[..., Any]) -> Callable[..., None]:
    """One gunicorn hook that calls ``hooks`` in order, e.g. reuseport-standby's and a project's own.

    gunicorn checks a hook's arity, so all must take the same number of
    arguments, and the result keeps that signature.
    """
    if not hooks:
        raise TypeError("compose() needs at least one hook")
    arity = _arity(hooks[0])
    for h in hooks[1:]:
        if _arity(h) != arity:
            raise TypeError(f"cannot compose {getattr(h, '__name__', h)!r}: it takes {_arity(h)} arguments, "
                            f"{getattr(hooks[0], '__name__', hooks[0])!r} takes {arity}")

    def composed(*args: Any) -> None:
        for h in hooks:
            h(*args)

    composed.__signature__ = inspect.signature(hooks[0])  # type: ignore[attr-defined]
    composed.__name__ = "+".join(getattr(h, "__name__", "hook") for h in hooks)
    composed.__qualname__ = composed.__name__
    composed.__doc__ = f"gunicorn hook composed of {composed.__name__}"
    if any(getattr(h, _HOOK_MARK, False) for h in hooks):
        setattr(composed, _HOOK_MARK, True)
    return composed
