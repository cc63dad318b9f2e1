"""The app the demo serves: answers "<role> <pid>" so every response says who served it.

``app`` is a Flask app (WSGI, for gunicorn); ``asgi_app`` a bare ASGI app
(for uvicorn), so the demo needs nothing beyond the server it runs.
"""

from __future__ import annotations

import itertools
import os

from .names import ENV_ROLE
from typing import Any, Awaitable, Callable

ROLE = os.environ.get(ENV_ROLE, "unknown")

#: ``demo --bad-version``: a file the demo rewrites between deploys, read at import as new code would be:
#: "<version> good|bad"; a bad version answers 500 to one request in five.  Bodies then start with the version.
VERSION_FILE = "REUSEPORT_STANDBY_DEMO_VERSION_FILE"
VERSION, BAD = "", False
if os.environ.get(VERSION_FILE):
    VERSION, _mode = open(os.environ[VERSION_FILE]).read().split()
    BAD = _mode == "bad"
_served = itertools.count()


def _body() -> bytes:
    return (f"{VERSION} {ROLE} {os.getpid()}\n" if VERSION else f"{ROLE} {os.getpid()}\n").encode()


def _status() -> int:
    return 500 if BAD and next(_served) % 5 == 0 else 200


try:
    from flask import Flask
except ImportError:  # gunicorn without Flask: a plain WSGI callable does the same
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = _body()
        start_response("200 OK" if _status() == 200 else "500 Internal Server Error", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
else:
    app = Flask(__name__)

    @app.get("/")
    def index() -> tuple[bytes, int, dict[str, str]]:
        return _body(), _status(), {"Content-Type": "text/plain"}


async def asgi_app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                   send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = _body()
    await send({"type": "http.response.start", "status": _status(),
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
