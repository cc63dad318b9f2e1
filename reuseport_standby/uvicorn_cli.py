"""``reuseport-standby uvicorn``: uvicorn's own command line, plus a role and a service.

Every argument after ``uvicorn`` goes to a click command made of uvicorn's
own parameters (``uvicorn.main.params``) and ours, so the options mean
exactly what they mean to ``uvicorn``, in any order, with uvicorn's
``UVICORN_*`` environment variables.  The result is handed to
:func:`reuseport_standby.uvicorn.run`.  Neither click nor uvicorn is
imported until the command runs.
"""

from __future__ import annotations

import argparse
import copy
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any

from .names import ENV_CONTROL, ENV_ROLE, ENV_SCOPE, ENV_SERVICE
from . import protocol
from .kernel.layout import WORKERS_PER_INSTANCE

if TYPE_CHECKING:
    import click

PROG = "reuseport-standby uvicorn"
EXIT_USAGE = 2

DESCRIPTION = (
    "Run an ASGI app under uvicorn as the primary or standby instance of a service. "
    "APP and the options are uvicorn's own (see --help), except the address options "
    "(--host, --port, --uds, --fd), --backlog and --reload: the supervisor owns the listening sockets."
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the subcommand; its arguments are left whole for click to parse."""
    sp = subparsers.add_parser(
        "uvicorn", help="run an ASGI app under uvicorn as a primary or standby instance",
        description=DESCRIPTION, add_help=False,
        # No argument may look like an option to argparse: '--factory app:app' must reach click intact.
        prefix_chars="+", usage=f"{PROG} [--role primary|standby] [--service NAME] APP [uvicorn options...]")
    sp.add_argument("uvicorn_args", nargs=argparse.REMAINDER)
    return sp


def command(args: argparse.Namespace) -> int:
    """Parse with uvicorn's parameters, refuse what the supervisor owns, run."""
    import click

    cmd = _click_command()
    try:
        ctx = cmd.make_context(PROG, list(args.uvicorn_args))
        with ctx:
            role, service, control, app, kwargs = config_from_context(ctx)
            scope = ctx.params.get("scope")
    except click.exceptions.Exit as exc:  # --help, --version
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code

    from .uvicorn import run

    # SIGTERM asks for a clean stop.  uvicorn handles it while it serves and
    # re-raises it once drained; ending with status 0 then (and before uvicorn
    # takes over) runs the cleanup that the default action would skip.
    signal.signal(signal.SIGTERM, _terminated)
    if scope == "worker" and (kwargs.get("workers") or 1) > WORKERS_PER_INSTANCE:
        print(f"{PROG}: --scope worker gives every worker a slot of its own, and an instance may have at most "
              f"{WORKERS_PER_INSTANCE} workers (two instances of a role overlap during a restart): "
              f"--workers {kwargs['workers']} is too many", file=sys.stderr)
        return EXIT_USAGE
    return run(app, role=role, service=service, control=control, scope=scope, **kwargs)


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _check_service(ctx: click.Context, param: click.Parameter, value: str) -> str:
    import click

    try:
        return protocol.check_service(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _click_command() -> click.Command:
    import click
    from uvicorn.main import main as uvicorn_main

    from .uvicorn import REFUSED

    ours: list[click.Parameter] = [
        click.Option(["--role"], type=click.Choice(["primary", "standby"]), envvar=ENV_ROLE,
                     required=True, help="This instance's role. [env: REUSEPORT_STANDBY_ROLE]"),
        click.Option(["--service"], envvar=ENV_SERVICE, default=protocol.DEFAULT_SERVICE,
                     show_default=True, callback=_check_service,
                     help="Service name, as given to the supervisor. [env: REUSEPORT_STANDBY_SERVICE]"),
        click.Option(["--control"], envvar=ENV_CONTROL, default=None,
                     help="Supervisor's control socket (default /run/reuseport-standby/SERVICE.sock). "
                          "[env: REUSEPORT_STANDBY_CONTROL]"),
        click.Option(["--scope"], type=click.Choice(list(protocol.SCOPES)), envvar=ENV_SCOPE,
                     default="instance", show_default=True,
                     help="instance: the workers share this instance's listeners; worker: every worker gets "
                          f"listeners of its own (at most {WORKERS_PER_INSTANCE} workers). [env: REUSEPORT_STANDBY_SCOPE]"),
    ]
    theirs = []
    for param in uvicorn_main.params:
        if param.name in REFUSED:
            # Still parsed, so that using one gets a clear refusal; just not offered in --help.
            param = copy.copy(param)
            param.hidden = True  # type: ignore[attr-defined]
        theirs.append(param)
    return click.Command("uvicorn", params=ours + theirs, help=DESCRIPTION,
                         context_settings=dict(uvicorn_main.context_settings or {}))


def config_from_context(ctx: click.Context) -> tuple[str, str, str | None, str, dict[str, Any]]:
    """(role, service, control, app, uvicorn.run-style keywords) from a parsed context.

    Mirrors what ``uvicorn.main.main`` does with its parameters before it
    calls ``uvicorn.run``.
    """
    import click
    from click.core import ParameterSource
    from uvicorn.config import LOGGING_CONFIG

    from .uvicorn import REFUSED

    for name, why in REFUSED.items():
        source = ctx.get_parameter_source(name)
        if source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            opt = "--" + name.replace("_", "-")
            where = f" (UVICORN_{name.upper()} is set)" if source is ParameterSource.ENVIRONMENT else ""
            raise click.UsageError(f"{opt} cannot be used here{where}: {why}.", ctx)
    params = dict(ctx.params)
    role, service, control, app = params.pop("role"), params.pop("service"), params.pop("control"), params.pop("app")
    params.pop("scope", None)
    for name in REFUSED:
        params.pop(name, None)
    params["log_config"] = LOGGING_CONFIG if params["log_config"] is None else params["log_config"]
    for name in ("reload_dirs", "reload_includes", "reload_excludes"):
        params[name] = list(params[name]) or None
    params["headers"] = [tuple(h.split(":", 1)) for h in params["headers"]]
    return role, service, control, app, params

