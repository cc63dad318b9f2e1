"""Listening sockets as the reuseport group needs them, and their addresses."""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import struct
from dataclasses import dataclass

DEFAULT_BACKLOG = 1024


@dataclass(frozen=True)
class Address:
    """One TCP listening address of a service (one kernel reuseport group)."""

    host: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def group_name(self) -> str:
        """Name of the group's pin directory (bpffs forbids '.' in names)."""
        host = f"[{self.host}]" if self.family == socket.AF_INET6 else self.host
        return f"{host}:{self.port}".replace(".", "_")

    def sockaddr(self) -> tuple[str, int] | tuple[str, int, int, int]:
        """What bind() takes: a link-local IPv6 address carries its interface as the scope id
        (Python drops a ``%eth0`` suffix given in the host string)."""
        if self.family == socket.AF_INET6 and "%" in self.host:
            host, _, scope = self.host.partition("%")
            try:
                index = int(scope) if scope.isdigit() else socket.if_nametoindex(scope)
            except OSError:
                raise OSError(errno.ENODEV, f"no network interface {scope!r}") from None
            return (host, self.port, 0, index)
        return (self.host, self.port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == socket.AF_INET6 else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> "Address":
        """Parse ``HOST:PORT`` or ``[V6HOST]:PORT``; port 0 is refused."""
        m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]*):(\d+)", text.strip())
        if not m:
            raise ValueError(f"bad address {text!r}: expected HOST:PORT or [IPV6]:PORT")
        host = m.group(1) or m.group(3) or "0.0.0.0"
        port = int(m.group(2) or m.group(4))
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            if host == "localhost":
                host = "127.0.0.1"
            else:
                raise ValueError(f"bad address {text!r}: give a numeric IPv4/IPv6 address (names can resolve differently over time)") from None
        if not 0 < port < 65536:
            raise ValueError(
                f"bad port in {text!r}: must be 1-65535. Port 0 would give every listener its own random "
                f"port, so a primary and a standby could never share one")
        return cls(host, port)


def bind_reuseport(address: Address) -> socket.socket:
    """A bound SO_REUSEPORT socket, not yet listening.

    Binding is where an unusable address shows (not on this host, port held without SO_REUSEPORT or by
    another user, a privileged port); the socket joins ``address``'s reuseport group only at ``listen()``,
    so a start can try every address before it loads or pins anything."""
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if address.family == socket.AF_INET6:
            # v4 and v6 are separate groups; a v6 address serves only v6.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address.sockaddr())
    except BaseException:
        sock.close()
        raise
    return sock


def create_listener(address: Address, backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """A bound, listening, SO_REUSEPORT socket: a member of ``address``'s group."""
    sock = bind_reuseport(address)
    try:
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def listens_on(listener: object, address: Address) -> bool:
    """Whether a sock_diag listener (:class:`~.diag.ListenerQueue`) is bound to exactly ``address``:
    a member of its reuseport group (a wildcard or another address is another group)."""
    host = getattr(listener, "host", "")
    if not host or getattr(listener, "port", None) != address.port:
        return False
    return ipaddress.ip_address(host) == ipaddress.ip_address(address.host.partition("%")[0])


SO_LOCK_FILTER = 44
SO_DETACH_REUSEPORT_BPF = 68


def lock_filter(sock: socket.socket) -> None:
    """Forbid, for good, attaching any program through this socket.

    A listener handed to an instance is a member of the group, and without
    this any process holding it could replace the group's program with its
    own (``SO_ATTACH_REUSEPORT_CBPF`` needs no privilege) and take the port.
    The kernel checks SOCK_FILTER_LOCKED on both reuseport attach paths and
    never clears it.  It does not cover ``SO_DETACH_REUSEPORT_BPF``: the
    supervisor re-attaches on every tick (docs/security.md).
    """
    sock.setsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER, 1)


def requeue(listener: socket.socket, backlog: int = DEFAULT_BACKLOG) -> None:
    """Hand a listener's queue to the rest of its group, and keep listening.

    ``shutdown()`` of a listener makes the kernel migrate its accept queue and
    half-open requests through the group's program; ``listen()`` again brings
    the same socket back into the group (its sockarray slot is lost and must
    be refilled).
    """
    listener.shutdown(socket.SHUT_RDWR)
    listener.listen(backlog)


def is_listening_tcp(sock: socket.socket) -> bool:
    try:
        return (sock.type == socket.SOCK_STREAM
                and sock.family in (socket.AF_INET, socket.AF_INET6)
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1)
    except OSError:
        return False


SO_COOKIE = 57


def socket_cookie(sock: socket.socket | int) -> int:
    """The kernel's stable identity of a socket, as a sockarray lookup reports it."""
    s = sock if isinstance(sock, socket.socket) else socket.socket(fileno=os.dup(sock))
    try:
        return struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    finally:
        if s is not sock:
            s.close()
