"""Start real server instances (gunicorn, uvicorn...) against a test supervisor,
restart them under load, and report what the clients saw."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from procs import REPO, SupervisorProc, stop_process_group, wait_for
from reuseport_standby.loadgen import Load, LoadResult

BIN = Path(sys.executable).parent


@dataclass
class InstanceProc:
    """One instance (a gunicorn master, a uvicorn process) in its own session."""

    cmd: Sequence[str]
    sup: SupervisorProc
    role: str
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = REPO
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    def start(self) -> "InstanceProc":
        env = {**os.environ, **self.sup.env, "REUSEPORT_STANDBY_ROLE": self.role, **self.env}
        env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
        n = getattr(self.sup, "_instances_started", 0) + 1
        self.sup._instances_started = n  # type: ignore[attr-defined]
        self.log_path = Path(self.sup.control).with_suffix(f".{self.role}.{n}.log")
        self.proc = subprocess.Popen(list(self.cmd), env=env, cwd=self.cwd, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log_path, "wb"), start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def state(self) -> str | None:
        """This instance's state as the supervisor reports it (matched by pid)."""
        assert self.proc is not None
        for inst in self.sup.status()["instances"]:
            if inst["pid"] == self.proc.pid:
                return inst["state"]
        return None

    def wait_active(self, timeout: float = 30.0) -> "InstanceProc":
        def active() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            return self.state() == "active"

        wait_for(active, timeout, 0.05, what=f"{self.role} to become active\n{self.log()[-2000:]}")
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the instance's main process and wait for its whole session to exit."""
        assert self.proc is not None
        self.signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        stop_process_group(self.proc, signal.SIGKILL, 5)
        return self.proc.returncode

    def kill_group(self) -> None:
        """SIGKILL the master and every worker at once."""
        assert self.proc is not None
        stop_process_group(self.proc, signal.SIGKILL, 5)


@dataclass
class RestartReport:
    load: LoadResult
    restarts: list[str]

    def __str__(self) -> str:
        return f"{len(self.restarts)} restarts ({', '.join(self.restarts)}): {self.load.summary()}"


def restart_under_load(
    sup: SupervisorProc,
    make_primary: Callable[[], InstanceProc],
    primary: InstanceProc,
    *,
    host: str,
    port: int,
    schedule: Sequence[str] = ("term", "kill") * 5,
    concurrency: int = 8,
    settle: float = 0.5,
    max_seconds: float = 120.0,
) -> RestartReport:
    """Restart the primary per ``schedule`` while a bounded load runs.

    ``term``: SIGTERM the main process, wait for it to exit, start a new one.
    ``kill``: SIGKILL the whole process group, start a new one.
    The standby must be running and active before this is called.
    """
    done: list[str] = []
    load = Load(host, port, concurrency=concurrency, duration=max_seconds).start()
    try:
        time.sleep(settle)
        for step in schedule:
            if step == "term":
                primary.stop(signal.SIGTERM)
            elif step == "kill":
                primary.kill_group()
            else:
                raise ValueError(step)
            time.sleep(settle / 2)
            primary = make_primary().start().wait_active()
            done.append(step)
            time.sleep(settle)
    finally:
        result = load.stop()
        primary.stop()
    return RestartReport(result, done)
