"""uvicorn's gunicorn workers, made to lose nothing when gunicorn stops them.

Stock uvicorn 0.54 closes, at shutdown, every connection that has not
delivered its request yet — including one accepted an instant earlier — so
a SIGTERM, a HUP or a ``max_requests`` recycle can reset a request.  Under
``-c python:reuseport_standby.conf``, :func:`adopt` is applied by the
``post_worker_init`` hook to every worker that serves through a
``uvicorn.Config`` (``uvicorn_worker.UvicornWorker``, ``UvicornH11Worker``,
the deprecated ``uvicorn.workers.UvicornWorker``, and subclasses): its config
becomes a :class:`reuseport_standby.uvicorn.StandbyConfig` before the worker
runs its server.  A connection accepted before the shutdown then gets up to
a second to deliver its request, which is served; accepts are paced
(reuseport_standby/pacing.py: a SIGKILLed worker loses only what it was
serving); idle keep-alive connections drain (``Connection: close``, then a
grace for the next request).  See docs/gunicorn.md and docs/uvicorn.md.

``UvicornWorker`` here is the stock class adopted at construction, for
configs that name it (``-k reuseport_standby.gunicorn_workers.UvicornWorker``);
with our hooks the stock name does the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gunicorn.workers.base import Worker

# Modules whose gunicorn worker classes serve through a uvicorn.Config.
UVICORN_WORKER_MODULES = ("uvicorn_worker", "uvicorn.workers")


def is_uvicorn_worker_class(cls: type) -> bool:
    """Whether a gunicorn worker class is (a subclass of) one of uvicorn's, without importing uvicorn."""
    return any(c.__module__ == m or c.__module__.startswith(m + ".")
               for c in getattr(cls, "__mro__", ()) for m in UVICORN_WORKER_MODULES)


def check_settings() -> list[str]:
    """What in the environment a uvicorn worker would refuse at boot: checked in the master instead."""
    from . import pacing
    from .uvicorn import keepalive_drain

    found = []
    for check in (pacing.accept_ahead, lambda: keepalive_drain(None)):
        try:
            check()
        except ValueError as exc:
            found.append(str(exc))
    return found


def adopt(worker: "Worker") -> bool:
    """Give a uvicorn worker, before it runs its server, our config class; False if it is not one.

    Same fields, another class: :class:`StandbyConfig` wraps the HTTP
    protocol class (``load()``, called by ``Server.serve``) and paces the
    loop (``get_loop_factory()``, called by the worker's ``run()``).  A
    project's own Config subclass keeps its overrides under ours.
    """
    import uvicorn

    from .uvicorn import StandbyConfig

    config = getattr(worker, "config", None)
    if not isinstance(config, uvicorn.Config):
        return False
    if isinstance(config, StandbyConfig):
        return True
    base = type(config)
    if base is uvicorn.Config:
        config.__class__ = StandbyConfig
    else:
        config.__class__ = type(f"Standby{base.__name__}", (StandbyConfig, base), {"__module__": __name__})
    return True


def __getattr__(name: str) -> Any:
    # The class needs the uvicorn-worker package; adopt() alone does not.
    if name == "UvicornWorker":
        from uvicorn_worker import UvicornWorker as _Stock

        class UvicornWorker(_Stock):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                adopt(self)

        UvicornWorker.__module__ = __name__
        UvicornWorker.__qualname__ = "UvicornWorker"
        globals()[name] = UvicornWorker
        return UvicornWorker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
