"""gunicorn worker classes that lose nothing when gunicorn stops them.

``UvicornWorker``: ``uvicorn_worker.UvicornWorker`` whose uvicorn config is
:class:`reuseport_standby.uvicorn.StandbyConfig`.  Stock uvicorn 0.54 closes,
at shutdown, every connection that has not delivered its request yet —
including one accepted an instant earlier — so a HUP or a ``max_requests``
recycle of an active instance can reset a request; with this class such a
connection gets up to a second to deliver its request, which is served.
Use it with ``-k reuseport_standby.gunicorn_workers.UvicornWorker``.
"""

from __future__ import annotations

from typing import Any

from uvicorn_worker import UvicornWorker as _StockUvicornWorker

from .uvicorn import StandbyConfig


class UvicornWorker(_StockUvicornWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Same fields; StandbyConfig only wraps the HTTP protocol class in load().
        self.config.__class__ = StandbyConfig
