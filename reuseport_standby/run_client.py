"""Talking to a running ``reuseport-standby run``: its own socket, next to the supervisor's.

Apart from the runner so that ``status`` and ``reload`` import only what a
client needs (an unprivileged ``status`` must not pull in the runner's
process machinery).
"""

from __future__ import annotations

import json
import os
import select
import time
from typing import Any, Callable

from . import client, protocol
from .errors import ProtocolError, ReuseportStandbyError, SupervisorUnavailable


class CanaryFailed(ReuseportStandbyError):
    """A canary reload rolled back; ``fields`` holds its verdicts (the numbers that failed)."""

    see = "a-canary-reload-rolled-back"

    def __init__(self, message: str, fields: dict[str, Any]) -> None:
        super().__init__(message)
        self.fields = fields


def run_socket_path(control_path: str) -> str:
    """Where a runner listens for ``reload`` and ``status``: next to the supervisor's control socket."""
    base = control_path[:-5] if control_path.endswith(".sock") else control_path
    return base + ".run.sock"


def request_reload(service: str, control: str | None = None, timeout: float = 600.0,
                   progress: Callable[[dict[str, Any]], None] | None = None,
                   options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ask a running ``reuseport-standby run`` to do a rolling reload, and wait for the outcome.

    With ``progress``, each step is passed to it as it happens (``{"progress": TEXT, "step": ...}``);
    a runner too old to send steps just sends the outcome.  ``options``: ``canary`` (a plan, see
    canary.CanaryPlan) and ``health_path``.  A canary that rolled back raises CanaryFailed."""
    if progress is None:
        return _ask_run(service, control, {"op": "reload", **(options or {})}, timeout)
    path = run_socket_path(protocol.control_path(service, control))
    sock = _connect(service, path)
    with sock:
        protocol.send(sock, {"op": "reload", "progress": True, **(options or {})})
        deadline = time.monotonic() + timeout
        while True:
            raw = _recv_by(sock, deadline)
            try:
                msg = json.loads(raw)
            except (UnicodeDecodeError, ValueError):
                msg = None  # parse_reply says what is wrong with it
            if isinstance(msg, dict) and "progress" in msg and "ok" not in msg and "chunk" not in msg:
                progress(msg)
                continue
            whole = protocol.join_reply(raw, lambda: _recv_by(sock, deadline))
            try:
                reply = json.loads(whole)
            except (UnicodeDecodeError, ValueError):
                reply = None
            if isinstance(reply, dict) and reply.get("error") == "rolled_back" and isinstance(reply.get("canary"), dict):
                raise CanaryFailed(str(reply.get("message")), {"canary": reply["canary"]})
            return protocol.parse_reply(whole)


def run_status(service: str, control: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """What a running ``reuseport-standby run`` says of itself: its supervisor's health, its instances."""
    return _ask_run(service, control, {"op": "status"}, timeout)["run"]


def _connect(service: str, path: str) -> Any:
    try:
        return client.connect(path)
    except SupervisorUnavailable:
        raise SupervisorUnavailable(f"no 'reuseport-standby run' for service {service!r} answers at {path}") from None


def _recv_by(sock: Any, deadline: float) -> bytes:
    """The next message, by ``deadline``."""
    if not select.select([sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
        raise SupervisorUnavailable("'reuseport-standby run' did not finish the reload in time "
                                    "(it goes on; see 'reuseport-standby status')")
    raw, fds, _ = protocol.recv(sock)
    for fd in fds:
        os.close(fd)
    if not raw:
        raise ProtocolError("closed", "'reuseport-standby run' closed the connection before the outcome")
    return raw


def _ask_run(service: str, control: str | None, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
    path = run_socket_path(protocol.control_path(service, control))
    sock = _connect(service, path)
    with sock:
        reply, _ = client.request(sock, msg, timeout=timeout)
        return reply
