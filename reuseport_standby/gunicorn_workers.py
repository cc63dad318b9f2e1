"""gunicorn worker classes that lose nothing when gunicorn stops them.

``UvicornWorker``: ``uvicorn_worker.UvicornWorker`` whose uvicorn config is
:class:`reuseport_standby.uvicorn.StandbyConfig`.  Stock uvicorn 0.54 closes,
at shutdown, every connection that has not delivered its request yet —
including one accepted an instant earlier — so a HUP or a ``max_requests``
recycle of an active instance can reset a request; with this class such a
connection gets up to a second to deliver its request, which is served.
The same config paces its accepts (reuseport_standby/pacing.py: a SIGKILLed
worker loses only what it was serving, the rest stays queued and migrates)
and drains idle keep-alive connections at shutdown (``Connection: close``,
then a grace for the next request); see docs/uvicorn.md.  Use it with ``-k reuseport_standby.gunicorn_workers.UvicornWorker``.
"""

from __future__ import annotations

from typing import Any

from uvicorn_worker import UvicornWorker as _StockUvicornWorker

from . import pacing
from .uvicorn import StandbyConfig, keepalive_drain


class UvicornWorker(_StockUvicornWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Same fields; StandbyConfig wraps the HTTP protocol class (load) and paces the loop (get_loop_factory).
        self.config.__class__ = StandbyConfig
        pacing.accept_ahead()  # a bad setting fails the worker's boot, with the variable's name
        keepalive_drain(None)
