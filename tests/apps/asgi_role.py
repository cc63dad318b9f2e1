"""A plain ASGI app for the uvicorn tests: says who served a request, and when it became ready.

``GET /`` answers ``{"role", "pid", "ready_at", "factory"}`` (``ready_at``: wall
clock when lifespan startup finished).  ``GET /slow?s=SECONDS`` answers
after a delay, to have requests in flight.  Environment:
``STARTUP_DELAY`` (seconds of lifespan startup), ``STARTUP_FAIL=1`` (fail
lifespan startup).  ``app`` is the app; ``create_app`` the ``--factory`` form.
No framework, so a restart costs only uvicorn's import time.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def create_app(factory: bool = True) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    state: dict[str, Any] = {"ready_at": None}

    async def lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.sleep(float(os.environ.get("STARTUP_DELAY", "0")))
                if os.environ.get("STARTUP_FAIL") == "1":
                    await send({"type": "lifespan.startup.failed", "message": "STARTUP_FAIL=1"})
                    return
                state["ready_at"] = time.time()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["path"] == "/slow":
            query = parse_qs(scope.get("query_string", b"").decode())
            await asyncio.sleep(float(query.get("s", ["1"])[0]))
        body = json.dumps({"role": os.environ.get("REUSEPORT_STANDBY_ROLE"), "pid": os.getpid(),
                           "ready_at": state["ready_at"], "factory": factory}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


app = create_app(factory=False)
