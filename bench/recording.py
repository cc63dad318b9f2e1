"""Server-side hooks that record every connection a worker accepts: its client port, and when.

The app (bench/app.py) records the ids of the requests it is called with.
That leaves out a request whose connection a worker had already accepted,
but not yet handed to the app, when the worker died: such a request was lost
inside the worker, not in a listener's queue.  So the workers also record,
for each connection they accept, the client's port and the time
(``CLOCK_MONOTONIC``, the clock the load generator stamps its requests
with).  A failed request whose connection was accepted while it was under
way (port equal, time between its start and its end) was held by a worker.

* ``SyncWorker``: gunicorn's sync worker, recording as it starts handling
  an accepted connection.  Use with ``-k bench.recording.SyncWorker``.
* ``loop_factory``: asyncio's selector event loop (what uvicorn runs when
  uvloop is not installed), recording as ``accept()`` returns.  asyncio
  accepts every connection waiting in the listener's queue at once (up to
  the backlog per wake-up) and makes their protocols an iteration or two
  later, so recording in the protocol would miss connections accepted just
  before a kill.  Use with ``--loop bench.recording:loop_factory``.

Both append ``<port> <monotonic ns>`` lines to ``$BENCH_IDS_DIR/<pid>.accepted``
(one ``write`` per connection, ``O_APPEND``).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

IDS_DIR = os.environ.get("BENCH_IDS_DIR", "")

_fd = -1
_fd_pid = -1


def record_accept(peer: Any) -> None:
    global _fd, _fd_pid
    if not IDS_DIR or not isinstance(peer, tuple) or len(peer) < 2:
        return
    now = time.monotonic_ns()
    pid = os.getpid()
    if _fd_pid != pid:
        _fd = os.open(os.path.join(IDS_DIR, f"{pid}.accepted"), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                      0o644)
        _fd_pid = pid
    os.write(_fd, f"{peer[1]} {now}\n".encode())


def read_accepted(directory: str) -> dict[int, list[float]]:
    """Client port -> sorted accept times (seconds, CLOCK_MONOTONIC), over every process's file."""
    found: dict[int, list[float]] = {}
    for name in os.listdir(directory):
        if not name.endswith(".accepted"):
            continue
        with open(os.path.join(directory, name), "rb") as f:
            for line in f.read().split(b"\n"):
                parts = line.split()
                if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                    found.setdefault(int(parts[0]), []).append(int(parts[1]) / 1e9)
    for times in found.values():
        times.sort()
    return found


try:
    from gunicorn.workers.sync import SyncWorker as _SyncWorker
except ImportError:  # pragma: no cover - uvicorn only
    pass
else:
    class SyncWorker(_SyncWorker):
        """gunicorn's sync worker, recording every connection it accepts."""

        def handle(self, listener: Any, client: Any, addr: Any) -> None:
            record_accept(addr)
            super().handle(listener, client, addr)


class _RecordingListener:
    """Stands in for a listening socket inside asyncio: records every connection its accept() returns."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def accept(self) -> tuple[Any, Any]:
        conn, addr = self._sock.accept()
        record_accept(addr)
        return conn, addr

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class RecordingEventLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop (what uvicorn runs without uvloop), recording every accepted connection.

    asyncio accepts in ``_accept_connection``, which calls ``accept()`` on the
    socket given to ``_start_serving``; that socket is wrapped here.
    """

    def _start_serving(self, protocol_factory: Any, sock: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        listener = sock if isinstance(sock, _RecordingListener) else _RecordingListener(sock)
        super()._start_serving(protocol_factory, listener, *args, **kwargs)  # type: ignore[misc]


def loop_factory() -> asyncio.AbstractEventLoop:
    """uvicorn ``--loop bench.recording:loop_factory``.

    Under reuseport-standby's accept pacing (reuseport_standby/pacing.py) the
    handed-out listeners are accepted from by a paced listener, not by
    asyncio's loop: it reports its accepts through ``pacing.on_accept``.
    """
    try:
        from reuseport_standby import pacing
    except ImportError:  # a contender without the package
        pass
    else:
        pacing.on_accept = record_accept
    return RecordingEventLoop()
