"""Talking to a running ``reuseport-standby run``: its own socket, next to the supervisor's.

Apart from the runner so that ``status`` and ``reload`` import only what a
client needs (an unprivileged ``status`` must not pull in the runner's
process machinery).
"""

from __future__ import annotations

from typing import Any

from . import client, protocol
from .errors import SupervisorUnavailable


def run_socket_path(control_path: str) -> str:
    """Where a runner listens for ``reload`` and ``status``: next to the supervisor's control socket."""
    base = control_path[:-5] if control_path.endswith(".sock") else control_path
    return base + ".run.sock"


def request_reload(service: str, control: str | None = None, timeout: float = 600.0) -> dict[str, Any]:
    """Ask a running ``reuseport-standby run`` to do a rolling reload, and wait for the outcome."""
    return _ask_run(service, control, {"op": "reload"}, timeout)


def run_status(service: str, control: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """What a running ``reuseport-standby run`` says of itself: its supervisor's health, its instances."""
    return _ask_run(service, control, {"op": "status"}, timeout)["run"]


def _ask_run(service: str, control: str | None, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
    path = run_socket_path(protocol.control_path(service, control))
    try:
        sock = client.connect(path)
    except SupervisorUnavailable:
        raise SupervisorUnavailable(f"no 'reuseport-standby run' for service {service!r} answers at {path}") from None
    with sock:
        reply, _ = client.request(sock, msg, timeout=timeout)
        return reply
