"""A test app that refuses to import while the file named by $RS_TEST_BROKEN_FLAG exists
(a "broken new version"), takes $RS_TEST_SLOW_START seconds to import (a slow-starting app),
and answers "<role> <pid>" otherwise.  WSGI ``app``, ASGI ``asgi_app``."""

import os
import time

if os.path.exists(os.environ.get("RS_TEST_BROKEN_FLAG", "/nonexistent")):
    raise RuntimeError("this version is broken (test flag file present)")

time.sleep(float(os.environ.get("RS_TEST_SLOW_START", "0")))

from reuseport_standby.demo_app import app, asgi_app  # noqa: E402,F401

if os.environ.get("RS_TEST_SPAWN_DETACHED"):  # an app that leaves a helper running in a session of its own
    import subprocess

    subprocess.Popen(["sleep", "300"], start_new_session=True, stdin=subprocess.DEVNULL)
