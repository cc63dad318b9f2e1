"""The smallest real instance (tests/apps/echo_instance.py) and a client that counts who answered."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections import Counter

from reuseport_standby.status import instance_state

from .procs import REPO, wait_for

ECHO = REPO / "tests" / "apps" / "echo_instance.py"


class Echo:
    """tests/apps/echo_instance.py as a real child process."""

    def __init__(self, sup, role: str, *flags: str) -> None:
        self.sup, self.role = sup, role
        self.proc = subprocess.Popen([sys.executable, str(ECHO), role, sup.service, sup.control, *flags],
                                     cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def state(self) -> str | None:
        return instance_state(self.sup.status(), self.proc.pid)

    def wait(self, state: str = "active", timeout: float = 15) -> "Echo":
        def check() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"echo {self.role} exited: {self.proc.stderr.read().decode()}")
            return self.state() == state
        wait_for(check, timeout, what=f"{self.role} {state}")
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


def who(host: str, port: int, n: int) -> Counter[str]:
    """Send n requests (a new connection each); count answers by 'role pid'."""
    seen: Counter[str] = Counter()
    for _ in range(n):
        with socket.create_connection((host, port), timeout=3) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            seen[data.partition(b"\r\n\r\n")[2].decode()] += 1
    return seen


def host_port(sup) -> tuple[str, int]:
    host, _, port = sup.binds[0].rpartition(":")
    return host.strip("[]"), int(port)
