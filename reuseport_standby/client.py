"""The instance side of the control protocol, used by the integrations.

An instance (a gunicorn master, a uvicorn process) calls :meth:`InstanceClient.open`
to receive its listeners, :meth:`~InstanceClient.ready` once it can serve, and
:meth:`~InstanceClient.stop` before it starts shutting down.  If the
supervisor restarts in between, a background thread reconnects and
re-announces the instance's sockets, so the app never notices.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
import weakref
from typing import Any, Callable

from . import protocol
from .names import ENV_GENERATION, ENV_VERSION
from .outcomes import RECORDER, Outcomes
from .errors import ControlSocketDenied, ProtocolError, SupervisorUnavailable
from .kernel.layout import Role
from .kernel.sockets import Address

log = logging.getLogger(__name__)

_live_clients: "weakref.WeakSet[InstanceClient]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_live_clients):
        client._forget_inherited()


os.register_at_fork(after_in_child=_after_fork_in_child)


def app_version(env: "dict[str, str] | os._Environ[str] | None" = None) -> str | None:
    """The version an instance announces: $REUSEPORT_STANDBY_VERSION, else "gen<N>" from ``run``'s generation.

    A value the supervisor would refuse (protocol.check_version) is left out, with a warning, rather than
    keep the instance from registering."""
    env = os.environ if env is None else env
    version = env.get(ENV_VERSION) or (f"gen{env[ENV_GENERATION]}" if env.get(ENV_GENERATION) else None)
    if version is None:
        return None
    try:
        return protocol.check_version(version)
    except ProtocolError as exc:
        log.warning("reuseport-standby: %s is not announced: %s", ENV_VERSION, exc)
        return None


def connect(path: str, timeout: float = 0.0) -> socket.socket:
    """Connect to a supervisor's control socket, waiting up to ``timeout`` for it to appear."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() + delay > deadline:
                raise SupervisorUnavailable(
                    f"no supervisor answers at {path} ({exc.strerror}). Start one with "
                    f"'reuseport-standby supervise --service NAME --bind HOST:PORT', or point "
                    f"REUSEPORT_STANDBY_CONTROL at its socket") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        except PermissionError:
            sock.close()
            raise ControlSocketDenied(
                f"no permission to connect to {path}: run the app as a member of the supervisor's --group") from None


def request(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None,
            timeout: float = 10.0) -> tuple[dict[str, Any], list[socket.socket]]:
    """Send one request and wait for its reply (and the sockets it carries).

    A long reply arrives as numbered chunks (docs/protocol.md): all of them
    are read, within the same ``timeout``."""
    try:
        protocol.send(sock, msg, fds)
    except (BrokenPipeError, ConnectionResetError):
        # A supervisor that refuses a peer says why and hangs up at once:
        # the reason may already wait in our receive queue.
        timeout = 0.0
    deadline = time.monotonic() + timeout
    r, _, _ = select.select([sock], [], [], timeout)
    if not r:
        raise SupervisorUnavailable(f"the supervisor did not answer '{msg.get('op')}' within {timeout:.0f} s")
    try:
        raw, got, _ = protocol.recv(sock)
    except ConnectionResetError:
        # The peer hung up with our request unread; the kernel reports that
        # once, before the reply it left us.
        sock.setblocking(False)
        try:
            raw, got, _ = protocol.recv(sock)
        except (BlockingIOError, ConnectionResetError):
            raise SupervisorUnavailable("the supervisor closed the control connection") from None
    socks = [socket.socket(fileno=fd) for fd in got]
    if not raw:
        for s in socks:
            s.close()
        raise SupervisorUnavailable("the supervisor closed the control connection")
    try:
        return protocol.parse_reply(protocol.join_reply(raw, lambda: _next_chunk(sock, deadline, msg))), socks
    except (ProtocolError, SupervisorUnavailable, OSError):
        for s in socks:
            s.close()
        raise


def _next_chunk(sock: socket.socket, deadline: float, msg: dict[str, Any]) -> bytes:
    """The next message of a chunked reply (a chunk carries no fds; any that came are closed)."""
    r, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
    if not r:
        raise SupervisorUnavailable(f"the supervisor did not finish its reply to '{msg.get('op')}' in time")
    raw, got, _ = protocol.recv(sock)
    for fd in got:
        os.close(fd)
    if not raw:
        raise SupervisorUnavailable("the supervisor closed the control connection in the middle of a reply")
    return raw


def query(service: str = protocol.DEFAULT_SERVICE, op: str = "status", control: str | None = None,
          timeout: float = 5.0) -> dict[str, Any]:
    """One-shot request to a supervisor (``status``, ``ping``)."""
    with connect(protocol.control_path(service, control)) as sock:
        reply, socks = request(sock, {"op": op}, timeout=timeout)
        for s in socks:
            s.close()
        return reply


def admin(service: str, msg: dict[str, Any], control: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """An operator command (weight, promote, drain, undrain) to a supervisor."""
    with connect(protocol.control_path(service, control)) as sock:
        reply, socks = request(sock, msg, timeout=timeout)
        for s in socks:
            s.close()
        return reply


class InstanceClient:
    """One app instance's link to the supervisor of its service."""

    def __init__(self, role: Role | str, service: str = protocol.DEFAULT_SERVICE, *, control: str | None = None,
                 name: str = "", connect_timeout: float = 30.0, reconnect: bool = True,
                 heartbeat: float | None = 1.0, scope: str = "instance", parent: int | None = None,
                 stop_timeout: float = 10.0) -> None:
        """``scope="worker"``: this instance's workers register on their own (each an
        ``InstanceClient`` with ``parent`` = this process's pid); the listeners this
        client receives are never activated, and its ``stop()`` takes every worker
        out of the traffic at once.  ``stop_timeout``: how long ``stop()`` waits for
        the supervisor's answer."""
        if scope not in protocol.SCOPES:
            raise ValueError(f"scope must be one of {', '.join(protocol.SCOPES)}, got {scope!r}")
        self.role = role if isinstance(role, Role) else Role.parse(role)
        self.scope = scope
        self.parent = parent
        self.stop_timeout = stop_timeout
        self.service = protocol.check_service(service)
        self.control_path = protocol.control_path(service, control)
        self.name = name
        self.connect_timeout = connect_timeout
        self.reconnect = reconnect
        # Heartbeats come from the watcher thread, so only with reconnect; they let the
        # supervisor demote an instance whose process stopped running (SIGSTOP, a hang).
        self.heartbeat = heartbeat if reconnect else None
        self.addresses: list[Address] = []
        self.backlog: int | None = None  # the listen() backlog the supervisor gave our sockets
        self.instance_id: int | None = None
        self.state = "new"  # new -> pending -> active -> stopped
        self._conn: socket.socket | None = None
        self._keep: list[socket.socket] = []  # our dups, to re-announce to a restarted supervisor
        self._lock = threading.RLock()
        self._watcher: threading.Thread | None = None
        self._pid = os.getpid()
        self.version = app_version()
        #: what the heartbeats report: this process's counts by default; an instance-scope master sets the sum
        #: of its workers' (``None``: nothing, e.g. a worker-scope master, whose workers report their own)
        self.outcomes: Callable[[], Outcomes] | None = RECORDER.snapshot
        _live_clients.add(self)

    # -- public API -----------------------------------------------------------------
    def open(self) -> list[socket.socket]:
        """Register with the supervisor and receive one listening socket per address.

        The caller owns the returned sockets; the client keeps duplicates only
        to re-announce them if the supervisor restarts.
        """
        with self._lock:
            if self.state != "new":
                raise RuntimeError(f"open() called twice (state {self.state})")
            conn = connect(self.control_path, self.connect_timeout)
            try:
                reply, socks = request(conn, {"op": "hello", "role": self.role.value, "pid": os.getpid(),
                                              "name": self.name, **self._heartbeat_field(), **self._scope_fields()})
            except BaseException:
                conn.close()
                raise
            self.addresses = [Address.parse(a) for a in reply["addresses"]]
            self.backlog = reply.get("backlog")
            if len(socks) != len(self.addresses):
                conn.close()
                raise ProtocolError("fd_mismatch", f"supervisor sent {len(socks)} sockets for {len(self.addresses)} addresses")
            self.instance_id = reply.get("instance")
            self._conn = conn
            self._keep = [s.dup() for s in socks]
            for s in self._keep:
                os.set_inheritable(s.fileno(), False)
            self.state = "pending"
            if self.reconnect:
                self._watcher = threading.Thread(target=self._watch, name="reuseport-standby-control", daemon=True)
                self._watcher.start()
            log.info("reuseport-standby: %s instance %s got %s", self.role.value, self.instance_id,
                     ", ".join(map(str, self.addresses)))
            return socks

    def ready(self) -> dict[str, Any]:
        """Ask to be put into the slots of this instance's role: new connections start arriving."""
        with self._lock:
            if self.state == "active":
                return {"ok": True, "state": "active"}
            if self.state != "pending":
                raise RuntimeError(f"ready() in state {self.state}")
            reply = self._request({"op": "ready"})
            self.state = "active"
            log.info("reuseport-standby: %s instance %s active in slots %s", self.role.value, self.instance_id,
                     reply.get("slots"))
            return reply

    def stop(self) -> None:
        """Leave the slots at once (no new connections arrive), keep serving what was accepted.

        Safe to call more than once and from signal handlers' deferred work;
        never raises for a supervisor that is gone: the kernel still
        migrates this instance's queue when its listeners close.
        """
        with self._lock:
            if self.state in ("stopped", "inherited"):
                return
            was = self.state
            self.state = "stopped"
            try:
                if was in ("pending", "active"):
                    self._request({"op": "stop"}, retry=False, timeout=self.stop_timeout)
            except (OSError, ProtocolError, SupervisorUnavailable) as exc:
                log.warning("reuseport-standby: could not tell the supervisor to stop routing here (%s); "
                            "connections still queued when this instance closes its listeners will be migrated", exc)
            self._close_keep()
            log.info("reuseport-standby: %s instance %s stopped taking new connections", self.role.value, self.instance_id)

    def close(self) -> None:
        """Stop and drop the control connection."""
        self.stop()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- internals --------------------------------------------------------------------
    def _heartbeat_field(self) -> dict[str, float]:
        return {"heartbeat": self.heartbeat} if self.heartbeat else {}

    def _scope_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"scope": self.scope} if self.scope != "instance" else {}
        if self.version is not None:
            fields["version"] = self.version
        if self.parent is not None:
            fields["parent"] = self.parent
        return fields

    def _heartbeat_message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"op": "heartbeat"}
        if self.outcomes is not None:
            try:
                msg["outcomes"] = self.outcomes().to_wire()
            except Exception as exc:  # a report is never worth a missed heartbeat
                log.debug("reuseport-standby: no outcomes in this heartbeat: %s", exc)
        return msg

    def _beat(self, conn: socket.socket) -> None:
        with self._lock:
            if self._conn is not conn or self.state not in ("pending", "active"):
                return
            try:
                request(conn, self._heartbeat_message(), timeout=5)
            except (SupervisorUnavailable, ProtocolError, OSError) as exc:
                log.debug("reuseport-standby: heartbeat failed: %s", exc)

    def report(self, timeout: float = 1.0) -> None:
        """Send the outcomes now, also after ``stop()``: what a draining instance served to the end.

        Best effort, never raises: a supervisor that is gone misses the last counts."""
        with self._lock:
            conn = self._conn
            if conn is None or self.outcomes is None or self.state in ("new", "inherited"):
                return
            try:
                request(conn, self._heartbeat_message(), timeout=timeout)
            except (SupervisorUnavailable, ProtocolError, OSError) as exc:
                log.debug("reuseport-standby: final report failed: %s", exc)

    def _request(self, msg: dict[str, Any], retry: bool = True, timeout: float = 10.0) -> dict[str, Any]:
        if self._conn is None:
            raise SupervisorUnavailable("not connected to the supervisor")
        try:
            reply, socks = request(self._conn, msg, timeout=timeout)
        except (SupervisorUnavailable, OSError):
            if not (retry and self.reconnect):
                raise
            self._reconnect(deadline=time.monotonic() + self.connect_timeout)
            reply, socks = request(self._conn, msg)
        for s in socks:
            s.close()
        return reply

    def _watch(self) -> None:
        """Notice a supervisor that went away, and re-announce to the next one.

        Holds the lock only for one attempt at a time, so ``stop()`` is
        never held up by a supervisor that stays away.
        """
        delay = 0.05
        while self.state not in ("stopped", "inherited"):
            conn = self._conn
            if conn is not None:
                try:
                    p = select.poll()
                    p.register(conn, select.POLLRDHUP)
                    events = p.poll(int((self.heartbeat or 1.0) * 1000))
                except (ValueError, OSError):
                    events = [(0, select.POLLHUP)]
                if not any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, ev in events):
                    if self.heartbeat:
                        self._beat(conn)
                    continue
                with self._lock:
                    if self._conn is conn:
                        conn.close()
                        self._conn = None
                        log.warning("reuseport-standby: lost the supervisor at %s; reconnecting", self.control_path)
                delay = 0.05
                continue
            with self._lock:
                if self._conn is None and self.state not in ("stopped", "inherited"):
                    try:
                        self._readopt_once()
                    except (SupervisorUnavailable, OSError):
                        pass
                    except ProtocolError as exc:
                        log.error("reuseport-standby: the restarted supervisor refused this instance: %s", exc)
            if self._conn is None:
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _readopt_once(self) -> None:
        """One attempt to reconnect and re-announce our sockets; must hold the lock."""
        conn = connect(self.control_path)
        try:
            reply, socks = request(conn, {"op": "readopt", "role": self.role.value, "pid": os.getpid(),
                                          "name": self.name, "active": self.state == "active",
                                          **self._heartbeat_field(), **self._scope_fields()},
                                   [s.fileno() for s in self._keep])
        except BaseException:
            conn.close()
            raise
        for s in socks:
            s.close()
        self._conn = conn
        self.instance_id = reply.get("instance")
        log.info("reuseport-standby: re-announced to the supervisor as instance %s (%s)",
                 self.instance_id, reply.get("state"))

    def _reconnect(self, deadline: float) -> None:
        """Reconnect within ``deadline`` (for a request that found the connection dead); must hold the lock."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        delay = 0.05
        while True:
            try:
                self._readopt_once()
                return
            except (SupervisorUnavailable, OSError) as exc:
                if time.monotonic() > deadline:
                    raise SupervisorUnavailable(f"supervisor did not come back: {exc}") from exc
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _close_keep(self) -> None:
        for s in self._keep:
            s.close()
        self._keep = []

    def _forget_inherited(self) -> None:
        """In a forked child: drop the copies of our fds without telling anyone.

        A worker must not hold the master's control connection (its death
        would then go unnoticed) nor the master's spare listener copies.
        """
        if os.getpid() == self._pid:
            return
        for s in [self._conn, *self._keep]:
            if s is not None:
                try:
                    os.close(s.detach())
                except OSError:
                    pass
        self._conn = None
        self._keep = []
        self.state = "inherited"
        self._lock = threading.RLock()
