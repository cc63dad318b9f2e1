"""The control protocol between the supervisor and instances (version 1).

Transport: a unix SOCK_SEQPACKET socket, so every message keeps its
boundary and carries its own file descriptors (SCM_RIGHTS).  A message is
one UTF-8 JSON object of at most ``MAX_MESSAGE`` bytes; a reply longer than
that travels as numbered chunks (:func:`frames`, :func:`join_reply`).
docs/protocol.md is the reference; this module is the only parser of it.
"""

from __future__ import annotations

import array
import base64
import binascii
import json
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

from .names import ENV_CONTROL, Scope
from .outcomes import Outcomes
from .errors import ProtocolError, ReuseportStandbyError
from .kernel.layout import Role

VERSION = 1
#: every message on the wire, either way: a request is one message, so what a peer makes us read stays bounded
MAX_MESSAGE = 16 * 1024
MAX_FDS = 64
#: bytes of a long reply's JSON text per chunk: base64 makes 16,000 of them, plus a header under 100
CHUNK_BYTES = 12_000
#: the most chunks a client takes for one reply (47 MiB): a bound for the client, far above any real reply
MAX_CHUNKS = 4096
DEFAULT_SERVICE = "default"
CONTROL_DIR = "/run/reuseport-standby"

SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
#: an instance's name (``hello``, ``readopt``): shown in ``status`` and in the supervisor's log, so printable
#: ASCII of a few kinds only (no control character, no escape code, no newline); empty when unnamed.  Wide
#: enough for what the integrations send: "gunicorn worker 3", "uvicorn app.main:app (4 workers)",
#: "uvicorn make_app.<locals>.App".
NAME_MAX = 128
NAME_CHARS = "ASCII letters, digits, spaces and . _ : @ + - / ( ) < > [ ]"
NAME_RE = re.compile(r"[A-Za-z0-9 ._:@+/()<>\[\]-]*")
#: an instance's version (``hello``, ``readopt``): a label in ``status`` and in the metrics, so printable ASCII
VERSION_MAX = 64
VERSION_RE = re.compile(r"[\x21-\x7e]{1,64}")

OPS = ("hello", "ready", "stop", "readopt", "status", "ping", "heartbeat", "weight", "promote", "drain", "undrain")
#: socket scopes: one set of listeners per instance, or one per worker process
SCOPES = tuple(s.value for s in Scope)
#: operations that act on the service as a whole (operator commands), not on the caller's instance
ADMIN_OPS = ("weight", "promote", "drain", "undrain")


def check_service(name: str) -> str:
    if not isinstance(name, str) or not SERVICE_RE.fullmatch(name):
        raise ValueError(f"bad service name {name!r}: use 1-64 letters, digits, '-' or '_' (no dots: bpffs forbids them)")
    return name


def check_name(name: object) -> str:
    """An instance's name as the supervisor accepts it; else ProtocolError "malformed", saying what is allowed
    (and never quoting the name: it may be meant for a terminal or a log)."""
    if not isinstance(name, str):
        raise ProtocolError("malformed", f"'name' must be a string, got {type(name).__name__}")
    if len(name) > NAME_MAX:
        raise ProtocolError("malformed", f"'name' is {len(name)} characters long; at most {NAME_MAX} are allowed")
    if not NAME_RE.fullmatch(name):
        bad = next(i for i, c in enumerate(name) if not NAME_RE.fullmatch(c))
        raise ProtocolError("malformed", f"'name' may hold only {NAME_CHARS} (at most {NAME_MAX}); character "
                            f"{bad + 1} is U+{ord(name[bad]):04X}")
    return name


def check_version(version: object) -> str | None:
    """An instance's version label (absent: None); else ProtocolError "malformed"."""
    if version is None:
        return None
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise ProtocolError("malformed", f"'version' must be 1 to {VERSION_MAX} printable ASCII characters without "
                            f"spaces, got {'a string of ' + str(len(version)) + ' characters' if isinstance(version, str) else type(version).__name__}")
    return version


def control_path(service: str, override: str | None = None) -> str:
    """Where the supervisor of ``service`` listens: --control, $REUSEPORT_STANDBY_CONTROL, or the default."""
    if override:
        return override
    env = os.environ.get(ENV_CONTROL)
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
    #: ``hello``/``readopt``: the app's version, a label for ``status`` and the metrics
    version: str | None = None
    #: ``heartbeat``: the cumulative counts of what the instance's app answered (outcomes.py)
    outcomes: Outcomes | None = None
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
    if op in ("hello", "readopt") or (op in ("drain", "undrain") and "pid" in msg):
        pid = msg.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**31:
            raise ProtocolError("bad_pid", f"pid must be a positive integer, got {pid!r}")
    active = msg.get("active", False)
    if not isinstance(active, bool):
        raise ProtocolError("malformed", "'active' must be true or false")
    name = check_name(msg.get("name", ""))
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
    version = check_version(msg.get("version")) if op in ("hello", "readopt") else None
    outcomes = None
    if op == "heartbeat" and msg.get("outcomes") is not None:
        try:
            outcomes = Outcomes.from_wire(msg["outcomes"])
        except ValueError as exc:
            raise ProtocolError("malformed", str(exc)) from None
    expects_fds = op == "readopt"
    if nfds and not expects_fds:
        raise ProtocolError("unexpected_fds", f"'{op}' carries no file descriptors, got {nfds}")
    if expects_fds and nfds == 0:
        raise ProtocolError("missing_fds", "'readopt' must carry the instance's listening sockets")
    return Request(op=op, role=role, pid=pid, active=active, name=name, nfds=nfds,
                   heartbeat=float(heartbeat) if heartbeat is not None else None, standby_weight=weight,
                   parent=parent, scope=scope, version=version, outcomes=outcomes, fields=msg)


def _dump(msg: dict[str, Any]) -> bytes:
    return json.dumps({"v": VERSION, **msg}, separators=(",", ":")).encode()


def encode(msg: dict[str, Any]) -> bytes:
    """One message (a request): never more than MAX_MESSAGE, the supervisor reads no more."""
    data = _dump(msg)
    if len(data) > MAX_MESSAGE:
        raise ProtocolError("too_large", f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def error_reply(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": code, "message": message}


def frames(msg: dict[str, Any], fds: list[int] | None = None) -> list[tuple[bytes, list[int]]]:
    """The messages that carry one reply, each with the fds it carries.

    A reply of at most MAX_MESSAGE bytes is one message, as always.  A longer
    one (``status`` of many instances) is split into numbered chunks, so no
    message, and no buffer a peer can make us fill, grows with it; the fds
    ride on the first chunk.
    """
    data = _dump(msg)
    if len(data) <= MAX_MESSAGE:
        return [(data, list(fds or []))]
    pieces = [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
    if len(pieces) > MAX_CHUNKS:
        raise ProtocolError("too_large", f"reply of {len(data)} bytes exceeds {MAX_CHUNKS} chunks")
    return [(_dump({"chunk": i, "chunks": len(pieces), "data": base64.b64encode(piece).decode()}),
             list(fds or []) if i == 0 else [])
            for i, piece in enumerate(pieces)]


def sendmsg(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    """One message as it is (raises BlockingIOError on a full non-blocking socket: seqpacket sends all or nothing)."""
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendmsg([data])


def send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    """A request (one message) on a blocking socket."""
    sendmsg(sock, encode(msg), fds)


def send_reply(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    """A whole reply, chunked if long, on a blocking socket (the supervisor queues instead: it never blocks)."""
    for data, carried in frames(msg, fds):
        sendmsg(sock, data, carried)


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

    Its directory must be root's (or ours) and writable by nobody else, unless sticky like /tmp:
    whoever may rename files there could put a link in the socket's place between our bind and our
    chown.  A missing directory is created 0755.  The socket takes its mode from the umask at bind,
    never from a chmod through the path.  A socket file nobody listens on (left by a crash) is
    replaced; one that answers belongs to a running ``what`` and is refused; anything else at ``path``
    (a link, a file) is refused, never followed nor removed.
    """
    import stat

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.lexists(directory):
        os.makedirs(directory, mode=0o755, exist_ok=True)
        made = True
    else:
        made = False
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # a root's link such as /var/run is fine
    try:
        st, link = os.fstat(fd), os.lstat(directory)
        if made and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o755:
            os.fchmod(fd, 0o755)  # whatever the umask (0077 under systemd): instances must reach the socket
            st = os.fstat(fd)
    finally:
        os.close(fd)
    mine = (0, os.geteuid())
    problem = None
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in mine:
        problem = f"is a symbolic link of uid {link.st_uid}'s"
    elif st.st_uid not in mine:
        problem = f"belongs to uid {st.st_uid}"
    elif st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        problem = f"is writable by {'others' if st.st_mode & 0o002 else 'its group'} (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem:
        raise ReuseportStandbyError(
            f"refusing to listen at {path}: its directory {directory} {problem}, so another user could replace the "
            f"socket. Use a directory that only root (or this user) may write, e.g. the default {CONTROL_DIR}, "
            f"or fix it (chown root {directory}; chmod go-w {directory})", see="path-refused")
    try:
        node = os.lstat(path)
    except FileNotFoundError:
        node = None
    if node is not None:
        if not stat.S_ISSOCK(node.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(node.st_mode) else "not a socket"
            raise ReuseportStandbyError(f"{path} exists and is {kind}: not touched. Remove it if it is not needed, "
                                        f"or pass another --control path", see="path-refused")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # a stale socket (unlink never follows a link; that one was a socket)
        else:
            raise ReuseportStandbyError(f"another {what} already serves {path}; stop it first or pass another --control path",
                                        see="another-supervisor-serves-this-service")
        finally:
            probe.close()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        old_umask = os.umask(0o117)  # the node is made 0660 by bind itself
        try:
            server.bind(path)
        finally:
            os.umask(old_umask)
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ReuseportStandbyError(f"{path} was replaced right after it was bound (it is no socket now): someone "
                                        f"with write access to {directory} is at work; not touched", see="path-refused")
        server.listen(backlog)
        server.setblocking(False)
    except BaseException:
        server.close()
        raise
    return server


@dataclass(frozen=True)
class Chunk:
    index: int
    count: int
    data: bytes


def parse_chunk(raw: bytes) -> Chunk | None:
    """The chunk of a long reply that ``raw`` is, or None for a whole message."""
    try:
        msg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None  # parse_reply says what is wrong with it
    if not isinstance(msg, dict) or "chunk" not in msg or "ok" in msg:
        return None
    index, count, data = msg.get("chunk"), msg.get("chunks"), msg.get("data")
    if (not all(isinstance(x, int) and not isinstance(x, bool) for x in (index, count))
            or not 0 <= index < count <= MAX_CHUNKS or not isinstance(data, str)):
        raise ProtocolError("malformed", f"supervisor sent a malformed chunk: {raw[:100]!r}")
    try:
        return Chunk(index, count, base64.b64decode(data, validate=True))
    except (binascii.Error, ValueError):
        raise ProtocolError("malformed", "supervisor sent a chunk that is not base64") from None


def join_reply(first: bytes, more: Callable[[], bytes]) -> bytes:
    """A whole reply: ``first`` itself, or the chunks it begins, the rest read with ``more()``."""
    head = parse_chunk(first)
    if head is None:
        return first
    if head.index != 0:
        raise ProtocolError("malformed", f"a reply began with chunk {head.index} of {head.count}")
    parts = [head.data]
    for i in range(1, head.count):
        chunk = parse_chunk(more())
        if chunk is None or chunk.index != i or chunk.count != head.count:
            raise ProtocolError("malformed", f"chunk {i} of {head.count} of a reply is missing")
        parts.append(chunk.data)
    return b"".join(parts)


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
