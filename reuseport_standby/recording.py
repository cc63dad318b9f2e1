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

from .outcomes import KINDS as _KINDS, RECORDER, Recorder, kind_of

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


#: a WSGI status line's first digit -> its class (a "1xx" ... "5xx" line whose next two characters are digits)
_CLASS_OF_DIGIT = {"1": "1xx", "2": "2xx", "3": "3xx", "4": "4xx", "5": "5xx"}


class RecordingWSGI:
    """A WSGI app that counts what ``app`` answered (see the module's doc)."""

    __slots__ = ("app", "recorder", "__wrapped__")

    def __init__(self, app: WSGIApp, recorder: Recorder = RECORDER) -> None:
        self.app = app
        self.recorder = recorder
        self.__wrapped__ = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = _Body(self.recorder, start_response)
        try:
            body.result = result = self.app(environ, body.start_response)
        except BaseException:
            self.recorder.record("exception", perf_counter() - body.start)
            raise
        body.inner_close = getattr(result, "close", None)
        wrapper_type = environ.get("wsgi.file_wrapper")
        if wrapper_type is not None and isinstance(wrapper_type, type) and isinstance(result, wrapper_type):
            # The server sends a file wrapper with sendfile(): hand it back as it is, and count at its close.
            try:
                result.close = body.close  # type: ignore[method-assign, attr-defined]
            except AttributeError:
                body.close()  # a wrapper that takes no attributes: counted now, without the send
            return result
        return body


class _Body:
    """One request: its ``start_response``, and the response iterable as the server sees it;
    ``close()`` records the request, once.  Defaults live on the class: fewer stores per request."""

    status: str | None = None
    failed = False
    done = False
    inner_close: Callable[[], Any] | None = None

    def __init__(self, recorder: Recorder, start_response: Callable[..., Any]) -> None:
        self.recorder = recorder
        self.server_start_response = start_response
        self.start = perf_counter()

    def start_response(self, status: str, headers: Any, exc_info: Any = None) -> Any:
        self.status = status
        if exc_info is None:
            return self.server_start_response(status, headers)
        return self.server_start_response(status, headers, exc_info)

    def __iter__(self) -> Iterator[bytes]:
        result = self.result
        if type(result) is list or type(result) is tuple:
            return iter(result)  # cannot raise while iterated: no generator frame for the common case
        return self._guarded(result)

    def _guarded(self, result: Iterable[bytes]) -> Iterator[bytes]:
        try:
            yield from result
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
                status = self.status
                if self.failed:
                    kind = "exception"
                elif status is None:
                    kind = "no_response"
                elif status[:1] in _CLASS_OF_DIGIT and status[1:3].isdigit():
                    kind = _CLASS_OF_DIGIT[status[:1]]  # the common case, without parsing a number
                else:
                    kind = _kind(status)
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

        def recording_send(message: MutableMapping[str, Any]) -> Awaitable[None]:
            # A plain function returning the server's own awaitable: no coroutine frame of ours per message.
            nonlocal status
            if status is None and message["type"] == "http.response.start":
                status = message.get("status", 0)
            return send(message)

        try:
            await self.app(scope, receive, recording_send)
        except BaseException:
            self.recorder.record("exception", perf_counter() - start)
            raise
        if type(status) is int and 100 <= status < 600:
            kind = _KINDS[status // 100 - 1]
        else:
            kind = "no_response" if status is None else _kind(status)
        self.recorder.record(kind, perf_counter() - start)


def wsgi(app: WSGIApp, recorder: Recorder = RECORDER) -> WSGIApp:
    """``app`` recording into ``recorder``; an app wrapped already is returned as it is."""
    return app if isinstance(app, RecordingWSGI) else RecordingWSGI(app, recorder)


def asgi(app: ASGIApp, recorder: Recorder = RECORDER) -> ASGIApp:
    """``app`` (ASGI 3) recording into ``recorder``; an app wrapped already is returned as it is."""
    return app if isinstance(app, RecordingASGI) else RecordingASGI(app, recorder)


def unwrapped(app: Any) -> Any:
    """The app under our recording wrapper: the health check calls it, so that its probes are not
    counted as requests (a failing check before traffic is no error a client saw)."""
    return app.app if isinstance(app, (RecordingWSGI, RecordingASGI)) else app
