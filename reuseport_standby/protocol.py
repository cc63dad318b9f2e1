"""The control protocol between the supervisor and instances (version 1).

Transport: a unix SOCK_SEQPACKET socket, so every message keeps its
boundary and carries its own file descriptors (SCM_RIGHTS).  A message is
one UTF-8 JSON object.  docs/protocol.md is the reference; this module is
the only parser of it.
"""

from __future__ import annotations

import array
import json
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any

from .errors import ProtocolError, ReuseportStandbyError
from .layout import Role

VERSION = 1
MAX_MESSAGE = 16 * 1024
MAX_FDS = 64
DEFAULT_SERVICE = "default"
CONTROL_DIR = "/run/reuseport-standby"

SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

OPS = ("hello", "ready", "stop", "readopt", "status", "ping", "heartbeat", "weight", "promote", "drain", "undrain")
#: socket scopes: one set of listeners per instance, or one per worker process
SCOPES = ("instance", "worker")
#: operations that act on the service as a whole (operator commands), not on the caller's instance
ADMIN_OPS = ("weight", "promote", "drain", "undrain")


def check_service(name: str) -> str:
    if not isinstance(name, str) or not SERVICE_RE.fullmatch(name):
        raise ValueError(f"bad service name {name!r}: use 1-64 letters, digits, '-' or '_' (no dots: bpffs forbids them)")
    return name


def control_path(service: str, override: str | None = None) -> str:
    """Where the supervisor of ``service`` listens: --control, $REUSEPORT_STANDBY_CONTROL, or the default."""
    if override:
        return override
    env = os.environ.get("REUSEPORT_STANDBY_CONTROL")
    if env:
        return env
    return os.path.join(CONTROL_DIR, f"{check_service(service)}.sock")


@dataclass(frozen=True)
class Request:
    op: str
    role: Role | None = None
    pid: int | None = None
    active: bool = False
    name: str = ""
    nfds: int = 0
    heartbeat: float | None = None  # seconds between the instance's heartbeats, if it sends them
    standby_weight: int | None = None
    #: worker scope: the pid of the instance (a gunicorn master, a uvicorn main process) this worker belongs to
    parent: int | None = None
    #: "worker" for an instance whose workers register on their own (its own sockets are never activated)
    scope: str = "instance"
    fields: dict[str, Any] = field(default_factory=dict)


def parse_request(raw: bytes, nfds: int = 0) -> Request:
    """Validate one request; raise ProtocolError with a code the peer can act on."""
    if len(raw) > MAX_MESSAGE:
        raise ProtocolError("too_large", f"message of {len(raw)} bytes exceeds {MAX_MESSAGE}")
    try:
        msg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("malformed", f"not a UTF-8 JSON message: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("malformed", "a message must be a JSON object")
    v = msg.get("v")
    if v != VERSION or isinstance(v, bool):
        raise ProtocolError("version", f"protocol version {v!r} is not supported; this supervisor speaks {VERSION}")
    op = msg.get("op")
    if op not in OPS:
        raise ProtocolError("unknown_op", f"unknown operation {op!r}; expected one of {', '.join(OPS)}")
    role = None
    pid = None
    if op in ("hello", "readopt", "drain", "undrain"):
        try:
            role = Role.parse(msg.get("role"))  # type: ignore[arg-type]
        except (ValueError, TypeError):
            raise ProtocolError("bad_role", f"unknown role {msg.get('role')!r}: expected 'primary' or 'standby'") from None
    if op in ("hello", "readopt"):
        pid = msg.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**31:
            raise ProtocolError("bad_pid", f"pid must be a positive integer, got {pid!r}")
    active = msg.get("active", False)
    if not isinstance(active, bool):
        raise ProtocolError("malformed", "'active' must be true or false")
    name = msg.get("name", "")
    if not isinstance(name, str) or len(name) > 128:
        raise ProtocolError("malformed", "'name' must be a string of at most 128 characters")
    heartbeat = msg.get("heartbeat")
    if heartbeat is not None and (isinstance(heartbeat, bool) or not isinstance(heartbeat, (int, float))
                                  or not 0.05 <= heartbeat <= 60):
        raise ProtocolError("malformed", f"'heartbeat' must be a number of seconds from 0.05 to 60, got {heartbeat!r}")
    parent = msg.get("parent")
    if parent is not None and (not isinstance(parent, int) or isinstance(parent, bool) or not 0 < parent < 2**31):
        raise ProtocolError("bad_pid", f"'parent' must be the pid of the instance this worker belongs to, got {parent!r}")
    scope = msg.get("scope", "instance")
    if scope not in SCOPES:
        raise ProtocolError("malformed", f"'scope' must be one of {', '.join(SCOPES)}, got {scope!r}")
    weight = None
    if op == "weight":
        weight = msg.get("standby")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
            raise ProtocolError("bad_weight", f"'standby' must be a whole percentage from 0 to 100, got {weight!r}")
    expects_fds = op == "readopt"
    if nfds and not expects_fds:
        raise ProtocolError("unexpected_fds", f"'{op}' carries no file descriptors, got {nfds}")
    if expects_fds and nfds == 0:
        raise ProtocolError("missing_fds", "'readopt' must carry the instance's listening sockets")
    return Request(op=op, role=role, pid=pid, active=active, name=name, nfds=nfds,
                   heartbeat=float(heartbeat) if heartbeat is not None else None, standby_weight=weight,
                   parent=parent, scope=scope, fields=msg)


def encode(msg: dict[str, Any]) -> bytes:
    data = json.dumps({"v": VERSION, **msg}, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError("too_large", f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def error_reply(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": code, "message": message}


def send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = encode(msg)
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendmsg([data])


def recv(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """One message, the fds it carried, and whether it was truncated (too large).

    Returns ``(b"", [], False)`` at end of stream.  Fds are always taken
    into this process (and must be closed by the caller), even for a message
    that turns out to be invalid, so nothing leaks.
    """
    fds = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE + 1, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
    truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)) or len(data) > MAX_MESSAGE
    return data, list(fds), truncated


def listen_unix(path: str, what: str, backlog: int = 64) -> socket.socket:
    """A non-blocking SOCK_SEQPACKET server at ``path``, mode 0660.

    A socket file nobody listens on (left by a crash) is replaced; one that
    answers belongs to a running ``what`` and is refused.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale
        else:
            raise ReuseportStandbyError(f"another {what} already serves {path}; stop it first or pass another --control path")
        finally:
            probe.close()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old_umask = os.umask(0o117)
    try:
        server.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o660)
    server.listen(backlog)
    server.setblocking(False)
    return server


def parse_reply(raw: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("malformed", f"supervisor sent a malformed reply: {exc}") from None
    if not isinstance(msg, dict) or msg.get("v") != VERSION:
        raise ProtocolError("version", f"supervisor speaks another protocol version: {msg!r:.200}")
    if not msg.get("ok"):
        raise ProtocolError(str(msg.get("error", "error")), str(msg.get("message", "request refused")))
    return msg
