"""Count every request an app answers: WSGI and ASGI wrappers that record into ``outcomes.RECORDER``.

The integrations install them in every process that serves (gunicorn's
``post_worker_init``, ``StandbyConfig.load``), so an instance's outcomes are
what its app did, whatever the server.  Per request they cost one clock
read at each end, a closure around ``start_response`` / ``send`` and one
``Recorder.record``: bench/outcomes.py measures it against the same server
without them.

What is counted, and when:

- WSGI: from the call to the response iterable's ``close()`` (the server
  calls it after the last byte, or after a failure); the status is the one
  given to ``start_response``.  The app raising, at the call or while its
  body is iterated, counts as ``exception``; an iterable that ends without
  ``start_response`` as ``no_response``.
- ASGI (``http`` scopes only; websocket and lifespan pass untouched): from
  the call to its return; the status is ``http.response.start``'s.  Raising
  (cancellation included) counts as ``exception``; returning without a
  response start as ``no_response``.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any, Awaitable, Callable, Iterable, Iterator, MutableMapping

from .outcomes import RECORDER, Recorder, kind_of

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _kind(status: object) -> str:
    """A status line ("200 OK") or code (200) to its class; anything else is the server's fault."""
    try:
        code = int(status[:3]) if isinstance(status, str) else status  # type: ignore[call-overload]
    except ValueError:
        return "5xx"
    if isinstance(code, bool) or not isinstance(code, int):
        return "5xx"
    return kind_of(code)


class RecordingWSGI:
    """A WSGI app that counts what ``app`` answered (see the module's doc)."""

    __slots__ = ("app", "recorder", "__wrapped__")

    def __init__(self, app: WSGIApp, recorder: Recorder = RECORDER) -> None:
        self.app = app
        self.recorder = recorder
        self.__wrapped__ = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start = perf_counter()
        body = _Body(self.recorder, start)

        def recording_start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            body.status = status
            return start_response(status, headers, exc_info) if exc_info is not None else start_response(status, headers)

        try:
            result = self.app(environ, recording_start_response)
        except BaseException:
            self.recorder.record("exception", perf_counter() - start)
            raise
        wrapper_type = environ.get("wsgi.file_wrapper")
        if isinstance(wrapper_type, type) and isinstance(result, wrapper_type):
            # The server sends a file wrapper with sendfile(): hand it back as it is, and count at its close.
            body.inner_close = getattr(result, "close", None)
            try:
                result.close = body.close  # type: ignore[method-assign]
            except AttributeError:
                body.close()  # a wrapper that takes no attributes: counted now, without the send
            return result
        body.result = result
        body.inner_close = getattr(result, "close", None)
        return body


class _Body:
    """The response iterable as the server sees it; ``close()`` records the request, once."""

    __slots__ = ("recorder", "start", "status", "result", "inner_close", "failed", "done")

    def __init__(self, recorder: Recorder, start: float) -> None:
        self.recorder = recorder
        self.start = start
        self.status: str | None = None
        self.result: Any = ()
        self.inner_close: Callable[[], Any] | None = None
        self.failed = False
        self.done = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self.result
        except GeneratorExit:
            raise
        except BaseException:
            self.failed = True
            raise

    def close(self) -> None:
        try:
            if self.inner_close is not None:
                self.inner_close()
        except BaseException:
            self.failed = True
            raise
        finally:
            if not self.done:
                self.done = True
                kind = ("exception" if self.failed else
                        "no_response" if self.status is None else _kind(self.status))
                self.recorder.record(kind, perf_counter() - self.start)


class RecordingASGI:
    """An ASGI 3 app that counts what ``app`` answered on ``http`` scopes (see the module's doc)."""

    __slots__ = ("app", "recorder", "__wrapped__")

    def __init__(self, app: ASGIApp, recorder: Recorder = RECORDER) -> None:
        self.app = app
        self.recorder = recorder
        self.__wrapped__ = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = perf_counter()
        status: Any = None

        async def recording_send(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if status is None and message["type"] == "http.response.start":
                status = message.get("status", 0)
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except BaseException:
            self.recorder.record("exception", perf_counter() - start)
            raise
        self.recorder.record("no_response" if status is None else _kind(status), perf_counter() - start)


def wsgi(app: WSGIApp, recorder: Recorder = RECORDER) -> WSGIApp:
    """``app`` recording into ``recorder``; an app wrapped already is returned as it is."""
    return app if isinstance(app, RecordingWSGI) else RecordingWSGI(app, recorder)


def asgi(app: ASGIApp, recorder: Recorder = RECORDER) -> ASGIApp:
    """``app`` (ASGI 3) recording into ``recorder``; an app wrapped already is returned as it is."""
    return app if isinstance(app, RecordingASGI) else RecordingASGI(app, recorder)
