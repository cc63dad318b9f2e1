"""Server-side hooks that record a request's id as soon as a worker holds it.

The app (bench/app.py) records the ids it is called with; these record them
earlier, as soon as a worker process has accepted the connection, so that a
request lost because its worker died between ``accept()`` and the app is
counted as lost inside the worker, not at the connection level:

* ``SyncWorker``: gunicorn's sync worker; after ``accept()`` it peeks at the
  request (``MSG_PEEK``, so gunicorn still reads it all) and records its id.
  Use with ``-k bench.recording.SyncWorker``.
* ``H11Protocol``: uvicorn's h11 protocol (the one uvicorn picks when
  httptools is not installed).  asyncio accepts every connection waiting in
  the listener's queue at once (up to the backlog per wake-up) and reads them
  in later loop iterations, so it peeks at each new connection when it is
  made (the request is usually there already), and records the ids in every
  chunk it reads.  Use with ``--http bench.recording:H11Protocol``.

Both append to ``$BENCH_IDS_DIR/<pid>.read`` (one ``write`` per id, ``O_APPEND``).
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any

IDS_DIR = os.environ.get("BENCH_IDS_DIR", "")
_ID = re.compile(rb"[?&]id=(\d+)")

_fd = -1
_fd_pid = -1


def record(data: bytes) -> None:
    global _fd, _fd_pid
    if not IDS_DIR:
        return
    ids = _ID.findall(data)
    if not ids:
        return
    pid = os.getpid()
    if _fd_pid != pid:
        _fd = os.open(os.path.join(IDS_DIR, f"{pid}.read"), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        _fd_pid = pid
    os.write(_fd, b"".join(i + b"\n" for i in ids))


try:
    from gunicorn.workers.sync import SyncWorker as _SyncWorker
except ImportError:  # pragma: no cover - uvicorn only
    pass
else:
    class SyncWorker(_SyncWorker):
        """gunicorn's sync worker, recording each request's id right after ``accept()``."""

        def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
            try:
                client.settimeout(1.0)
                record(client.recv(2048, socket.MSG_PEEK))
            except OSError:
                pass
            finally:
                try:
                    client.settimeout(None)  # back to blocking, as SyncWorker.accept left it
                except OSError:
                    pass
            super().handle(listener, client, addr)


try:
    from uvicorn.protocols.http.h11_impl import H11Protocol as _H11Protocol
except ImportError:  # pragma: no cover - gunicorn only
    pass
else:
    class H11Protocol(_H11Protocol):
        """uvicorn's h11 protocol, recording the ids in every chunk it reads."""

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            ts = transport.get_extra_info("socket")
            if ts is not None:
                try:
                    with socket.socket(fileno=os.dup(ts.fileno())) as dup:
                        record(dup.recv(2048, socket.MSG_PEEK | socket.MSG_DONTWAIT))
                except OSError:
                    pass  # nothing arrived yet: data_received records it
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            record(data)
            super().data_received(data)
