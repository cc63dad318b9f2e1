"""A test app that refuses to import while the file named by $RS_TEST_BROKEN_FLAG exists
(a "broken new version"), and answers "<role> <pid>" otherwise.  WSGI ``app``, ASGI ``asgi_app``."""

import os

if os.path.exists(os.environ.get("RS_TEST_BROKEN_FLAG", "/nonexistent")):
    raise RuntimeError("this version is broken (test flag file present)")

from reuseport_standby.demo_app import app, asgi_app  # noqa: E402,F401
