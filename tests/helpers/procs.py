"""Real processes for integration tests: a supervisor, and helpers to wait on them."""

from __future__ import annotations

import os
import signal
import sys
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from reuseport_standby import client
from reuseport_standby.supervisor.options import SuperviseOptions
from reuseport_standby.errors import SupervisorUnavailable

REPO = Path(__file__).resolve().parents[2]


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class SupervisorProc:
    """``reuseport-standby supervise`` as a child process with its own service, port and pins."""

    service: str
    binds: list[str]
    control: str
    pin_root: Path
    extra: list[str] = field(default_factory=list)
    #: the real loop and broker over the in-memory maps (tests/helpers/fake_supervise.py): no root, no BPF
    fake_kernel: bool = False
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment an instance needs to find this supervisor."""
        return {"REUSEPORT_STANDBY_SERVICE": self.service, "REUSEPORT_STANDBY_CONTROL": self.control}

    def options(self) -> SuperviseOptions:
        """The supervisor's options (the same object ``supervise``, ``run`` and the benchmarks build from)."""
        return SuperviseOptions(service=self.service, binds=tuple(self.binds), control=self.control,
                                pin_root=str(self.pin_root), extra=tuple(self.extra))

    def start(self, timeout: float = 15.0) -> "SupervisorProc":
        cmd = self.options().command()
        if self.fake_kernel:
            cmd = [sys.executable, str(REPO / "tests" / "helpers" / "fake_supervise.py"), *cmd[4:]]
        self.log_path = Path(self.control).with_suffix(f".{uuid.uuid4().hex[:6]}.log")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "wb"), cwd=REPO)
        wait_for(self._up, timeout, what=f"supervisor at {self.control}\n{self.log()}")
        return self

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"supervisor exited with {self.proc.returncode}:\n{self.log()}")
        try:
            client.query(self.service, "ping", self.control, timeout=1)
            return True
        except SupervisorUnavailable:
            return False

    def status(self) -> dict[str, Any]:
        return client.query(self.service, "status", self.control)["status"]

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def stop_process_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Signal a child started with start_new_session=True, and everything it forked."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers (orphaned workers)
    except ProcessLookupError:
        pass
