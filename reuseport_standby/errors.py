"""Errors that tell the operator what happened and what to do next.

Each error a user can meet names the section of docs/troubleshooting.md
that explains it, so a one-line message can stay short and still lead to
the cause, a command that confirms it and the fix.
"""

from __future__ import annotations

#: Where the sections live, relative to the project (and the sdist).
TROUBLESHOOTING = "docs/troubleshooting.md"


def see_doc(anchor: str) -> str:
    """The pointer appended to a message: ``see docs/troubleshooting.md#ANCHOR``."""
    return f"see {TROUBLESHOOTING}#{anchor}"


class ReuseportStandbyError(Exception):
    """Base class; the message is meant for a human at a terminal.

    ``see`` (a class default, or given per raise) is the anchor of the
    troubleshooting section; ``str()`` appends it to the first line, so a
    multi-line message (a verifier log) still names it where it is read.
    """

    see: str | None = None

    def __init__(self, *args: object, see: str | None = None) -> None:
        super().__init__(*args)
        if see is not None:
            self.see = see

    def __str__(self) -> str:
        text = super().__str__()
        if not self.see or f"(see {TROUBLESHOOTING}#" in text:  # one pointer: the first, most specific
            return text
        first, nl, rest = text.partition("\n")
        return f"{first.rstrip('.')} ({see_doc(self.see)}){nl}{rest}"


class UsageError(ReuseportStandbyError):
    """The command line cannot work: refused before anything starts (exit status 2)."""


class BpfUnavailable(ReuseportStandbyError):
    """The kernel or the environment cannot run the program at all."""


class PermissionProblem(ReuseportStandbyError):
    """A capability or file permission is missing."""

    see = "missing-privileges"


class IncompatiblePins(ReuseportStandbyError):
    """Pinned maps were made by another layout version of the program."""

    see = "pins-of-another-version"


class SlotsFull(ReuseportStandbyError):
    """Every slot of a role is taken."""

    see = "slots-full"


class ProtocolError(ReuseportStandbyError):
    """A control message was malformed or not allowed."""

    def __init__(self, code: str, message: str, *, see: str | None = None) -> None:
        super().__init__(message, see=see)
        self.code = code


class SupervisorUnavailable(ReuseportStandbyError):
    """No supervisor answers on the control socket."""

    see = "supervisor-not-running"


class ControlSocketDenied(SupervisorUnavailable, PermissionProblem):
    """The control socket refuses this user: a supervisor may well run, so this is not "not running"
    (exit status 1, not 3), though callers that retry an absent supervisor treat it alike."""

    see = "control-socket-permissions"
