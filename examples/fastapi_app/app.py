"""A FastAPI app whose startup takes a while; nothing in it knows about reuseport-standby.

The lifespan stands for the slow part of a real service's start (a model, a
cache, a database pool): ``WARMUP_SECONDS``, 3 by default.  reuseport-standby
sends an instance no connection before every one of its workers' lifespans
has finished, so the warm-up never shows as an error or a wait to clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from pydantic import BaseModel


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await asyncio.sleep(float(os.environ.get("WARMUP_SECONDS", "3")))
    app.state.ready_at = time.time()
    yield


app = FastAPI(title="fastapi-example", lifespan=lifespan)


class Hello(BaseModel):
    message: str
    role: str
    pid: int
    ready_at: float


class Order(BaseModel):
    item: str
    quantity: int = 1


@app.get("/")
async def index() -> Hello:
    return Hello(message="hello", role=os.environ.get("REUSEPORT_STANDBY_ROLE", "unmanaged"), pid=os.getpid(),
                 ready_at=app.state.ready_at)


@app.post("/orders")
async def order(body: Order) -> dict[str, object]:
    return {"accepted": body.model_dump(), "pid": os.getpid()}
