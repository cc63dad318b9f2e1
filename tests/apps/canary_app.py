"""A test app whose version and behaviour come from the file named by $RS_TEST_VERSION_FILE, read
at import (as a deploy puts new code on disk): "<version> <mode>", mode one of
  good       answers 200 after BASE_MS of work
  bad500     answers 500 to every fifth request
  slow       takes three times as long
  unhealthy  like good, but GET /healthz answers 503
Every body starts with the version, so a client sees which version answered.  WSGI ``app``,
ASGI ``asgi_app``."""

import asyncio
import itertools
import os
import time

VERSION, MODE = open(os.environ["RS_TEST_VERSION_FILE"]).read().split()
with open(os.environ["RS_TEST_VERSION_FILE"] + ".imports", "a") as _log:  # the test waits for every worker's
    _log.write(f"{VERSION} {os.getpid()}\n")
BASE = float(os.environ.get("RS_TEST_BASE_MS", "10")) / 1000
WORK = BASE * (3 if MODE == "slow" else 1)
_seq = itertools.count()


def _answer(path: str) -> tuple[int, bytes]:
    if path == "/healthz":
        return (503 if MODE == "unhealthy" else 200), f"{VERSION} health\n".encode()
    if MODE == "bad500" and next(_seq) % 5 == 0:
        return 500, f"{VERSION} failed\n".encode()
    return 200, f"{VERSION} {os.getpid()}\n".encode()


def app(environ, start_response):
    status, body = _answer(environ.get("PATH_INFO", "/"))
    if environ.get("PATH_INFO") != "/healthz":
        time.sleep(WORK)
    start_response(f"{status} {'OK' if status == 200 else 'Error'}",
                   [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi_app(scope, receive, send):
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
    status, body = _answer(scope["path"])
    if scope["path"] != "/healthz":
        await asyncio.sleep(WORK)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
