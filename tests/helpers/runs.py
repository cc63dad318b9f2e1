"""`reuseport-standby run` started as a unit would start it, for the tests that drive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Sequence

from reuseport_standby import client
from reuseport_standby.errors import ProtocolError, SupervisorUnavailable

from .netutil import free_port
from .proctree import descendants, with_env
from .procs import REPO, wait_for

APPS = Path(__file__).parent.parent / "apps"
MARKER = "RS_TEST_RUN_MARKER"


class Run:
    """``reuseport-standby run`` as a unit would start it; every process it starts carries ``marker``
    in its environment (RS_TEST_RUN_MARKER), so that the test can find whatever is left afterwards."""

    def __init__(self, tmp: Path, pin_root: Path, cmd: list[str], env: dict[str, str] | None = None,
                 user: str | None = None, venv: Path | None = None, args: Sequence[str] = ()) -> None:
        self.service = f"r{uuid.uuid4().hex[:8]}"
        self.control = str(tmp / f"{self.service}.sock")
        self.port = free_port()
        self.log_path = tmp / f"{self.service}.log"
        self.marker = uuid.uuid4().hex
        self.pin_dir = pin_root / self.service
        python = str(venv / "bin" / "python") if venv else sys.executable
        full = [python, "-m", "reuseport_standby", "run", "--service", self.service,
                "--bind", f"127.0.0.1:{self.port}", "--control", self.control, "--pin-root", str(pin_root),
                "--ready-timeout", "20", *(["--user", user] if user else []), *args, "--", *cmd]
        e = {**os.environ, "PYTHONPATH": str(APPS), MARKER: self.marker, **(env or {})}
        e["PATH"] = f"{Path(python).parent}:{e.get('PATH', '')}"
        self.proc = subprocess.Popen(full, cwd=REPO, env=e, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log_path, "wb"), start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def instances(self) -> list[dict]:
        try:
            return client.query(self.service, "status", self.control, timeout=2)["status"]["instances"]
        except (SupervisorUnavailable, ProtocolError, OSError):
            return []

    def active(self) -> dict[str, int]:
        """Role → pid of the active instances (in worker scope, their masters: the workers are left out)."""
        return {i["role"]: i["pid"] for i in self.instances() if i["state"] == "active" and i.get("parent") is None}

    def wait_both(self, timeout: float = 60) -> dict[str, int]:
        def both() -> dict[str, int] | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"run exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            a = self.active()
            masters = [i for i in self.instances() if i.get("parent") is None]
            return a if set(a) == {"primary", "standby"} and len(masters) == 2 else None
        return wait_for(both, timeout, 0.1, what=f"primary and standby active\n{self.log()[-2000:]}")

    def leftovers(self) -> set[int]:
        """Processes it started (they carry the marker) or that descend from it, other than itself."""
        return (with_env(MARKER, self.marker) | descendants(self.proc.pid)) - {self.proc.pid}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def stop_and_check_nothing_left(self) -> None:
        """SIGTERM: exit status 0, and no process it started left (not even one that left its group)."""
        self.stop()
        left = {p: _cmdline(p) for p in self.leftovers()}
        for pid in left:  # don't leave them to the other tests either
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert self.proc.returncode == 0, self.log()[-3000:]
        assert left == {}, f"left running after run exited: {left}\n{self.log()[-3000:]}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
