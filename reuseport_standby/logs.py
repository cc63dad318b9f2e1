"""Logging of the ``reuseport-standby`` processes (supervisor, ``run``, the CLI): level, format, journald.

Three formats: ``text`` (a timestamp, the pid, the logger, the level), the
same without the timestamp when stderr is the systemd journal (it stamps
every line itself, and reads the ``<N>`` priority prefix), and ``json``
(one object per line, for log shippers).  Only the ``reuseport_standby``
loggers are configured: an app server's own logging is left as it is.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import IO

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")

#: syslog priorities of the sd-daemon line prefix, by logging level
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

PACKAGE = "reuseport_standby"


def level_from(name: str | None, verbose: int, default: int) -> int:
    """``--log-level`` wins; else each ``-v`` is one step more (-v info, -vv debug); else ``default``."""
    if name:
        return getattr(logging, name.upper())
    if verbose >= 2:
        return logging.DEBUG
    if verbose == 1:
        return min(default, logging.INFO)
    return default


def under_journald(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (stderr) is connected to the journal: systemd says so in ``$JOURNAL_STREAM``
    (``DEVICE:INODE`` of the stream it gave us); a child that redirected stderr elsewhere sees no match."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (RFC 3339, UTC), ``level``, ``logger``, ``pid``, ``msg``, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "pid": record.process,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class JournalFormatter(logging.Formatter):
    """A plain line with the sd-daemon ``<N>`` priority prefix and no timestamp (the journal adds its own)."""

    def __init__(self) -> None:
        super().__init__("%(name)s[%(process)d] %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", "\n  ")  # one entry: the journal splits at newlines
        return f"<{_PRIORITY.get(record.levelno, 6)}>{text}"


TEXT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"


def formatter(fmt: str, stream: IO[str] | None = None) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if under_journald(stream):
        return JournalFormatter()
    return logging.Formatter(TEXT)


def setup(level: int, fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """Send the ``reuseport_standby`` loggers to ``stream`` (stderr) at ``level``, in ``fmt``.

    Replaces a handler an earlier call installed (the CLI's ``main`` may run more than once in one
    process, as in tests); leaves the root logger, and so a server's own logging, alone."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter(fmt, out))
    handler.set_name("reuseport-standby")
    pkg = logging.getLogger(PACKAGE)
    for old in [h for h in pkg.handlers if h.get_name() == "reuseport-standby"]:
        pkg.removeHandler(old)
    pkg.addHandler(handler)
    pkg.setLevel(level)
    pkg.propagate = False
    return handler
