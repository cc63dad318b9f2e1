"""Start real server instances (gunicorn, uvicorn...) against a test supervisor,
restart them under load, and report what the clients saw."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from reuseport_standby.status import instance_state

from .procs import REPO, SupervisorProc, stop_process_group, wait_for
from reuseport_standby.loadgen import Load, LoadResult

BIN = Path(sys.executable).parent
SIGTERM = signal.SIGTERM  # InstanceProc.signal() shadows the module inside the class body


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
        return instance_state(self.sup.status(), self.proc.pid)

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

    def stop(self, sig: int = SIGTERM, timeout: float = 30.0) -> int | None:
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


# -- traced restarts: which restart each failure belongs to --------------------------------

APPS = REPO / "tests" / "apps"


def gunicorn_cmd(app: str, *args: str, config: str = "python:reuseport_standby.conf") -> list[str]:
    """A gunicorn command line using reuseport-standby's config module."""
    return [str(BIN / "gunicorn"), "-c", config, *args, app]


def worker_pids(proc: subprocess.Popen) -> list[int]:
    """The direct children of a process (a gunicorn master's workers)."""
    try:
        text = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def migrate_counters() -> dict[str, int]:
    """The kernel's TcpExt TCPMigrateReq* counters (what ``nstat`` shows), from /proc/net/netstat."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=True))
            return {k: v for k, v in row.items() if k.startswith("TCPMigrateReq")}
    return {}


@dataclass
class Step:
    """One fault injected into the primary: its kind, when the signal was sent, and when the
    signalled processes were gone (CLOCK_MONOTONIC).  Between the two, a dying worker can
    still accept: a request sent then is in flight inside it, not queued."""

    kind: str
    at: float
    done: float | None = None

    @property
    def boundary(self) -> float:
        return self.done if self.done is not None and self.kind.startswith("kill") else self.at


@dataclass
class TracedReport:
    """A restart run: the load's result, the steps, and each failure attributed to its step."""

    load: LoadResult
    steps: list[Step]
    migrations: dict[str, int] = field(default_factory=dict)

    def failures_of(self, step: Step | None) -> list[tuple[float, float, str]]:
        """Failures that ended after ``step`` began and before the next one (None: before the first step)."""
        starts = [s.at for s in self.steps]
        out = []
        for ev in self.load.failure_events:
            i = sum(1 for t in starts if t <= ev[1]) - 1
            owner = self.steps[i] if i >= 0 else None
            if owner is step:
                out.append(ev)
        return out

    def in_flight(self, step: Step) -> list[tuple[float, float, str]]:
        """Failures of ``step`` whose request was sent before the signalled processes were gone."""
        return [ev for ev in self.failures_of(step) if ev[0] < step.boundary]

    def after_signal(self, step: Step) -> list[tuple[float, float, str]]:
        """Failures of ``step`` whose request was sent once the killed processes were gone: none may be lost."""
        return [ev for ev in self.failures_of(step) if ev[0] >= step.boundary]

    def by_kind(self) -> dict[str, list[int]]:
        """Failure count of every step, grouped by step kind."""
        counts: dict[str, list[int]] = {}
        for s in self.steps:
            counts.setdefault(s.kind, []).append(len(self.failures_of(s)))
        return counts

    def __str__(self) -> str:
        kinds = "; ".join(f"{k}: {sum(v)} failed over {len(v)} ({v})" for k, v in self.by_kind().items())
        return (f"{len(self.steps)} steps, {kinds}; before any step: {len(self.failures_of(None))}; "
                f"migrations {self.migrations}; {self.load.summary()}")


def _kill_master(primary: InstanceProc, timeout: float = 15.0) -> None:
    """SIGKILL only the master; its orphaned workers notice and exit on their own."""
    assert primary.proc is not None
    primary.signal(signal.SIGKILL)
    primary.proc.wait(5)
    pgid = primary.proc.pid

    def gone() -> bool:
        try:
            os.killpg(pgid, 0)
            return False
        except ProcessLookupError:
            return True

    try:
        wait_for(gone, timeout, 0.05, what="orphaned workers to exit")
    finally:
        stop_process_group(primary.proc, signal.SIGKILL, 5)


def _kill_workers(primary: InstanceProc) -> None:
    """SIGKILL every worker at once; the master stays and forks new ones.  Returns once they are gone."""
    assert primary.proc is not None
    pids = worker_pids(primary.proc)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.001)


def _alive(pid: int) -> bool:
    """Not yet dead: running, or exiting (a zombie has closed its sockets)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def restart_traced(
    make_primary: Callable[[], InstanceProc],
    primary: InstanceProc,
    *,
    host: str,
    port: int,
    schedule: Sequence[str] = ("term", "kill") * 5,
    concurrency: int = 8,
    settle: float = 0.4,
    max_seconds: float = 120.0,
) -> TracedReport:
    """Inject ``schedule`` into the primary under a bounded load and time every step.

    Steps: ``term`` (SIGTERM the master, wait for its exit, start a new
    primary), ``kill`` (SIGKILL master and workers at once, start a new
    one), ``kill_master`` (SIGKILL the master only, wait for its orphaned
    workers to leave, start a new one), ``kill_workers`` (SIGKILL every
    worker; the master forks new ones), ``hup`` (reload in place).  The
    standby must be active, and ``primary`` running and active.
    """
    steps: list[Step] = []
    before = migrate_counters()
    load = Load(host, port, concurrency=concurrency, duration=max_seconds).start()
    try:
        time.sleep(settle)
        for kind in schedule:
            steps.append(Step(kind, time.monotonic()))
            if kind == "term":
                primary.stop(signal.SIGTERM)
            elif kind == "kill":
                primary.kill_group()
            elif kind == "kill_master":
                _kill_master(primary)
            elif kind == "kill_workers":
                _kill_workers(primary)
            elif kind == "hup":
                primary.signal(signal.SIGHUP)
            else:
                raise ValueError(f"unknown step {kind!r}")
            steps[-1].done = time.monotonic()
            if kind in ("term", "kill", "kill_master"):
                time.sleep(settle / 2)
                primary = make_primary().start().wait_active()
            time.sleep(settle)
    finally:
        result = load.stop()
        primary.stop()
    after = migrate_counters()
    return TracedReport(result, steps, {k: after[k] - before.get(k, 0) for k in after})


@dataclass
class Answer:
    """One probe request: when it was sent and ended (CLOCK_MONOTONIC), and what came back."""

    sent: float
    ended: float
    status: int
    body: str
    error: str = ""


class Probe:
    """A few threads sending requests and keeping every body, to see who answered and when.

    Bounded by ``duration`` seconds and ``max_requests``; loopback only.
    """

    def __init__(self, host: str, port: int, *, threads: int = 2, duration: float = 30.0,
                 max_requests: int = 50_000, timeout: float = 5.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.duration, self.max_requests = duration, max_requests
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        deadline = time.monotonic() + self.duration
        while not self._stop.is_set() and time.monotonic() < deadline and len(self.answers) < self.max_requests:
            sent = time.monotonic()
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                conn.request("GET", "/", headers={"Connection": "close"})
                resp = conn.getresponse()
                answer = Answer(sent, time.monotonic(), resp.status, resp.read().decode(errors="replace"))
            except (OSError, http.client.HTTPException) as exc:
                answer = Answer(sent, time.monotonic(), 0, "", type(exc).__name__)
            finally:
                conn.close()
            self.answers.append(answer)

    def __enter__(self) -> "Probe":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)



def uvicorn_instance(sup: SupervisorProc, role: str, app: str, *options: str,
                     env: dict[str, str] | None = None, app_dir: Path = APPS) -> InstanceProc:
    """``reuseport-standby uvicorn APP OPTIONS`` (APP an import string under ``app_dir``)."""
    cmd = [sys.executable, "-m", "reuseport_standby", "uvicorn", "--app-dir", str(app_dir), app, *options]
    return InstanceProc(cmd, sup, role, env=dict(env or {}))


def roll_traced(
    make_primary: Callable[[], InstanceProc],
    primary: InstanceProc,
    *,
    host: str,
    port: int,
    times: int = 5,
    concurrency: int = 8,
    settle: float = 0.4,
    max_seconds: float = 120.0,
) -> TracedReport:
    """Rolling restarts (the deploy path) under a bounded load, traced like :func:`restart_traced`.

    Each step starts a new primary, waits until it is active (two primaries
    share the traffic for a moment), then SIGTERMs the old one; the step's
    time is that of the SIGTERM.  The last primary is stopped at the end.
    """
    steps: list[Step] = []
    before = migrate_counters()
    load = Load(host, port, concurrency=concurrency, duration=max_seconds).start()
    try:
        time.sleep(settle)
        for _ in range(times):
            successor = make_primary().start().wait_active()
            steps.append(Step("roll", time.monotonic()))
            primary.stop(signal.SIGTERM)
            primary = successor
            time.sleep(settle)
    finally:
        result = load.stop()
        primary.stop()
    after = migrate_counters()
    return TracedReport(result, steps, {k: after[k] - before.get(k, 0) for k in after})


def freeze_kill_traced(
    make_primary: Callable[[], InstanceProc],
    primary: InstanceProc,
    *,
    host: str,
    port: int,
    times: int = 5,
    freeze: float = 0.3,
    probes: int = 4,
    concurrency: int = 8,
    settle: float = 0.4,
    max_seconds: float = 120.0,
) -> tuple[TracedReport, Counter[str]]:
    """A primary that hangs (SIGSTOP to its whole group) and is then SIGKILLed, under a bounded load.

    The step's time is that of the SIGSTOP: a request sent after it cannot
    have been accepted by the frozen processes, so ``after_signal(step)``
    are failures of requests that only sat in the dead primary's queue.  As
    the load's clients mostly wait on requests the frozen primary holds,
    each freeze also sends ``probes`` requests of its own into the queue;
    their outcomes ("ok" or a failure kind) are the second result.  A new
    primary is started after each kill; the last one is stopped at the end.
    """
    steps: list[Step] = []
    outcomes: Counter[str] = Counter()
    before = migrate_counters()
    load = Load(host, port, concurrency=concurrency, duration=max_seconds).start()
    try:
        time.sleep(settle)
        for _ in range(times):
            assert primary.proc is not None
            steps.append(Step("freeze_kill", time.monotonic()))
            os.killpg(primary.proc.pid, signal.SIGSTOP)
            queued = []
            for _ in range(probes):
                s = socket.create_connection((host, port), timeout=10)
                s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                queued.append(s)
            time.sleep(freeze)
            primary.kill_group()
            outcomes.update(_response_kind(s) for s in queued)
            time.sleep(settle / 2)
            primary = make_primary().start().wait_active()
            time.sleep(settle)
    finally:
        result = load.stop()
        primary.stop()
    after = migrate_counters()
    return TracedReport(result, steps, {k: after[k] - before.get(k, 0) for k in after}), outcomes


def _response_kind(s: socket.socket) -> str:
    """Read one response to EOF and close: "ok" for a 200, else what went wrong."""
    data = b""
    try:
        with s:
            while chunk := s.recv(65536):
                data += chunk
    except ConnectionResetError:
        return "reset"
    except OSError as exc:
        return type(exc).__name__
    if not data:
        return "eof"
    status = data.split(b"\r\n", 1)[0].split()
    return "ok" if len(status) > 1 and status[1] == b"200" else f"http_{status[1].decode() if len(status) > 1 else '?'}"
