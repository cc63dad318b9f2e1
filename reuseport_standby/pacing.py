"""Accept pacing for asyncio servers: take from the kernel's queue only what is about to be served.

asyncio's own accept loop takes up to ``backlog`` connections from a listener
each time it is readable.  Under a burst, a uvicorn process therefore holds
dozens of connections it has not even read yet; if it is SIGKILLed (OOM,
watchdog, a crash) they die with it, whereas in the kernel's queue they would
have been migrated to the other instance (SELECT_OR_MIGRATE).

:class:`PacedListener` serves one listening socket with an accept loop of
its own: at most ``limit`` connections may be *unread* (accepted, no byte
received yet) at a time.  While that many are, the listener is taken out of
the event loop and what waits stays in the kernel, where it migrates if this
process dies; it is put back as soon as one of them delivers data or closes.
A connection that has sent its request counts no longer, so keep-alive and
pipelining are unaffected: the bound is on what is queued *here* and not
being worked on.

:func:`pacing_loop_factory` wraps an event-loop factory so that the loop's
``create_server(sock=...)`` returns a :class:`PacedListener`: uvicorn builds
its loop from ``Config.get_loop_factory()`` in every process that serves
(single process, ``--workers`` children, the gunicorn worker) and serves the
handed-out sockets with ``create_server(sock=...)``, so this one hook paces
all of them.  Only ``close()``/``wait_closed()``/``sockets`` of the returned
object are used by uvicorn.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import ssl as _ssl
from collections.abc import Callable
from typing import Any

from .names import ENV_ACCEPT_AHEAD

log = logging.getLogger(__name__)

# Connections a process may hold accepted but unread; 0: asyncio's own accept loop.  Off by
# default: measured (docs/benchmarks.md, "Accept pacing and keep-alive drain"; 2 workers, 32
# clients), 4 cuts the unread requests a SIGKILL takes from ~11 to ~7 per kill but costs ~12 %
# more CPU per request in the worst case (empty app, a new connection per request), and a
# client that connects and sends nothing holds a unit of the budget: as many such clients as
# the bound stall a process's accepts.  Turn it on (4 is the measured choice) where SIGKILLs
# are more likely than such clients, e.g. behind a proxy that sends requests at once.
DEFAULT_ACCEPT_AHEAD = 0

#: Called with the peer address of every connection a paced listener accepts, as
#: ``accept()`` returns (bench/recording.py records accepts through it, to tell a
#: request lost inside a worker from one lost in a queue).  None: nothing called.
on_accept: Callable[[Any], None] | None = None

ProtocolFactory = Callable[[], asyncio.BaseProtocol]
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def accept_ahead(value: int | str | None = None) -> int:
    """The bound to use: ``value``, else ``$REUSEPORT_STANDBY_ACCEPT_AHEAD``, else the default; 0 turns pacing off."""
    raw = value if value is not None else os.environ.get(ENV_ACCEPT_AHEAD)
    if raw is None or raw == "":
        return DEFAULT_ACCEPT_AHEAD
    try:
        limit = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_ACCEPT_AHEAD} must be a whole number (0: no pacing), not {raw!r}") from None
    if limit < 0:
        raise ValueError(f"{ENV_ACCEPT_AHEAD} must be 0 or more, not {limit}")
    return limit


class PacedListener:
    """Serves one listening socket, never holding more than ``limit`` unread connections.

    Quacks like the part of ``asyncio.Server`` that uvicorn uses.  Closing it
    closes the socket, as ``asyncio.Server.close()`` does (a worker-scope
    listener leaves its slots in its ``close()``).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol_factory: ProtocolFactory,
                 limit: int, ssl: _ssl.SSLContext | None = None, ssl_handshake_timeout: float | None = None) -> None:
        if limit < 1:
            raise ValueError("a paced listener needs a limit of at least 1")
        self._loop = loop
        self._sock = sock
        self._protocol_factory = protocol_factory
        self._ssl = ssl
        self._ssl_handshake_timeout = ssl_handshake_timeout
        self.limit = limit
        self.unread = 0
        self._connecting: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks
        self._reading = False
        self._closed = False

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else (self._sock,)

    def is_serving(self) -> bool:
        return not self._closed

    def start(self) -> None:
        self._sock.setblocking(False)
        self._resume()

    def close(self) -> None:
        """Stop accepting and close the socket; connections already made go on."""
        if self._closed:
            return
        self._closed = True
        self._pause()
        self._sock.close()

    async def wait_closed(self) -> None:
        return None  # nothing of its own to wait for: uvicorn waits for the connections itself

    def _resume(self) -> None:
        if not self._reading and not self._closed and self.unread < self.limit:
            self._loop.add_reader(self._sock.fileno(), self._accept_some)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False

    def _accept_some(self) -> None:
        """Accept while the budget allows; what is left stays queued in the kernel."""
        while self.unread < self.limit and not self._closed:
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # EMFILE and the like: asyncio's loop backs off the same way
                log.error("accept failed on %s: %s; retrying in 1 s", self._sock.getsockname(), exc)
                self._pause()
                self._loop.call_later(1.0, self._resume)
                return
            if on_accept is not None:
                on_accept(peer)
            conn.setblocking(False)
            self.unread += 1
            task = self._loop.create_task(self._connect(conn))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)
        if self.unread >= self.limit:
            self._pause()  # back in the loop when a connection is read (_release)

    async def _connect(self, conn: socket.socket) -> None:
        released = _Once(self._release)
        try:
            await self._loop.connect_accepted_socket(
                functools.partial(self._make_protocol, released), sock=conn, ssl=self._ssl,
                ssl_handshake_timeout=self._ssl_handshake_timeout if self._ssl is not None else None)
        except (OSError, asyncio.TimeoutError) as exc:  # the client left, a TLS handshake failed
            log.debug("accepted connection failed before serving: %s", exc)
            conn.close()
            released()
        except Exception:  # the protocol factory failed: log it, and never leak the budget
            log.exception("could not serve an accepted connection")
            conn.close()
            released()

    def _make_protocol(self, released: "_Once") -> asyncio.BaseProtocol:
        protocol = self._protocol_factory()
        watch_first_read(protocol, released)
        return protocol

    def _release(self) -> None:
        self.unread -= 1
        self._resume()


class _Once:
    """A callback that runs at most once however many paths reach it (data, EOF, loss, failure)."""

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback: Callable[[], None] | None = callback

    def __call__(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


# An EOF alone is followed by connection_lost (uvicorn's eof_received asks for the close), so the
# two callbacks that deliver bytes and the loss are enough.
_FIRST_READ_HOOKS = ("data_received", "buffer_updated", "connection_lost")


def watch_first_read(protocol: asyncio.BaseProtocol, on_first: Callable[[], None]) -> None:
    """Call ``on_first`` when ``protocol`` first receives data or loses its connection.

    Instance attributes shadow the protocol's methods until then, and are
    removed at once: after the first read the protocol runs exactly its own
    code, with no extra call per chunk.
    """

    if not hasattr(protocol, "__dict__"):  # slotted: cannot be watched, so it counts as read at once
        on_first()
        return

    def fire() -> None:
        for name in _FIRST_READ_HOOKS:
            protocol.__dict__.pop(name, None)
        on_first()

    for name in _FIRST_READ_HOOKS:
        original = getattr(protocol, name, None)
        if original is not None:
            setattr(protocol, name, _first_then(fire, original))


def _first_then(fire: Callable[[], None], original: Callable[..., Any]) -> Callable[..., Any]:
    def hook(*args: Any) -> Any:
        fire()
        return original(*args)
    return hook


async def _paced_create_server(loop: asyncio.AbstractEventLoop, original: Callable[..., Any], limit: int,
                               protocol_factory: ProtocolFactory, host: Any = None, port: Any = None,
                               **kwargs: Any) -> Any:
    """``loop.create_server`` that paces a server given an existing ``sock``; anything else goes to asyncio."""
    sock = kwargs.get("sock")
    if sock is None or host is not None or port is not None or kwargs.get("start_serving") is False:
        return await original(protocol_factory, host, port, **kwargs)
    listener = PacedListener(loop, sock, protocol_factory, limit, ssl=kwargs.get("ssl"),
                             ssl_handshake_timeout=kwargs.get("ssl_handshake_timeout"))
    listener.start()
    log.debug("accept pacing on %s: at most %d unread connections", sock.getsockname(), limit)
    return listener


def pace(loop: asyncio.AbstractEventLoop, limit: int) -> asyncio.AbstractEventLoop:
    """Make ``loop.create_server(sock=...)`` serve through a :class:`PacedListener`; ``limit`` 0: leave it alone."""
    if limit > 0:
        original = loop.create_server
        try:
            loop.create_server = functools.partial(_paced_create_server, loop, original, limit)  # type: ignore[method-assign]
        except AttributeError:  # a loop class without instance attributes: serve, unpaced, rather than fail
            log.warning("%s cannot be paced: accepting as it does by itself", type(loop).__name__)
    return loop


def pacing_loop_factory(base: LoopFactory | None, limit: int) -> LoopFactory | None:
    """``base`` (None: asyncio's default loop), made by :func:`pace`; ``base`` itself when ``limit`` is 0."""
    if limit <= 0:
        return base
    return functools.partial(_new_paced_loop, base, limit)


def _new_paced_loop(base: LoopFactory | None, limit: int) -> asyncio.AbstractEventLoop:
    loop = base() if base is not None else asyncio.new_event_loop()
    return pace(loop, limit)
