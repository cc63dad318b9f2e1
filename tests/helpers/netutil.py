"""Real TCP clients and a trivial accept-and-answer server for kernel tests."""

from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass, field


def free_port(family: socket.AddressFamily = socket.AF_INET) -> int:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Outcome:
    answered: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    def fail(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1

    @property
    def lost(self) -> int:
        return sum(self.failures.values())


def open_clients(addr: tuple[str, int], n: int, family: socket.AddressFamily = socket.AF_INET) -> list[socket.socket]:
    """n connected clients, each having sent one request line."""
    clients = []
    for i in range(n):
        c = socket.socket(family, socket.SOCK_STREAM)
        c.settimeout(5)
        c.connect(addr)
        c.sendall(f"req {i}\n".encode())
        clients.append(c)
    return clients


def serve(listener: socket.socket, *, limit: int, timeout: float = 2.0) -> int:
    """Accept up to ``limit`` connections, answer each request; return how many were answered."""
    answered = 0
    listener.setblocking(False)
    deadline = time.monotonic() + timeout
    while answered < limit and time.monotonic() < deadline:
        r, _, _ = select.select([listener], [], [], 0.05)
        if not r:
            continue
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            continue
        with conn:
            conn.settimeout(2)
            try:
                data = conn.recv(100)
                conn.sendall(b"ok " + data)
                answered += 1
            except OSError:
                pass
    return answered


def accept_pending(listener: socket.socket) -> int:
    """Accept and close whatever is queued right now (no waiting)."""
    listener.setblocking(False)
    n = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def collect(clients: list[socket.socket]) -> Outcome:
    """Read each client's answer; classify what went wrong for the others."""
    out = Outcome()
    for c in clients:
        try:
            data = c.recv(100)
            if data.startswith(b"ok req"):
                out.answered += 1
            elif data == b"":
                out.fail("eof")
            else:
                out.fail("garbled")
        except ConnectionResetError:
            out.fail("reset")
        except socket.timeout:
            out.fail("timeout")
        except OSError as exc:
            out.fail(type(exc).__name__)
        finally:
            c.close()
    return out
