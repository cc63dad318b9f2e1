"""An ASGI app for the integration tests, with a lifespan that can be slow.

The body is ``ROLE PID READY_AT`` where READY_AT is the CLOCK_MONOTONIC time
at which lifespan startup completed (see wsgi_app.py).

TEST_APP_LIFESPAN_DELAY: seconds lifespan startup takes.
TEST_APP_REQUEST_DELAY: seconds every request takes.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Awaitable, Callable

ROLE = os.environ.get("REUSEPORT_STANDBY_ROLE", "none")
LIFESPAN_DELAY = float(os.environ.get("TEST_APP_LIFESPAN_DELAY", "0"))
REQUEST_DELAY = float(os.environ.get("TEST_APP_REQUEST_DELAY", "0"))
ready_at = time.monotonic()

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    global ready_at
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.sleep(LIFESPAN_DELAY)
                ready_at = time.monotonic()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if REQUEST_DELAY:
        await asyncio.sleep(REQUEST_DELAY)
    body = f"{ROLE} {os.getpid()} {ready_at:.6f}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
