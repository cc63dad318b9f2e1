"""``reuseport-standby demo``: the main job, end to end, on loopback.

Starts ``reuseport-standby run`` around the bundled app (Flask under
gunicorn, or ASGI under uvicorn) on a free loopback port, drives load from
the built-in client (a new connection per request), restarts the primary
(SIGTERM, then SIGKILL of its main process) and does a rolling reload, then
prints what the clients saw and draws a PNG timeline (with matplotlib; without
it, the table says it all).  ``--baseline`` runs
the same script against two plain ``SO_REUSEPORT`` instances with no BPF,
to show what is otherwise lost.  Exits 0 only when nothing failed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .names import ENV_ROLE
from . import client
from .errors import ReuseportStandbyError, SupervisorUnavailable
from .kernel.pins import DEFAULT_PIN_ROOT, remove_tree
from .loadgen import Load, LoadResult
from .run_client import request_reload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(server: str, workers: int = 2) -> list[str]:
    if server == "gunicorn":
        return ["gunicorn", "-w", str(workers), "--graceful-timeout", "10", "reuseport_standby.demo_app:app"]
    return ["uvicorn", "--workers", str(workers), "--timeout-graceful-shutdown", "10", "reuseport_standby.demo_app:asgi_app"]


@dataclass
class Step:
    at: float
    label: str
    action: Callable[[], None]


class WithStandby:
    """This project: ``reuseport-standby run`` around the server command."""

    name = "reuseport-standby"

    def __init__(self, server: str, port: int, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.service = f"demo{uuid.uuid4().hex[:6]}"
        self.control = str(tmp / f"{self.service}.sock")
        self.port = port
        cmd = [sys.executable, "-m", "reuseport_standby", "run", "--service", self.service,
               "--bind", f"127.0.0.1:{port}", "--control", self.control, "--", *server_command(server)]
        self.log = open(tmp / "run.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})})

    def _instances(self) -> list[dict]:
        try:
            return client.query(self.service, "status", self.control, timeout=2)["status"]["instances"]
        except (SupervisorUnavailable, OSError):
            return []

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ReuseportStandbyError(f"'reuseport-standby run' exited ({self.proc.returncode}); its log: {self.log.name}",
                                            see="the-demo-fails")
            roles = {i["role"] for i in self._instances() if i["state"] == "active"}
            if roles == {"primary", "standby"}:
                return
            time.sleep(0.1)
        raise ReuseportStandbyError(f"primary and standby not both active within {timeout} s; its log: {self.log.name}",
                                    see="the-demo-fails")

    def primary_pid(self) -> int:
        pids = [i["pid"] for i in self._instances() if i["role"] == "primary" and i["state"] == "active"]
        if not pids:
            raise ReuseportStandbyError("no active primary to restart", see="the-demo-fails")
        return pids[0]

    def term_primary(self) -> None:
        os.kill(self.primary_pid(), signal.SIGTERM)  # `run` restarts it

    def kill_primary(self) -> None:
        os.kill(self.primary_pid(), signal.SIGKILL)

    def reload(self) -> None:
        request_reload(self.service, self.control, progress=lambda step: say(f"           {step['progress']}"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


class PlainReuseport:
    """The contrast: two instances with SO_REUSEPORT and no BPF (the kernel's hash)."""

    name = "plain SO_REUSEPORT"

    def __init__(self, server: str, port: int, tmp: Path) -> None:
        self.server, self.port, self.tmp = server, port, tmp
        self.procs: dict[str, subprocess.Popen] = {}
        self.log = open(tmp / "baseline.log", "wb")
        for role in ("primary", "standby"):
            self.procs[role] = self._start(role)

    def _start(self, role: str) -> subprocess.Popen:
        env = {**os.environ, ENV_ROLE: role}
        bind = f"127.0.0.1:{self.port}"
        if self.server == "gunicorn":
            cmd = [*server_command("gunicorn"), "--reuse-port", "-b", bind]
        else:
            # uvicorn has no reuse-port option: the same python, binding its own SO_REUSEPORT socket.
            cmd = [sys.executable, "-c", _UVICORN_REUSEPORT, str(self.port)]
        # The server next to this interpreter (a venv's), not whichever is first on PATH.
        cmd[0] = shutil.which(cmd[0], path=os.path.dirname(sys.executable)) or shutil.which(cmd[0]) or cmd[0]
        return subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> None:
        from .loadgen import exchange

        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        while time.monotonic() < deadline and seen != {"primary", "standby"}:
            kind, _, body = exchange("127.0.0.1", self.port, timeout=1)
            if kind == "ok":
                seen.add(body.split()[0].decode())
            else:
                time.sleep(0.05)
        if seen != {"primary", "standby"}:
            raise ReuseportStandbyError(f"baseline instances did not both answer; their log: {self.log.name}", see="the-demo-fails")

    def _restart(self, role: str, sig: int) -> None:
        old = self.procs[role]
        try:
            os.kill(old.pid, sig)
            old.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(old.pid, signal.SIGTERM if sig == signal.SIGKILL else signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.procs[role] = self._start(role)

    def term_primary(self) -> None:
        self._restart("primary", signal.SIGTERM)

    def kill_primary(self) -> None:
        self._restart("primary", signal.SIGKILL)

    def reload(self) -> None:
        self._restart("standby", signal.SIGTERM)
        time.sleep(1.0)
        self._restart("primary", signal.SIGTERM)

    def stop(self) -> None:
        for p in self.procs.values():
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


_UVICORN_REUSEPORT = """
import socket, sys, uvicorn
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1024)
uvicorn.Server(uvicorn.Config("reuseport_standby.demo_app:asgi_app", log_level="warning")).run(sockets=[s])
"""


#: what to install for the PNG timeline (the table needs nothing)
PICTURE_HINT = "pip install 'reuseport-standby[demo]' (matplotlib) for the timeline picture"


def can_draw() -> bool:
    """Whether matplotlib can be imported (asked first, so the demo says so before its 20 s, not after)."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        return False


def load_so_far(load: Load) -> str:
    """Requests so far, and how many failed (read without the load's lock: a progress line may be a
    request behind)."""
    r = load.result
    return f"{r.ok + sum(r.failures.values())} requests so far, {sum(r.failures.values())} failed"


def say(text: str) -> None:
    """A progress line, as it happens (the demo runs for a while; output may be a pipe)."""
    print(text, flush=True)


def demo(duration: float = 20.0, server: str = "gunicorn", baseline: bool = False, concurrency: int = 16,
         out: Path | None = None) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="rs-demo-"))
    tmp.chmod(0o755)
    port = free_port()
    contender = (PlainReuseport if baseline else WithStandby)(server, port, tmp)
    marks: list[tuple[float, str]] = []
    errors: list[str] = []
    drawing = can_draw()
    try:
        say(f"{contender.name}: {server}, 2 workers per instance, on 127.0.0.1:{port}; "
            f"load: {concurrency} clients, a new connection per request, {duration:.0f} s")
        if not drawing:
            say(f"no matplotlib: the results as a table only; {PICTURE_HINT}")
        say("starting the primary and the standby...")
        contender.wait_ready()
        say("both serve; load starts")
        span = duration / 5
        steps = [Step(span * 1, "primary SIGTERM", contender.term_primary),
                 Step(span * 2, "primary SIGKILL", contender.kill_primary),
                 Step(span * 3, "rolling reload", contender.reload),
                 Step(span * 4, "primary SIGTERM", contender.term_primary)]
        # Hard bound on the load; it normally stops one span after the last step.
        load = Load("127.0.0.1", port, concurrency=concurrency, duration=duration * 3 + 60, record_events=True,
                    max_requests=10_000_000).start()
        for step in steps:
            delay = step.at - (time.monotonic() - load._start)
            if delay > 0:
                time.sleep(delay)
            try:
                contender.wait_ready()  # a restart is only meaningful once both are back
                at = time.monotonic() - load._start
                marks.append((at, step.label))
                say(f"  {at:5.1f} s  {step.label}  ({load_so_far(load)})")
                step.action()
            except (ReuseportStandbyError, OSError) as exc:
                errors.append(f"{step.label}: {exc}")
                say(f"  {step.label} failed: {exc}")
        time.sleep(span)
        result = load.stop()
        say(f"  {time.monotonic() - load._start:5.1f} s  load stopped")
    finally:
        contender.stop()
        if isinstance(contender, WithStandby):
            remove_tree(Path(DEFAULT_PIN_ROOT) / contender.service)  # a demo leaves nothing pinned behind
    png = out or Path(tempfile.gettempdir()) / f"reuseport-standby-demo{'-baseline' if baseline else ''}.png"
    report(result, contender.name, png, marks)
    if drawing:
        from .timeline import draw

        try:
            draw(result.events, marks, png, f"{contender.name} — {server}: {result.summary()}")
            print(f"timeline: {png}")
        except ImportError:  # found but broken (a missing backend library...)
            drawing = False
    if not drawing:
        print(f"no timeline picture: {PICTURE_HINT}")
    for e in errors:
        print(f"error: {e}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if result.failed == 0 and result.total > 0 and not errors else 1


def report(result: LoadResult, name: str, png: Path, marks: list[tuple[float, str]]) -> None:
    served = result.served_by
    total_ok = max(result.ok, 1)
    rows = [
        ("restarts", ", ".join(f"{label} @ {t:.1f}s" for t, label in marks)),
        ("requests", f"{result.total} ({result.total / max(result.elapsed, 1e-9):.0f}/s)"),
        ("failed", f"{result.failed}" + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(result.failures.items())) + ")"
                                          if result.failed else "")),
        ("served by primary", f"{served.get('primary', 0)} ({100 * served.get('primary', 0) / total_ok:.1f}%)"),
        ("served by standby", f"{served.get('standby', 0)} ({100 * served.get('standby', 0) / total_ok:.1f}%)"),
        ("latency p50 / p99", f"{result.percentile(0.5) * 1000:.1f} / {result.percentile(0.99) * 1000:.1f} ms"),
        ("longest request", f"{result.max_latency * 1000:.0f} ms" + ("  (a SYN was retransmitted)" if result.max_latency >= 1 else "")),
    ]
    print()
    for k, v in rows:
        print(f"  {k:<20} {v}")
    print()
    print("NOTHING FAILED" if result.failed == 0 else f"{result.failed} REQUESTS FAILED")
