"""A WSGI app for the integration tests: says who answered, and since when it could.

The body is ``ROLE PID READY_AT`` where READY_AT is the CLOCK_MONOTONIC time
(shared by every process on the machine) at which the app finished
importing, so a client can tell whether a request was sent before the
instance that answered it could serve.

TEST_APP_IMPORT_DELAY: seconds to sleep while importing (a slow app).
TEST_APP_REQUEST_DELAY: seconds to sleep in every request (requests in flight).
TEST_APP_EXIT_DELAY: seconds a process takes to tear down at exit (a big app).
"""

from __future__ import annotations

import atexit
import os
import time
from typing import Callable, Iterable

time.sleep(float(os.environ.get("TEST_APP_IMPORT_DELAY", "0")))
READY_AT = time.monotonic()
ROLE = os.environ.get("REUSEPORT_STANDBY_ROLE", "none")
REQUEST_DELAY = float(os.environ.get("TEST_APP_REQUEST_DELAY", "0"))
atexit.register(time.sleep, float(os.environ.get("TEST_APP_EXIT_DELAY", "0")))


def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
    if REQUEST_DELAY:
        time.sleep(REQUEST_DELAY)
    body = f"{ROLE} {os.getpid()} {READY_AT:.6f}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
