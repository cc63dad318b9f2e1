"""``reuseport-standby run``: a supervisor, a primary and a standby from one command.

The runner starts the supervisor as a child (the only process that needs
privileges), then a primary and a standby copy of the user's server command
with the integration injected (:mod:`reuseport_standby.wrap`).  It restarts an
instance that dies, with backoff, and reports a crash loop instead of
hiding it.  A rolling reload (SIGHUP, or ``reuseport-standby reload``)
replaces the standby and then the primary, each by starting the new instance
first and stopping the old one only once the new one is active, so one
instance of each role serves throughout, and a new version that never
becomes ready is rolled back with the old one still serving.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from .names import ENV_CONTROL, ENV_GENERATION, ENV_ROLE, ENV_SERVICE
from . import client, protocol
from .errors import ProtocolError, ReuseportStandbyError, SupervisorUnavailable
from .kernel.layout import Role
from .status import instance_state
from .supervisor.options import SuperviseOptions
from .wrap import instance_command

log = logging.getLogger(__name__)

#: seconds a peer of the reload socket has to send its request, and to take each message of the reply
RELOAD_IO_TIMEOUT = 10.0


@dataclass
class RunConfig:
    """``run``: the supervisor to start (its options), the server command, and how long instances get."""

    supervisor: SuperviseOptions
    command: list[str]
    ready_timeout: float = 60.0
    stop_timeout: float = 30.0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def service(self) -> str:
        return self.supervisor.service


def run_socket_path(control_path: str) -> str:
    """Where a runner listens for ``reload``: next to the supervisor's control socket."""
    base = control_path[:-5] if control_path.endswith(".sock") else control_path
    return base + ".run.sock"


class InstanceFailed(ReuseportStandbyError):
    """A new instance exited or did not become ready in time."""


@dataclass
class Managed:
    """One running instance process."""

    role: Role
    proc: subprocess.Popen
    started: float
    generation: int
    stopping: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid


class Runner:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.control = cfg.supervisor.control_path
        self.run_path = run_socket_path(self.control)
        self.current: dict[Role, Managed | None] = {Role.PRIMARY: None, Role.STANDBY: None}
        self.crashes: dict[Role, list[float]] = {Role.PRIMARY: [], Role.STANDBY: []}
        self.next_start: dict[Role, float] = {Role.PRIMARY: 0.0, Role.STANDBY: 0.0}
        self._generation = 0
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._reloading = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._supervisor: subprocess.Popen | None = None
        self._server: socket.socket | None = None
        self._reload_requested = False
        self._orphans: list[tuple[int, float]] = []
        self.workdir = tempfile.mkdtemp(prefix="reuseport-standby-run-")

    # -- supervisor ------------------------------------------------------------------------
    def start_supervisor(self) -> None:
        # The control path is fixed here: the instances are told it, whatever the environment says.
        cmd = replace(self.cfg.supervisor, control=self.control).command()
        self._supervisor = subprocess.Popen(cmd)
        deadline = time.monotonic() + 30
        while True:
            if self._supervisor.poll() is not None:
                raise ReuseportStandbyError(f"the supervisor exited with status {self._supervisor.returncode} (see its log above)")
            try:
                client.query(self.cfg.service, "ping", self.control, timeout=1)
                return
            except SupervisorUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _check_supervisor(self) -> None:
        """A dead supervisor is restarted at once; traffic flows meanwhile (pins, live sockets)."""
        if self._supervisor is not None and self._supervisor.poll() is not None and not self._stopping.is_set():
            log.error("supervisor exited with status %s; restarting it (instances keep serving)", self._supervisor.returncode)
            self.start_supervisor()

    # -- instances ---------------------------------------------------------------------------
    def spawn(self, role: Role) -> Managed:
        self._generation += 1
        env = {**os.environ, **self.cfg.extra_env, ENV_ROLE: role.value,
               ENV_SERVICE: self.cfg.service, ENV_CONTROL: self.control,
               ENV_GENERATION: str(self._generation)}
        cmd = instance_command(self.cfg.command, self.workdir)
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        log.info("started %s (generation %d, pid %d): %s", role.value, self._generation, proc.pid, " ".join(cmd))
        return Managed(role, proc, time.monotonic(), self._generation)

    def instance_state(self, pid: int) -> str | None:
        try:
            st = client.query(self.cfg.service, "status", self.control)["status"]
        except (SupervisorUnavailable, ProtocolError, OSError):
            return None
        return instance_state(st, pid)

    def wait_ready(self, m: Managed, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m.proc.poll() is not None:
                raise InstanceFailed(f"new {m.role.value} (pid {m.pid}) exited with status {m.proc.returncode} before it was ready")
            if self.instance_state(m.pid) == "active":
                return
            time.sleep(0.05)
        raise InstanceFailed(f"new {m.role.value} (pid {m.pid}) was not ready within {timeout:.0f} s")

    def terminate(self, m: Managed, timeout: float | None = None) -> None:
        """SIGTERM (the integration leaves its slots first, then drains), SIGKILL the group if it lingers."""
        m.stopping = True
        timeout = self.cfg.stop_timeout if timeout is None else timeout
        if m.proc.poll() is None:
            m.proc.send_signal(signal.SIGTERM)
            try:
                m.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s pid %d did not stop within %.0f s; killing its process group", m.role.value, m.pid, timeout)
        try:
            os.killpg(m.pid, signal.SIGKILL)  # the master is gone; no worker may linger
        except (ProcessLookupError, PermissionError):
            pass
        m.proc.wait()

    def start_role(self, role: Role) -> Managed:
        m = self.spawn(role)
        with self._lock:
            self.current[role] = m
        return m

    def _retire_orphans(self, m: Managed) -> None:
        """A dead master may leave workers behind: let them finish what they hold, then make sure.

        They get no new connections (the master's control connection is gone,
        so its slots were cleared); SIGTERM lets each finish its request,
        and SIGKILL follows after the stop timeout.
        """
        try:
            os.killpg(m.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return
        self._orphans.append((m.pid, time.monotonic() + self.cfg.stop_timeout))

    def _kill_overdue_orphans(self, force: bool = False) -> None:
        now = time.monotonic()
        keep = []
        for pgid, deadline in self._orphans:
            alive = True
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                alive = False
            if alive and (force or now >= deadline):
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            elif alive:
                keep.append((pgid, deadline))
        self._orphans = keep

    def _reap(self) -> None:
        """Restart instances that died on their own, with backoff; report crash loops."""
        now = time.monotonic()
        for role in Role:
            with self._lock:
                m = self.current[role]
                if m is not None and not m.stopping and m.proc.poll() is not None:
                    lived = now - m.started
                    log.error("%s (pid %d) exited with status %s after %.1f s", role.value, m.pid, m.proc.returncode, lived)
                    self._retire_orphans(m)
                    self.crashes[role] = [t for t in self.crashes[role] if now - t < 60] + [now]
                    n = len(self.crashes[role])
                    backoff = min(30.0, 0.5 * 2 ** (n - 1)) if lived < 10 else 0.5
                    if n >= 5:
                        log.error("%s is crash-looping: %d exits in 60 s; next start in %.0f s", role.value, n, backoff)
                    self.next_start[role] = now + backoff
                    self.current[role] = None
                if self.current[role] is None and now >= self.next_start[role] and not self._stopping.is_set():
                    self.current[role] = self.spawn(role)

    # -- rolling reload --------------------------------------------------------------------------
    def reload(self) -> dict[str, Any]:
        """Replace the standby, then the primary; roll back a new instance that fails."""
        if not self._reloading.acquire(blocking=False):
            raise ReuseportStandbyError("a reload is already in progress")
        try:
            t0 = time.monotonic()
            done = []
            for role in (Role.STANDBY, Role.PRIMARY):
                with self._lock:
                    old = self.current[role]
                new = self.spawn(role)
                try:
                    self.wait_ready(new, self.cfg.ready_timeout)
                except InstanceFailed as exc:
                    self.terminate(new, timeout=5)
                    log.error("reload rolled back: %s; the old %s keeps serving", exc, role.value)
                    raise
                with self._lock:
                    self.current[role] = new
                if old is not None:
                    self.terminate(old)
                done.append({"role": role.value, "pid": new.pid, "generation": new.generation})
                log.info("reload: new %s pid %d is serving", role.value, new.pid)
            return {"ok": True, "replaced": done, "seconds": round(time.monotonic() - t0, 2)}
        finally:
            self._reloading.release()

    # -- control socket for `reuseport-standby reload` ------------------------------------------
    def _bind_run_socket(self) -> None:
        self._server = protocol.listen_unix(self.run_path, "'reuseport-standby run'", backlog=8)
        self._sel.register(self._server, selectors.EVENT_READ, "run")

    def _serve_reload(self, conn: socket.socket) -> None:
        """Answer one ``reload`` request, in a thread of its own (a reload takes a while).

        Every request gets a reply, also one that is not a JSON object or that
        fails in an unforeseen way; a reply longer than one message (a long
        error, a big result) travels in chunks, as the supervisor's do, and
        ``request_reload`` joins them.  A peer that sends nothing, or does not
        read, is given up after RELOAD_IO_TIMEOUT.
        """
        def work() -> None:
            with conn:
                conn.settimeout(RELOAD_IO_TIMEOUT)
                reply = self._reload_reply(conn)
                if reply is None:
                    return
                try:
                    protocol.send_reply(conn, reply)
                except (ProtocolError, TypeError, ValueError) as exc:  # cannot be encoded, even in chunks
                    log.error("the reply to a reload request could not be encoded: %s", exc)
                    try:
                        protocol.send_reply(conn, protocol.error_reply("internal", f"the reply could not be encoded: {exc}"))
                    except OSError:
                        pass
                except OSError:
                    pass  # the peer went away or did not read: the reload itself is done either way

        threading.Thread(target=work, name="reload", daemon=True).start()

    def _reload_reply(self, conn: socket.socket) -> dict[str, Any] | None:
        """Read the request and do the reload; the reply to send (None: the peer left without asking)."""
        try:
            raw, fds, truncated = protocol.recv(conn)
        except OSError:  # nothing within RELOAD_IO_TIMEOUT, or the peer reset
            return None
        for fd in fds:
            os.close(fd)
        if not raw and not truncated:
            return None
        if truncated:
            return protocol.error_reply("too_large", f"a request is at most {protocol.MAX_MESSAGE} bytes, without fds")
        try:
            msg = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            return protocol.error_reply("malformed", f"not a UTF-8 JSON message: {exc}")
        if not isinstance(msg, dict) or msg.get("op") != "reload":
            return protocol.error_reply("unknown_op", "this socket takes only {\"op\": \"reload\"}")
        try:
            return self.reload()
        except InstanceFailed as exc:
            return protocol.error_reply("rolled_back", str(exc))
        except (ReuseportStandbyError, ValueError, OSError) as exc:
            return protocol.error_reply("failed", str(exc))
        except Exception as exc:  # whatever went wrong, `reload` hears of it instead of a closed connection
            log.exception("reload failed")
            return protocol.error_reply("internal", f"{type(exc).__name__}: {exc}")

    # -- main loop --------------------------------------------------------------------------------
    def run(self) -> int:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda *_: self._stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self._stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "_reload_requested", True))
        self.start_supervisor()
        self._bind_run_socket()
        try:
            self.start_role(Role.PRIMARY)
            self.start_role(Role.STANDBY)
            while not self._stopping.is_set():
                for key, _ in self._sel.select(0.2):
                    if key.data == "wake":
                        try:
                            self._wake_r.recv(64)
                        except BlockingIOError:
                            pass
                    elif key.data == "run":
                        try:
                            conn, _ = self._server.accept()  # type: ignore[union-attr]
                        except BlockingIOError:
                            continue
                        self._serve_reload(conn)
                if self._reload_requested:
                    self._reload_requested = False
                    threading.Thread(target=self._reload_logged, name="reload", daemon=True).start()
                self._check_supervisor()
                self._reap()
                self._kill_overdue_orphans()
        finally:
            self.shutdown()
        return 0

    def _reload_logged(self) -> None:
        try:
            result = self.reload()
            log.info("reload done in %s s", result["seconds"])
        except ReuseportStandbyError as exc:
            log.error("reload failed: %s", exc)

    def shutdown(self) -> None:
        """Standby first, then primary (each leaves its slots, then drains), supervisor last."""
        self._stopping.set()
        with self._lock:
            instances = [m for m in (self.current[Role.STANDBY], self.current[Role.PRIMARY]) if m is not None]
        for m in instances:
            self.terminate(m)
        if self._supervisor is not None and self._supervisor.poll() is None:
            self._supervisor.send_signal(signal.SIGTERM)
            try:
                self._supervisor.wait(10)
            except subprocess.TimeoutExpired:
                self._supervisor.kill()
        self._kill_overdue_orphans(force=True)
        if self._server is not None:
            self._server.close()
            try:
                os.unlink(self.run_path)
            except FileNotFoundError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)
        log.info("stopped")


def request_reload(service: str, control: str | None = None, timeout: float = 600.0) -> dict[str, Any]:
    """Ask a running ``reuseport-standby run`` to do a rolling reload, and wait for the outcome."""
    path = run_socket_path(protocol.control_path(service, control))
    try:
        sock = client.connect(path)
    except SupervisorUnavailable:
        raise SupervisorUnavailable(f"no 'reuseport-standby run' for service {service!r} answers at {path}") from None
    with sock:
        reply, _ = client.request(sock, {"op": "reload"}, timeout=timeout)
        return reply


def run(cfg: RunConfig) -> int:
    return Runner(cfg).run()


def main_args(command: Sequence[str]) -> list[str]:
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ValueError("give the server command after '--', e.g. -- gunicorn -w 2 myapp.wsgi")
    return list(command)
