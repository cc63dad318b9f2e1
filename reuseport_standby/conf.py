"""gunicorn settings for reuseport-standby.

    REUSEPORT_STANDBY_ROLE=primary gunicorn -c python:reuseport_standby.conf app:app

Environment: ``REUSEPORT_STANDBY_ROLE`` (``primary`` or ``standby``, required),
``REUSEPORT_STANDBY_SERVICE`` (default ``default``), ``REUSEPORT_STANDBY_CONTROL``
(the supervisor's control socket, default ``/run/reuseport-standby/SERVICE.sock``),
``REUSEPORT_STANDBY_CONNECT_TIMEOUT`` (seconds to wait for the supervisor, default 30),
``REUSEPORT_STANDBY_SCOPE`` (``instance``, default: one set of listeners per gunicorn;
``worker``: one per worker), ``REUSEPORT_STANDBY_HEALTH_PATH`` (``/healthz``: a worker
takes traffic only once its app answers GET there with 2xx).

Importing this module registers the gunicorn master with the supervisor and
takes its listeners; the logic lives in :mod:`reuseport_standby.gunicorn`.
gunicorn applies every module-level name that matches a setting, so only
settings are public here.  A project config of its own does
``from reuseport_standby.conf import *`` and composes hooks it also needs
(docs/gunicorn.md).
"""

from reuseport_standby import gunicorn as _integration

bind = _integration.current().binds
control_socket = _integration.current().control_socket
on_starting = _integration.on_starting
post_fork = _integration.post_fork
post_worker_init = _integration.post_worker_init
on_exit = _integration.on_exit

__all__ = ["bind", "control_socket", "on_starting", "post_fork", "post_worker_init", "on_exit"]
