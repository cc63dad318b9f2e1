"""The recording wrappers against small WSGI and ASGI apps: what each request counts as (fast, no server)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Iterable

import pytest

from reuseport_standby import recording
from reuseport_standby.outcomes import KINDS, Outcomes, Recorder, bucket_of


def counts(rec: Recorder) -> dict[str, int]:
    return {k: v for k, v in rec.snapshot().counts.items() if v}


def call_wsgi(app: Callable[..., Iterable[bytes]], environ: dict[str, Any] | None = None) -> tuple[list[bytes], list[str]]:
    """What a server does: call, iterate, close (close also when iterating fails)."""
    seen: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        seen.append(status)
        return lambda data: None

    body = app(environ or {}, start_response)
    try:
        return list(body), seen
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


def status_app(status: str) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response(status, [])
        return [b"x"]
    return app


@pytest.mark.parametrize("status, kind", [("200 OK", "2xx"), ("204 No Content", "2xx"), ("301 Moved", "3xx"),
                                          ("404 Not Found", "4xx"), ("500 Oops", "5xx"), ("503 Busy", "5xx"),
                                          ("101 Switching", "1xx"), ("999 What", "5xx"), ("abc", "5xx")])
def test_wsgi_status_classes(status: str, kind: str) -> None:
    rec = Recorder()
    body, seen = call_wsgi(recording.wsgi(status_app(status), rec))
    assert body == [b"x"] and seen == [status]
    assert counts(rec) == {kind: 1}


def test_wsgi_app_that_raises_counts_an_exception_and_still_raises() -> None:
    rec = Recorder()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        raise ValueError("boom")

    with pytest.raises(ValueError):
        call_wsgi(recording.wsgi(app, rec))
    assert counts(rec) == {"exception": 1}


def test_wsgi_body_that_raises_midway_counts_an_exception_once() -> None:
    rec = Recorder()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [])
        yield b"first"
        raise OSError("the database went away")

    with pytest.raises(OSError):
        call_wsgi(recording.wsgi(app, rec))
    assert counts(rec) == {"exception": 1}


def test_wsgi_streaming_body_is_timed_to_its_close_and_status_may_come_late() -> None:
    """A generator calls start_response at its first item (allowed by PEP 3333); the latency runs to close()."""
    rec = Recorder()
    closed: list[bool] = []

    class Stream:
        def __init__(self, start_response: Callable[..., Any]) -> None:
            self.start_response = start_response

        def __iter__(self) -> Any:
            self.start_response("206 Partial", [])
            for _ in range(3):
                time.sleep(0.01)
                yield b"chunk"

        def close(self) -> None:
            closed.append(True)

    body, _ = call_wsgi(recording.wsgi(lambda environ, sr: Stream(sr), rec))
    assert body == [b"chunk"] * 3 and closed == [True]
    snap = rec.snapshot()
    assert counts(rec) == {"2xx": 1}
    assert snap.latency.index(1) >= bucket_of(0.03)  # the three sleeps are inside (a busy host may add more)
    assert snap.quantile(1.0) >= 0.03


def test_wsgi_iterable_without_start_response_is_no_response() -> None:
    rec = Recorder()
    call_wsgi(recording.wsgi(lambda environ, sr: [], rec))
    assert counts(rec) == {"no_response": 1}


def test_wsgi_close_twice_counts_once_and_file_wrapper_is_passed_through() -> None:
    rec = Recorder()

    class FileWrapper:
        def __init__(self) -> None:
            self.closed = 0

        def __iter__(self) -> Any:
            return iter([b"file"])

        def close(self) -> None:
            self.closed += 1

    made: list[FileWrapper] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start_response("200 OK", [])
        made.append(environ["wsgi.file_wrapper"]())
        return made[0]

    wrapped = recording.wsgi(app, rec)
    result = wrapped({"wsgi.file_wrapper": FileWrapper}, lambda s, h, e=None: None)
    assert result is made[0]  # the server still sees its own wrapper (sendfile)
    result.close()
    result.close()
    assert made[0].closed == 2 and counts(rec) == {"2xx": 1}


def test_wrapping_is_idempotent() -> None:
    inner = status_app("200 OK")
    once = recording.wsgi(inner)
    assert recording.wsgi(once) is once
    app = recording.asgi(lambda s, r, se: None)  # type: ignore[arg-type, return-value]
    assert recording.asgi(app) is app


def run_asgi(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def asgi_status(status: int, delay: float = 0.0) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        for _ in range(2):
            await asyncio.sleep(delay)
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    return app


@pytest.mark.parametrize("status, kind", [(200, "2xx"), (302, "3xx"), (429, "4xx"), (502, "5xx"), (42, "5xx")])
def test_asgi_status_classes(status: int, kind: str) -> None:
    rec = Recorder()
    sent = run_asgi(recording.asgi(asgi_status(status), rec), {"type": "http"})
    assert sent[0]["status"] == status and len(sent) == 4
    assert counts(rec) == {kind: 1}


def test_asgi_streaming_latency_lands_in_its_bucket() -> None:
    rec = Recorder()
    run_asgi(recording.asgi(asgi_status(200, delay=0.02), rec), {"type": "http"})
    snap = rec.snapshot()
    assert snap.requests == 1 and snap.quantile(1.0) >= 0.04  # both sleeps are inside


def test_asgi_raising_and_returning_without_response() -> None:
    rec = Recorder()

    async def raises(scope: Any, receive: Any, send: Any) -> None:
        raise KeyError("boom")

    async def silent(scope: Any, receive: Any, send: Any) -> None:
        return None

    async def raises_after_start(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("half a response")

    with pytest.raises(KeyError):
        run_asgi(recording.asgi(raises, rec), {"type": "http"})
    with pytest.raises(RuntimeError):
        run_asgi(recording.asgi(raises_after_start, rec), {"type": "http"})
    run_asgi(recording.asgi(silent, rec), {"type": "http"})
    assert counts(rec) == {"exception": 2, "no_response": 1}


@pytest.mark.parametrize("kind", ["websocket", "lifespan"])
def test_asgi_other_scopes_pass_untouched(kind: str) -> None:
    rec = Recorder()
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(send)
        await send({"type": f"{kind}.something"})

    sent = run_asgi(recording.asgi(app, rec), {"type": kind})
    assert sent == [{"type": f"{kind}.something"}]
    assert seen[0].__name__ == "send"  # the server's own send, not ours
    assert rec.snapshot().requests == 0


def test_recorder_snapshot_round_trips_through_the_wire() -> None:
    rec = Recorder()
    for status in ("200 OK", "404 X", "500 Y"):
        call_wsgi(recording.wsgi(status_app(status), rec))
    snap = rec.snapshot()
    assert Outcomes.from_wire(snap.to_wire()) == snap
    assert set(snap.counts) == set(KINDS)
