"""The apps of bench/outcomes.py, each bare and wrapped by reuseport_standby.recording (what the
integrations install): the same code either way, so the difference is the wrapper's cost.

``hello``: the cheapest app there is (the wrapper's worst case, relatively); ``flask``: the bundled
demo app (reuseport_standby/demo_app.py), a small real one.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from reuseport_standby import demo_app, recording


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return [b"hello\n"]


def hello_stream(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """hello, its body an iterator (as most frameworks return): the wrapper's generator path."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return iter([b"hello\n"])


async def hello_asgi(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"6")]})
    await send({"type": "http.response.body", "body": b"hello\n"})


flask = demo_app.app
flask_asgi = demo_app.asgi_app

hello_recorded = recording.wsgi(hello)
hello_stream_recorded = recording.wsgi(hello_stream)
hello_asgi_recorded = recording.asgi(hello_asgi)
flask_recorded = recording.wsgi(flask)
flask_asgi_recorded = recording.asgi(flask_asgi)
