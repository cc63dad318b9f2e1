"""A Starlette app whose startup takes a while; nothing in it knows about reuseport-standby.

Its lifespan stands for the slow part of a real service's start (loading a
model, warming a cache, opening a database pool): ``WARMUP_SECONDS``, 3 by
default.  reuseport-standby sends it no connection before that is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await asyncio.sleep(float(os.environ.get("WARMUP_SECONDS", "3")))
    app.state.ready_at = time.time()
    yield


async def index(request: Request) -> JSONResponse:
    return JSONResponse({
        "message": "hello",
        "role": os.environ.get("REUSEPORT_STANDBY_ROLE", "unmanaged"),
        "pid": os.getpid(),
        "ready_at": request.app.state.ready_at,
    })


def create_app() -> Starlette:
    """The factory ``--factory app:create_app`` calls in every worker."""
    return Starlette(routes=[Route("/", index)], lifespan=lifespan)
