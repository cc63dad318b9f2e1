"""This project's own gunicorn config, composed with reuseport-standby's.

The star import brings reuseport-standby's settings: ``bind`` (the
supervisor's listeners), ``control_socket`` and its hooks.  Set anything
else as usual.  A hook that reuseport-standby also uses (``on_starting``,
``post_worker_init``, ``on_exit``) must be composed, not replaced: gunicorn
refuses to start otherwise.  Helper names start with ``_`` because gunicorn
applies every module-level name that matches one of its settings.
"""

from reuseport_standby.conf import *  # noqa: F401,F403
from reuseport_standby.conf import post_worker_init as _reuseport_standby_post_worker_init
from reuseport_standby.gunicorn import compose as _compose

workers = 2
graceful_timeout = 20


def _log_loaded(worker):
    worker.log.info("flask example: worker %s loaded the app", worker.pid)


post_worker_init = _compose(_reuseport_standby_post_worker_init, _log_loaded)
