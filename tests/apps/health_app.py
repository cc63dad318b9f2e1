"""A test app with a health path: ``/healthz`` answers 2xx only when this version is healthy.

- ``RS_TEST_HEALTH_FILE``: while that file does not exist, /healthz answers 503 (a dependency not up yet).
- ``RS_TEST_HEALTH_RAISE=1``: /healthz raises (a check that crashes).
- ``RS_TEST_HEALTH_VERSION``: a file read once at import; "unhealthy" in it makes this version's /healthz
  answer 503 for its whole life (a bad new version that still imports and serves).
Every other path answers ``ROLE PID`` with 200.  WSGI ``app``; ASGI ``asgi_app``, whose /healthz also
needs the state its lifespan startup made (``scope["state"]``), as a FastAPI app's would.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

ROLE = os.environ.get("REUSEPORT_STANDBY_ROLE", "none")
_version_file = os.environ.get("RS_TEST_HEALTH_VERSION")
BAD_VERSION = bool(_version_file) and os.path.exists(_version_file) and "unhealthy" in open(_version_file).read()


def healthy() -> tuple[int, str]:
    if os.environ.get("RS_TEST_HEALTH_RAISE") == "1":
        raise RuntimeError("database unreachable (test)")
    if BAD_VERSION:
        return 503, "this version is unhealthy"
    flag = os.environ.get("RS_TEST_HEALTH_FILE")
    if flag and not os.path.exists(flag):
        return 503, "waiting for the flag file"
    return 200, "ok"


def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/healthz":
        code, text = healthy()
    else:
        code, text = 200, f"{ROLE} {os.getpid()}"
    body = f"{text}\n".encode()
    start_response(f"{code} {'OK' if code == 200 else 'Service Unavailable'}",
                   [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi_app(scope: dict[str, Any], receive: Callable, send: Callable) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                scope["state"]["started"] = True
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/healthz":
        if not scope.get("state", {}).get("started"):
            raise RuntimeError("no lifespan state in the scope")
        code, text = healthy()
    else:
        code, text = 200, f"{ROLE} {os.getpid()}"
    body = f"{text}\n".encode()
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
