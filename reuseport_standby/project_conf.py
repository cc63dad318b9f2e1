"""``reuseport-standby init``: a ``reuseport_standby.conf`` in the user's project.

gunicorn reads ``-c NAME`` as a file path (only ``-c python:MODULE`` imports),
so the literal ``gunicorn -c reuseport_standby.conf app:app`` needs that file
in the directory gunicorn starts in.  ``init`` writes it, commented.  And
since gunicorn reads only the file given with ``-c``, never the project's
``gunicorn.conf.py`` besides, the written file includes that config through
:func:`include`, which composes its hooks with ours instead of letting
either replace the other.
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
from pathlib import Path
from typing import Any

FILENAME = "reuseport_standby.conf"
#: gunicorn's own default config file, read when no -c is given
GUNICORN_DEFAULT = "gunicorn.conf.py"
#: the settings reuseport-standby decides: a project's own value would take the supervisor's listeners away
OURS_ONLY = ("bind", "control_socket")

log = logging.getLogger("reuseport_standby.gunicorn")

HEADER = """\
# reuseport-standby's gunicorn settings for this project (written by `reuseport-standby init`).
#
#   REUSEPORT_STANDBY_ROLE=primary gunicorn -c reuseport_standby.conf APP
#   REUSEPORT_STANDBY_ROLE=standby gunicorn -c reuseport_standby.conf APP
#
# gunicorn reads -c as a path: this file is what makes that command work from this directory
# (`-c python:reuseport_standby.conf` works from anywhere, without it, and without gunicorn's
# warning that this file's name has no .py extension, which is harmless). It brings:
#   bind              the supervisor's listeners (a bind of your own is ignored: the supervisor's
#                     --bind decides the addresses)
#   control_socket    gunicorn's own control socket, one per service and role
#   on_starting, post_fork, post_worker_init, on_exit
#                     the hooks that register this instance and its workers with the supervisor
# Environment: REUSEPORT_STANDBY_ROLE (required), REUSEPORT_STANDBY_SERVICE, REUSEPORT_STANDBY_CONTROL,
# REUSEPORT_STANDBY_SCOPE (docs/gunicorn.md).
from reuseport_standby.conf import *  # noqa: F401,F403
"""

INCLUDE = """
# Your own config, {name}, still applies: gunicorn reads only the file given with -c, so this one
# includes it. A hook of yours that reuseport-standby also uses (on_starting, post_fork,
# post_worker_init, on_exit) runs after ours, composed; your other settings apply as they are.
from reuseport_standby.project_conf import include as _include  # noqa: E402

globals().update(_include(__file__, {path!r}))
"""

STANDALONE = """
# Add settings below as in any gunicorn config (workers = 4, timeout = 30, ...). A hook that
# reuseport-standby also uses must be composed with ours, not replace it (gunicorn would refuse to
# start the instance):
#
#   from reuseport_standby.conf import post_worker_init as _ours
#   from reuseport_standby.gunicorn import compose as _compose
#
#   def _mine(worker):
#       worker.log.info("worker %s ready", worker.pid)
#
#   post_worker_init = _compose(_ours, _mine)
"""


def render(include_path: str | None) -> str:
    """The file's text: ours, then the project's config included (or how to add settings)."""
    if include_path is None:
        return HEADER + STANDALONE
    return HEADER + INCLUDE.format(name=include_path, path=include_path)


def include(here: str, path: str) -> dict[str, Any]:
    """The gunicorn settings of the project's config at ``path`` (relative to the file ``here``), to
    be applied after ours: its hooks that we also set are composed after ours, ``bind`` and
    ``control_socket`` stay ours (with a warning), anything that is not a gunicorn setting is left."""
    from gunicorn.config import KNOWN_SETTINGS

    from . import conf
    from .gunicorn import _HOOK_MARK, compose

    full = Path(here).resolve().parent / path
    theirs = runpy.run_path(str(full), run_name="__config__")
    settings = {s.name for s in KNOWN_SETTINGS}
    out: dict[str, Any] = {}
    for name, value in theirs.items():
        if name not in settings or name.startswith("_"):
            continue
        ours = getattr(conf, name, None)
        if name in OURS_ONLY:
            if value != ours:
                log.warning("%s sets %s; ignored: reuseport-standby's supervisor decides it", full, name)
            continue
        if ours is not None and callable(value):
            # A project config that already composes ours (from reuseport_standby.conf import *) keeps its own.
            out[name] = value if getattr(value, _HOOK_MARK, False) else compose(ours, value)
        else:
            out[name] = value
    return out


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    sp = subparsers.add_parser(
        "init", help=f"write {FILENAME} into a project, so that `gunicorn -c {FILENAME} APP` works there",
        description=f"Write a commented {FILENAME} into DIR (default: the current directory): gunicorn reads "
                    f"`-c {FILENAME}` as a file there. An existing {GUNICORN_DEFAULT} (or --config) is included "
                    f"by it, its hooks composed with reuseport-standby's, since gunicorn reads only the -c file.")
    sp.add_argument("--dir", type=Path, default=Path("."), help="the project directory gunicorn starts in (default: .)")
    sp.add_argument("--config", default=None, metavar="FILE",
                    help=f"the project's gunicorn config to include (default: {GUNICORN_DEFAULT} in DIR, if any; "
                         f"'none' for no include)")
    sp.add_argument("--force", action="store_true", help=f"overwrite an existing {FILENAME}")
    return sp


def command(args: argparse.Namespace) -> int:
    from .errors import ReuseportStandbyError, UsageError

    directory: Path = args.dir
    if not directory.is_dir():
        raise UsageError(f"init: {directory} is not a directory")
    target = directory / FILENAME
    if target.exists() and not args.force:
        raise ReuseportStandbyError(f"{target} exists already; remove it or add --force to overwrite it")
    include_path: str | None
    if args.config == "none":
        include_path = None
    elif args.config is not None:
        config = Path(args.config)
        if not (config if config.is_absolute() else directory / config).is_file():
            raise UsageError(f"init: --config {args.config}: no such file (relative paths are from {directory})")
        include_path = os.path.relpath(config, directory) if config.is_absolute() else str(config)
    else:
        include_path = GUNICORN_DEFAULT if (directory / GUNICORN_DEFAULT).is_file() else None
    try:
        target.write_text(render(include_path))
    except OSError as exc:
        raise ReuseportStandbyError(f"cannot write {target}: {exc.strerror}") from None
    print(f"wrote {target}" + (f" (it includes {include_path})" if include_path else ""))
    print(f"start an instance from {directory}: REUSEPORT_STANDBY_ROLE=primary gunicorn -c {FILENAME} APP")
    return 0
