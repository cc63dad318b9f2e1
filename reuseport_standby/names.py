"""The words every part shares: environment variables, roles, instance states and scopes.

One place, so that the supervisor, the integrations, the runner and the
CLI cannot drift apart on a spelling.  The string values are the wire
format (control protocol, ``status`` JSON, environment): they never change.
"""

from __future__ import annotations

import enum

from .kernel.layout import Role

__all__ = ["Role", "State", "Scope", "ENV_ROLE", "ENV_SERVICE", "ENV_CONTROL", "ENV_SCOPE",
           "ENV_CONNECT_TIMEOUT", "ENV_GENERATION", "ENV_VERSION", "ENV_SECCOMP", "ENV_USER", "ENV_GROUP",
           "ENV_ACCEPT_AHEAD", "ENV_KEEPALIVE_DRAIN", "ENV_HEALTH_PATH", "ENV_LOG_LEVEL", "ENV_LOG_FORMAT"]

#: the role an instance serves (primary / standby)
ENV_ROLE = "REUSEPORT_STANDBY_ROLE"
#: the service name, which names the control socket and the pin directory
ENV_SERVICE = "REUSEPORT_STANDBY_SERVICE"
#: an explicit control socket path (default: derived from the service)
ENV_CONTROL = "REUSEPORT_STANDBY_CONTROL"
#: "instance" or "worker": who holds the listeners
ENV_SCOPE = "REUSEPORT_STANDBY_SCOPE"
#: seconds a gunicorn instance waits for the supervisor at start
ENV_CONNECT_TIMEOUT = "REUSEPORT_STANDBY_CONNECT_TIMEOUT"
#: set by ``run`` for its children: which generation (reload) they belong to
ENV_GENERATION = "REUSEPORT_STANDBY_GENERATION"
#: a path each worker GETs in process, wanting a 2xx, before its instance is activated (``run --health-path``)
ENV_HEALTH_PATH = "REUSEPORT_STANDBY_HEALTH_PATH"
#: the app's version, as instances announce it (status, metrics; default: "gen<N>" from the generation)
ENV_VERSION = "REUSEPORT_STANDBY_VERSION"
#: "off": the integrations install no seccomp filter against steering the port (kernel/seccomp.py)
ENV_SECCOMP = "REUSEPORT_STANDBY_SECCOMP"
#: ``run --user``: the user the instances run as (``run`` itself starts as root, for the supervisor)
ENV_USER = "REUSEPORT_STANDBY_USER"
#: ``run --group``: the instances' group, and the group allowed on the control socket
ENV_GROUP = "REUSEPORT_STANDBY_GROUP"
#: uvicorn: connections a process may hold accepted but unread (0: asyncio's own accept loop; pacing.py)
ENV_ACCEPT_AHEAD = "REUSEPORT_STANDBY_ACCEPT_AHEAD"
#: uvicorn: seconds a stopping instance waits for the next request of an idle keep-alive connection (0: none)
ENV_KEEPALIVE_DRAIN = "REUSEPORT_STANDBY_KEEPALIVE_DRAIN"
#: ``run --health-path``: every worker gets a 2xx from its own app on GET PATH before it takes traffic (health_check.py)
ENV_HEALTH_PATH = "REUSEPORT_STANDBY_HEALTH_PATH"
#: --log-level / --log-format of every command (``run`` sets the format for its instances)
ENV_LOG_LEVEL = "REUSEPORT_STANDBY_LOG_LEVEL"
ENV_LOG_FORMAT = "REUSEPORT_STANDBY_LOG_FORMAT"
# Besides these, every option of ``supervise`` and ``run`` reads REUSEPORT_STANDBY_<OPTION> (envopts.py);
# SERVICE, CONTROL, USER, GROUP and SCOPE above are such options too, with the same meaning.


class State(str, enum.Enum):
    """Where an instance is in its life, as the supervisor sees it."""

    PENDING = "pending"    # has its listeners; not yet ready
    ACTIVE = "active"      # its sockets are in slots of its role and get connections
    DRAINING = "draining"  # said stop, or disconnected: out of the slots
    DRAINED = "drained"    # slots kept but disabled by an operator
    DEMOTED = "demoted"    # slots kept but disabled for hanging

    def __str__(self) -> str:
        return self.value

    @property
    def alive(self) -> bool:
        """Still holds (or will hold) listeners: everything but DRAINING."""
        return self is not State.DRAINING

    @property
    def disabled(self) -> bool:
        return self in (State.DRAINED, State.DEMOTED)


class Scope(str, enum.Enum):
    """Who holds the listeners: the instance (its workers share them) or each worker."""

    INSTANCE = "instance"
    WORKER = "worker"

    def __str__(self) -> str:
        return self.value
