"""Errors that tell the operator what happened and what to do next."""

from __future__ import annotations


class ReuseportStandbyError(Exception):
    """Base class; the message is meant for a human at a terminal."""


class UsageError(ReuseportStandbyError):
    """The command line cannot work: refused before anything starts (exit status 2)."""


class BpfUnavailable(ReuseportStandbyError):
    """The kernel or the environment cannot run the program at all."""


class PermissionProblem(ReuseportStandbyError):
    """A capability or file permission is missing."""


class IncompatiblePins(ReuseportStandbyError):
    """Pinned maps were made by another layout version of the program."""


class SlotsFull(ReuseportStandbyError):
    """Every slot of a role is taken."""


class ProtocolError(ReuseportStandbyError):
    """A control message was malformed or not allowed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class SupervisorUnavailable(ReuseportStandbyError):
    """No supervisor answers on the control socket."""
