"""Health before traffic: a worker calls its own app with ``GET <path>`` and takes traffic only on a 2xx.

``REUSEPORT_STANDBY_HEALTH_PATH`` (``run --health-path``) names the path.
The call is made in process, with no network: a WSGI environ or an ASGI
``http`` scope as the server would build it for a request from 127.0.0.1,
so the check reaches exactly the code that will serve, with the app's
lifespan state (ASGI), before any client does.  The integrations make it
at the moment they would otherwise report a worker as serving, and retry
every ``RETRY_INTERVAL`` seconds until it answers 2xx (gunicorn.py,
uvicorn.py); what an unhealthy worker answered is logged once per reason,
and again every ``LOG_EVERY`` seconds while it lasts, never once per retry.

Bounds: an ASGI check gives up after ``ASGI_TIMEOUT`` (``asyncio.wait_for``).
A WSGI check runs in the worker's own thread, and nothing can interrupt a
synchronous call there: gunicorn's worker ``--timeout`` is what ends a hung
check (the arbiter kills the worker, which never took traffic, and forks
another).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sys
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import unquote, unquote_to_bytes

from . import __version__
from .errors import ReuseportStandbyError
from .names import ENV_HEALTH_PATH

#: seconds between two checks of a worker that is not healthy yet
RETRY_INTERVAL = 0.5
#: seconds an ASGI check may take before it counts as failed
ASGI_TIMEOUT = 5.0
#: while a worker stays unhealthy for the same reason, it is logged again this often (seconds)
LOG_EVERY = 30.0
#: the User-Agent of the check, so the app (and its access log) can tell it from a client
USER_AGENT = f"reuseport-standby-health-check/{__version__}"
#: the longest path accepted
MAX_LENGTH = 1024

# RFC 3986 path and query characters (pchar, '/', '?', and '%' for escapes); anything else is refused.
_ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@/?%")


class HealthPathError(ReuseportStandbyError, ValueError):
    """A health path that cannot be a request target."""

    see = "instance-settings-refused"


@dataclass(frozen=True)
class HealthPath:
    """The request target of the check: a path and an optional query string, both as sent (percent-encoded)."""

    path: str
    query: str = ""

    def __str__(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


def parse(value: str, what: str = ENV_HEALTH_PATH) -> HealthPath:
    """``/healthz`` or ``/healthz?full=1``: an origin-form request target, nothing else."""
    if not value.startswith("/") or value.startswith("//"):
        raise HealthPathError(f"{what} must be a path starting with a single '/', such as /healthz, not {value!r}")
    if len(value) > MAX_LENGTH:
        raise HealthPathError(f"{what} must be at most {MAX_LENGTH} characters long")
    bad = sorted({c for c in value if c not in _ALLOWED})
    if bad:
        raise HealthPathError(f"{what} must be a plain path and query (no spaces, no '#fragment'; percent-encode "
                              f"the rest), not {value!r}")
    path, _, query = value.partition("?")
    try:
        unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise HealthPathError(f"{what} has percent-escapes that are not UTF-8: {value!r}") from None
    return HealthPath(path, query)


def from_env(environ: Mapping[str, str] | None = None) -> HealthPath | None:
    """The health path the instance was given, or None (no check: serving means ready, as without it)."""
    raw = (os.environ if environ is None else environ).get(ENV_HEALTH_PATH, "").strip()
    return parse(raw) if raw else None


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    reason: str  # what the app answered ("200 OK", "503 Service Unavailable", "raised KeyError: 'db'")


def _host_header(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- WSGI -------------------------------------------------------------------------------------

def wsgi_environ(target: HealthPath, host: str, port: int, script_name: str = "") -> dict[str, Any]:
    """The environ of ``GET target`` from 127.0.0.1 to the listener at host:port (PEP 3333)."""
    return {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": script_name,
        "PATH_INFO": unquote_to_bytes(target.path).decode("latin-1"),  # PEP 3333: bytes as latin-1
        "QUERY_STRING": target.query,
        "RAW_URI": str(target),
        "SERVER_NAME": host,
        "SERVER_PORT": str(port),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "0",
        "HTTP_HOST": _host_header(host, port),
        "HTTP_USER_AGENT": USER_AGENT,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
    }


def check_wsgi(app: Callable[..., Iterable[bytes]], target: HealthPath, host: str, port: int,
               script_name: str = "") -> Verdict:
    """Call a WSGI app once; healthy on a 2xx status.  Never raises (but for what ends a worker: SystemExit...)."""
    status: list[str] = []

    def start_response(value: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None and status:
            raise exc_info[1].with_traceback(exc_info[2])
        status[:] = [value]
        return lambda data: None

    try:
        result = app(wsgi_environ(target, host, port, script_name), start_response)
        try:
            # start_response may come with the first chunk of the body (PEP 3333); the rest is not read.
            chunks = iter(result)
            while not status:
                next(chunks)
        except StopIteration:
            pass
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
    except Exception as exc:
        return Verdict(False, f"raised {_describe(exc)}")
    if not status:
        return Verdict(False, "returned without calling start_response")
    return _verdict(status[0])


def _verdict(status: str | int) -> Verdict:
    text = str(status).strip()
    try:
        code = int(text.split(None, 1)[0])
    except (ValueError, IndexError):
        return Verdict(False, f"answered an invalid status {text[:60]!r}")
    if text.isdigit():
        try:
            text = f"{code} {HTTPStatus(code).phrase}"
        except ValueError:
            pass
    return Verdict(200 <= code < 300, text[:80])


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- ASGI -------------------------------------------------------------------------------------

def asgi_scope(target: HealthPath, host: str, port: int, state: Mapping[str, Any] | None = None,
               root_path: str = "") -> dict[str, Any]:
    """The ``http`` scope of ``GET target`` from 127.0.0.1 (ASGI 3, HTTP spec 2.3).

    ``state``: the server's lifespan state, copied as servers do for each
    request, so an app whose lifespan made its resources finds them."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": unquote(target.path),
        "raw_path": target.path.encode("ascii"),
        "query_string": target.query.encode("ascii"),
        "root_path": root_path,
        "headers": [(b"host", _host_header(host, port).encode("ascii")), (b"user-agent", USER_AGENT.encode()),
                    (b"accept", b"*/*")],
        "client": ("127.0.0.1", 0),
        "server": (host, port),
        "extensions": {},
    }
    if state is not None:
        scope["state"] = dict(state)
    return scope


async def check_asgi(app: Callable[..., Any], target: HealthPath, host: str, port: int,
                     state: Mapping[str, Any] | None = None, root_path: str = "",
                     timeout: float = ASGI_TIMEOUT) -> Verdict:
    """Call an ASGI app once in the running loop; healthy on a 2xx status, within ``timeout`` seconds."""
    status: list[int] = []
    done = asyncio.Event()
    asked: list[bool] = []

    async def receive() -> dict[str, Any]:
        if not asked:
            asked.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()  # as a server does: the client "disconnects" once the response is complete
        return {"type": "http.disconnect"}

    async def send(message: Mapping[str, Any]) -> None:
        kind = message.get("type")
        if kind == "http.response.start":
            status.append(int(message["status"]))
        elif kind == "http.response.body" and not message.get("more_body", False):
            done.set()

    async def call() -> None:
        await app(asgi_scope(target, host, port, state, root_path), receive, send)

    task = asyncio.ensure_future(call())
    waiter = asyncio.ensure_future(done.wait())
    try:
        # The status decides; a body still streaming when it is known is not waited for.
        finished, _ = await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not finished and not status:
            return Verdict(False, f"no answer within {timeout:g} s")
        if task in finished and task.exception() is not None and not done.is_set():
            return Verdict(False, f"raised {_describe(task.exception())}")  # type: ignore[arg-type]
    finally:
        done.set()
        waiter.cancel()
        if not task.done():
            task.cancel()  # a streaming body, or past the timeout: the app's own end is not waited for long
            await asyncio.wait({task}, timeout=1.0)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at exit
    if not status:
        return Verdict(False, "returned without starting a response")
    return _verdict(status[0])


# -- the retry loop's log ---------------------------------------------------------------------

class Watch:
    """One worker's checks until it is healthy: what they answered, logged without repeating itself."""

    def __init__(self, target: HealthPath, who: str, log: logging.Logger,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.target = target
        self.who = who
        self.log = log
        self.clock = clock
        self.failures = 0
        self._last: tuple[str, float] | None = None  # the reason last logged, and when

    def record(self, verdict: Verdict) -> bool:
        """True once healthy; a failure is logged when its reason is new, or every LOG_EVERY seconds."""
        if verdict.healthy:
            after = f" after {self.failures} failed check{'s' if self.failures != 1 else ''}" if self.failures else ""
            self.log.info("reuseport-standby: %s: GET %s answered %s%s; taking traffic",
                          self.who, self.target, verdict.reason, after)
            return True
        self.failures += 1
        now = self.clock()
        if self._last is None or self._last[0] != verdict.reason or now - self._last[1] >= LOG_EVERY:
            self._last = (verdict.reason, now)
            self.log.warning("reuseport-standby: %s not healthy: GET %s %s; no traffic until it answers 2xx "
                             "(checked every %g s, %d failed so far)", self.who, self.target,
                             f"answered {verdict.reason}" if verdict.reason[:1].isdigit() else verdict.reason,
                             RETRY_INTERVAL, self.failures)
        return False
