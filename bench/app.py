"""The app under benchmark: the bundled demo app, plus a record of every request it received.

``app`` (WSGI, for gunicorn) wraps :data:`reuseport_standby.demo_app.app`
(Flask); ``asgi_app`` (for uvicorn) wraps
:func:`reuseport_standby.demo_app.asgi_app`.  Both answer ``<role> <pid>``.

Before answering a request that carries ``id=N`` in its query string, the
app appends ``N`` to a file of its own process, ``$BENCH_IDS_DIR/<pid>.ids``
(``O_APPEND``; one ``write`` per id), then works for ``$BENCH_APP_SLEEP_MS``
milliseconds (default 2), so that a worker always holds a request in
flight, as a real app does.  After a run, a failed request whose id is in
some file reached the app and was lost inside a worker (killed while
working on it); one whose id is in no file never reached the app: it was
lost at the connection level (refused, or reset in a listener's queue) --
unless a worker had accepted its connection and died before calling the
app, which bench/recording.py records.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

from reuseport_standby import demo_app

IDS_DIR = os.environ.get("BENCH_IDS_DIR", "")
SLEEP = float(os.environ.get("BENCH_APP_SLEEP_MS", "2")) / 1000.0

_fd = -1
_fd_pid = -1


def record(query: str) -> None:
    """Append the request's id to this process's file (opened once per process: workers fork)."""
    global _fd, _fd_pid
    if not IDS_DIR or "id=" not in query:
        return
    ids = parse_qs(query).get("id")
    if not ids:
        return
    pid = os.getpid()
    if _fd_pid != pid:
        _fd = os.open(os.path.join(IDS_DIR, f"{pid}.ids"), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        _fd_pid = pid
    os.write(_fd, f"{ids[0]}\n".encode())


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    record(environ.get("QUERY_STRING", ""))
    if SLEEP:
        time.sleep(SLEEP)
    return demo_app.app(environ, start_response)


async def asgi_app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                   send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    if scope["type"] == "http":
        record(scope.get("query_string", b"").decode("latin-1"))
        if SLEEP:
            await asyncio.sleep(SLEEP)
    await demo_app.asgi_app(scope, receive, send)


def read_ids(directory: str) -> set[int]:
    """Every id the app recorded in ``directory`` (all processes)."""
    seen: set[int] = set()
    for name in os.listdir(directory):
        if name.endswith(".ids"):
            with open(os.path.join(directory, name), "rb") as f:
                for line in f.read().split(b"\n"):
                    if line.strip().isdigit():
                        seen.add(int(line))
    return seen
