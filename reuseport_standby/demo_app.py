"""The app the demo serves: answers "<role> <pid>" so every response says who served it.

``app`` is a Flask app (WSGI, for gunicorn); ``asgi_app`` a bare ASGI app
(for uvicorn), so the demo needs nothing beyond the server it runs.
"""

from __future__ import annotations

import os

from .names import ENV_ROLE
from typing import Any, Awaitable, Callable

ROLE = os.environ.get(ENV_ROLE, "unknown")


def _body() -> bytes:
    return f"{ROLE} {os.getpid()}\n".encode()


try:
    from flask import Flask
except ImportError:  # gunicorn without Flask: a plain WSGI callable does the same
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = _body()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
else:
    app = Flask(__name__)

    @app.get("/")
    def index() -> tuple[bytes, int, dict[str, str]]:
        return _body(), 200, {"Content-Type": "text/plain"}


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
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
