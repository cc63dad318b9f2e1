"""An app whose answer the path chooses, WSGI (``app``) and ASGI (``asgi``), for the outcome counts.

/ok -> 200, /missing -> 404, /fail -> 500, /raise -> the app raises (the server answers 500).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

STATUS = {"/ok": "200 OK", "/missing": "404 Not Found", "/fail": "500 Internal Server Error"}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/raise":
        raise RuntimeError("this request raises (outcomes test)")
    start_response(STATUS.get(path, "200 OK"), [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]


async def asgi(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope.get("path", "/")
    if path == "/raise":
        raise RuntimeError("this request raises (outcomes test)")
    status = int(STATUS.get(path, "200")[:3])
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"3")]})
    await send({"type": "http.response.body", "body": b"ok\n"})
