"""Option defaults from the environment: ``REUSEPORT_STANDBY_<OPTION>`` for every option of a subcommand.

``--stall-timeout`` reads ``REUSEPORT_STANDBY_STALL_TIMEOUT``, ``--bind`` reads
``REUSEPORT_STANDBY_BIND`` (space-separated for several), ``--mount-bpffs``
reads ``REUSEPORT_STANDBY_MOUNT_BPFFS`` (1/true/yes/on or 0/false/no/off).  A
flag on the command line wins over its variable, also for repeatable options
(the variable's list is replaced, not extended).  A value the option would
refuse is a usage error naming the variable.  The variables are read the
way gunicorn reads ``GUNICORN_CMD_ARGS`` and uvicorn ``UVICORN_*``: they
set defaults, nothing else.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Iterable, Mapping

from .errors import UsageError

PREFIX = "REUSEPORT_STANDBY_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def env_name(action: argparse.Action) -> str:
    """The variable of an option: its long flag, upper case, dashes as underscores."""
    long = next(s for s in action.option_strings if s.startswith("--"))
    return PREFIX + long[2:].upper().replace("-", "_")


class ReplaceAppend(argparse._AppendAction):
    """``append`` whose first use on the command line replaces the default list (from the environment)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None)
        items = [] if current is self.default or current is None else list(current)
        items.append(values)
        setattr(namespace, self.dest, items)


def _convert(action: argparse.Action, var: str, text: str, whole: str | None = None) -> Any:
    """``text`` as the option would take it; ``whole``: the variable's value, for the message."""
    shown = text if whole is None else whole
    try:
        value = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise UsageError(f"{var}={shown!r}: {exc or 'invalid value'}") from None
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{var}={shown!r}: must be one of {', '.join(map(str, action.choices))}")
    return value


def options(parser: argparse.ArgumentParser, skip: Iterable[str] = ()) -> list[argparse.Action]:
    """The options of ``parser`` that a variable may set (not help, not ``skip``'s dests)."""
    skipped = set(skip)
    return [a for a in parser._actions
            if any(s.startswith("--") for s in a.option_strings) and a.dest not in skipped
            and a.default is not argparse.SUPPRESS and a.help is not argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def names(parser: argparse.ArgumentParser, skip: Iterable[str] = ()) -> list[str]:
    return [env_name(a) for a in options(parser, skip)]


class BadValue:
    """The default of an option whose variable is wrong: an error only if no flag replaces it."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"BadValue({self.message!r})"


def apply(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None,
          skip: Iterable[str] = ()) -> None:
    """Make every set variable the default of its option (a required option is then no longer required).

    A wrong variable becomes a :class:`BadValue` default, refused by :func:`check` after parsing
    unless a flag on the command line replaced it: the flag wins, also over a variable it cannot use,
    and a variable of a subcommand that does not run is never looked at."""
    env = os.environ if environ is None else environ
    for action in options(parser, skip):
        var = env_name(action)
        text = env.get(var)
        if text is None:
            continue
        text = text.strip()
        try:
            if isinstance(action, argparse._StoreTrueAction):
                if text.lower() not in TRUE + FALSE:
                    raise UsageError(f"{var}={text!r}: give 1/true/yes/on or 0/false/no/off")
                action.default = text.lower() in TRUE
            elif isinstance(action, argparse._AppendAction):
                values = [_convert(action, var, word, text) for word in text.split()]
                if values:
                    action.default = values
                    action.required = False
            elif text:
                action.default = _convert(action, var, text)
                action.required = False
        except UsageError as exc:
            action.default = BadValue(str(exc))
            action.required = False


def check(namespace: argparse.Namespace) -> None:
    """Refuse a variable that was wrong and not replaced by a flag (UsageError naming it)."""
    for value in vars(namespace).values():
        if isinstance(value, BadValue):
            raise UsageError(value.message)
