"""Restarts under load: reuseport-standby against the alternatives, side by side, in one run.

Run as root (the supervisor loads a BPF program):

    .venv/bin/python bench/restarts.py [--server gunicorn|uvicorn] [options]

Contenders, all serving the same app (``bench/app.py``: the bundled demo app,
recording every request id it receives and working 2 ms per request) with
2 workers per instance:

  reuseport-standby  supervisor (SELECT_OR_MIGRATE) + primary + standby, with the integration
  sockarray-select   the same, supervisor ``--no-migrate``: the program loaded as plain SELECT,
                     i.e. the published sockarray hot-standby demo design
  plain-reuseport    two instances on one port with SO_REUSEPORT and no BPF (the kernel's hash)
  single-hup         one instance, reloaded in place with SIGHUP (gunicorn's worker
                     reload; uvicorn ``--workers``' SIGHUP worker restart)

Each gets the same load (``reuseport_standby.loadgen.Load``: threads, a new
connection per request; then a keep-alive variant) and the same restart
schedule: the primary is sent SIGTERM (master only) and SIGKILL (its whole
process group) alternately, every ``--period`` seconds (``single-hup``: SIGHUP),
and replaced by a new primary; the next restart waits until the new primary
serves.  Every request carries a unique id, which the workers record as soon
as they hold the request (bench/recording.py: right after ``accept()``) and
the app when it is called, so a failed request is either "lost inside a
worker" (a worker held it, then died or dropped it), "lost at the connection
level" (no worker ever held it: refused, or reset in a listener's queue), or,
on a keep-alive connection that had carried requests before, "closed between
keep-alive requests" (the server closed or lost the connection with the
request unread).

Then: the steady-state throughput and CPU per request of reuseport-standby
against a single plain server without it (alternating and simultaneous short
rounds), and the BPF program's run time per invocation
(``bpf_enable_stats``: under the benchmark's load, and bench/loader.py's
synthetic cases).

Writes ``OUT/restarts-SERVER.json``, ``.md`` and ``.png``.  By default the
whole run happens in a network namespace of its own (loopback only), so the
kernel counters it reports (``nstat``) are its own and not those of other
processes on the machine.
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, Any, Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from reuseport_standby import client  # noqa: E402
from reuseport_standby.errors import ProtocolError, SupervisorUnavailable  # noqa: E402
from reuseport_standby.kernel.pins import remove_tree  # noqa: E402
from reuseport_standby.loadgen import Load, LoadResult, exchange  # noqa: E402
from reuseport_standby.status import instance_state  # noqa: E402
from reuseport_standby.supervisor.options import SuperviseOptions  # noqa: E402

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
CONTENDERS = ("reuseport-standby", "sockarray-select", "plain-reuseport", "single-hup")
VARIANTS = ("new-connection", "keep-alive")
NSTAT_KEYS = ("TcpExtListenDrops", "TcpExtListenOverflows", "TcpExtTCPMigrateReqSuccess", "TcpExtTCPMigrateReqFailure",
              "TcpExtTCPAbortOnClose", "TcpExtTCPReqQFullDrop", "TcpOutRsts")
CLONE_NEWNET = 0x40000000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _load_module(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


bench_app = _load_module("bench_app", REPO / "bench" / "app.py")
recording = _load_module("bench_recording", REPO / "bench" / "recording.py")
report = _load_module("bench_report", REPO / "bench" / "report.py")


class BenchError(Exception):
    pass


# -- environment ---------------------------------------------------------------------------

def enter_private_netns() -> None:
    """A network namespace of our own with only loopback: our nstat counters, nobody else's."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)} (run as root, or pass --no-netns)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def nstat() -> dict[str, int]:
    """Absolute values of the TCP counters we report (nstat -asz: no history file touched)."""
    out = subprocess.run(["nstat", "-asz", *NSTAT_KEYS], capture_output=True, text=True, check=True).stdout
    values = {k: 0 for k in NSTAT_KEYS}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in values:
            values[parts[0]] = int(parts[1])
    return values


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


@contextmanager
def bpf_stats() -> Iterator[bool]:
    """Program run-time statistics on for the duration (the fd-scoped form of kernel.bpf_stats_enabled)."""
    from reuseport_standby.kernel import libbpf

    fd = libbpf.load().lib.bpf_enable_stats(libbpf.BPF_STATS_RUN_TIME)
    try:
        yield fd >= 0
    finally:
        if fd >= 0:
            os.close(fd)


def prog_stats(prog_id: int | None) -> dict[str, int]:
    if prog_id is None:
        return {}
    try:
        out = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)], capture_output=True, text=True,
                             check=True, timeout=10).stdout
        info = json.loads(out)
    except (subprocess.SubprocessError, OSError, ValueError):
        return {}
    return {"run_time_ns": int(info.get("run_time_ns", 0)), "run_cnt": int(info.get("run_cnt", 0))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("gunicorn", "uvicorn", "flask"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found


def source_state() -> dict[str, Any]:
    """Which code was measured: the commit, and the files that differed from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if len(line) > 3]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "modified": changed}


# -- processes --------------------------------------------------------------------------------

_started: list[subprocess.Popen] = []


def spawn(cmd: Sequence[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """A child in its own session (so its group can be signalled), logging to ``log_path``."""
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    full_env["PATH"] = f"{BIN}:{full_env.get('PATH', '')}"
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(list(cmd), env=full_env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _started.append(proc)
    return proc


def killpg(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Stop an instance: SIGKILL goes to its whole process group at once (master and workers die
    together); another signal to the main process only, whose exit is awaited; then SIGKILL to whatever
    is left of its process group."""
    if sig == signal.SIGKILL:
        killpg(proc, signal.SIGKILL)
    elif proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    killpg(proc, signal.SIGKILL)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def kill_everything() -> None:
    for proc in _started:
        killpg(proc, signal.SIGKILL)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# -- the servers ---------------------------------------------------------------------------------

@dataclass
class Setup:
    server: str  # gunicorn | uvicorn
    workers: int
    app_sleep_ms: float
    ids_dir: Path | None  # None: no request recording (stock worker class / protocol)
    workdir: Path
    graceful: int = 10
    wsgi: str = "bench.app:app"
    asgi: str = "bench.app:asgi_app"

    def env(self, role: str) -> dict[str, str]:
        env = {"REUSEPORT_STANDBY_ROLE": role, "BENCH_APP_SLEEP_MS": str(self.app_sleep_ms)}
        if self.ids_dir is not None:
            env["BENCH_IDS_DIR"] = str(self.ids_dir)
        return env

    def _gunicorn(self, *extra: str) -> list[str]:
        cmd = [str(BIN / "gunicorn"), "-w", str(self.workers), "--graceful-timeout", str(self.graceful), *extra]
        if self.ids_dir is not None:
            cmd += ["-k", "bench.recording.SyncWorker"]
        return [*cmd, self.wsgi]

    def _uvicorn_options(self) -> list[str]:
        opts = ["--workers", str(self.workers), "--timeout-graceful-shutdown", str(self.graceful)]
        if self.ids_dir is not None:
            opts += ["--loop", "bench.recording:loop_factory"]
        return opts

    def integrated(self) -> list[str]:
        """An instance with the reuseport-standby integration (listeners from the supervisor)."""
        if self.server == "gunicorn":
            return self._gunicorn("-c", "python:reuseport_standby.conf")
        return [sys.executable, "-m", "reuseport_standby", "uvicorn", self.asgi, *self._uvicorn_options(),
                "--no-access-log", "--log-level", "warning"]

    def reuseport(self, port: int, name: str) -> list[str]:
        """An instance on its own SO_REUSEPORT socket(s), no BPF."""
        if self.server == "gunicorn":
            # gunicorn's own control socket defaults to one path per user: give each instance its own.
            return self._gunicorn("--reuse-port", "-b", f"{HOST}:{port}",
                                  "--control-socket", str(self.workdir / f"{name}.ctl"))
        return [sys.executable, str(REPO / "bench" / "plain_uvicorn.py"), HOST, str(port), self.asgi,
                *self._uvicorn_options()]

    def single(self, port: int, name: str) -> list[str]:
        """One plain instance that owns its listener."""
        if self.server == "gunicorn":
            return self._gunicorn("-b", f"{HOST}:{port}", "--control-socket", str(self.workdir / f"{name}.ctl"))
        return [str(BIN / "uvicorn"), *self._uvicorn_options(), "--no-access-log", "--log-level", "warning",
                "--host", HOST, "--port", str(port), self.asgi]


class Contender:
    """What every contender offers the schedule: start, restart the primary, stop."""

    key = ""
    title = ""
    restart_kinds: tuple[str, ...] = ("term", "kill")

    def __init__(self, setup: Setup, workdir: Path, ready_timeout: float) -> None:
        self.setup = setup
        self.workdir = workdir
        self.ready_timeout = ready_timeout
        self.port = free_port()
        self.log_path = workdir / f"{self.key}.log"

    def start(self) -> None:
        raise NotImplementedError

    def restart(self, kind: str) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def prog_id(self) -> int | None:
        return None

    def program_counters(self) -> dict[str, int]:
        return {}

    # -- helpers ------------------------------------------------------------------------------
    def _probe_until_served_by(self, master: subprocess.Popen, want: int, exclude: AbstractSet[int] = frozenset()) -> None:
        """Probe (requests without an id) until ``want`` distinct processes of ``master`` answered."""
        answered: set[int] = set()

        def served() -> bool:
            if master.poll() is not None:
                raise BenchError(f"{self.key}: pid {master.pid} exited with {master.returncode}; see {self.log_path}")
            kind, _, body = exchange(HOST, self.port, "/", timeout=2.0)
            if kind == "ok":
                try:
                    pid = int(body.split()[1])
                except (IndexError, ValueError):
                    return False
                if pid not in exclude and (pid in children(master.pid) or pid == master.pid):
                    answered.add(pid)
            return len(answered) >= want

        wait_until(served, self.ready_timeout, f"{self.key}: {want} processes of pid {master.pid} answering",
                   interval=0.01)


class Supervised(Contender):
    """A supervisor, a primary and a standby, each instance with the integration."""

    key = "reuseport-standby"
    title = "reuseport-standby (SELECT_OR_MIGRATE)"
    migrate = True

    def __init__(self, setup: Setup, workdir: Path, ready_timeout: float, pin_root: Path) -> None:
        super().__init__(setup, workdir, ready_timeout)
        self.service = f"b{uuid.uuid4().hex[:8]}"
        self.control = str(workdir / f"{self.service}.sock")
        self.pin_root = pin_root
        self.supervisor: subprocess.Popen | None = None
        self.primary: subprocess.Popen | None = None
        self.standby: subprocess.Popen | None = None

    def _status(self) -> dict[str, Any] | None:
        try:
            return client.query(self.service, "status", self.control, timeout=2)["status"]
        except (SupervisorUnavailable, ProtocolError, OSError):
            return None

    def _active(self, proc: subprocess.Popen) -> bool:
        if proc.poll() is not None:
            raise BenchError(f"{self.key}: instance pid {proc.pid} exited with {proc.returncode}; see {self.log_path}")
        st = self._status()
        if st is None:
            return False
        return instance_state(st, proc.pid) == "active"

    def _instance(self, role: str) -> subprocess.Popen:
        env = {**self.setup.env(role), "REUSEPORT_STANDBY_SERVICE": self.service,
               "REUSEPORT_STANDBY_CONTROL": self.control}
        return spawn(self.setup.integrated(), env, self.log_path)

    def start(self) -> None:
        cmd = SuperviseOptions(service=self.service, binds=(f"{HOST}:{self.port}",), control=self.control,
                               pin_root=str(self.pin_root), backlog=2048,
                               migrate=None if self.migrate else False).command()
        self.supervisor = spawn(cmd, {}, self.log_path)

        def up() -> bool:
            if self.supervisor.poll() is not None:  # type: ignore[union-attr]
                raise BenchError(f"{self.key}: supervisor exited; see {self.log_path}")
            return self._status() is not None

        wait_until(up, 30, f"{self.key}: supervisor")
        standby = self.standby = self._instance("standby")
        primary = self.primary = self._instance("primary")
        wait_until(lambda: self._active(standby) and self._active(primary), self.ready_timeout,
                   f"{self.key}: primary and standby active")

    def restart(self, kind: str) -> None:
        assert self.primary is not None
        old = self.primary
        if kind == "term":
            stop_group(old, signal.SIGTERM, timeout=30)
        else:
            stop_group(old, signal.SIGKILL, timeout=10)
        self.primary = self._instance("primary")
        new = self.primary
        wait_until(lambda: self._active(new), self.ready_timeout, f"{self.key}: new primary active")

    def stop(self) -> None:
        for p in (self.primary, self.standby, self.supervisor):
            if p is not None:
                stop_group(p, signal.SIGTERM, timeout=20)

    def prog_id(self) -> int | None:
        st = self._status()
        return st["addresses"][0]["prog_id"] if st else None

    def program_counters(self) -> dict[str, int]:
        st = self._status()
        return dict(st["addresses"][0]["counters"]) if st else {}

    def mode(self) -> str | None:
        st = self._status()
        return st["addresses"][0]["mode"] if st else None


class SockarraySelect(Supervised):
    key = "sockarray-select"
    title = "sockarray demo design (plain SELECT)"
    migrate = False


class PlainReuseport(Contender):
    """Two instances with SO_REUSEPORT, no BPF."""

    key = "plain-reuseport"
    title = "plain SO_REUSEPORT pair (no BPF)"

    def __init__(self, setup: Setup, workdir: Path, ready_timeout: float) -> None:
        super().__init__(setup, workdir, ready_timeout)
        self.primary: subprocess.Popen | None = None
        self.standby: subprocess.Popen | None = None

    def _instance(self, role: str) -> subprocess.Popen:
        return spawn(self.setup.reuseport(self.port, f"{self.key}-{role}"), self.setup.env(role), self.log_path)

    def start(self) -> None:
        self.standby = self._instance("standby")
        self._probe_until_served_by(self.standby, self.setup.workers)
        self.primary = self._instance("primary")
        self._probe_until_served_by(self.primary, self.setup.workers)

    def restart(self, kind: str) -> None:
        assert self.primary is not None
        if kind == "term":
            stop_group(self.primary, signal.SIGTERM, timeout=30)
        else:
            stop_group(self.primary, signal.SIGKILL, timeout=10)
        self.primary = self._instance("primary")
        self._probe_until_served_by(self.primary, self.setup.workers)

    def stop(self) -> None:
        for p in (self.primary, self.standby):
            if p is not None:
                stop_group(p, signal.SIGTERM, timeout=20)


class SingleHup(Contender):
    """One instance; every restart is the server's own in-place reload (SIGHUP)."""

    key = "single-hup"
    title = "single instance, SIGHUP reload"
    restart_kinds = ("hup",)

    def __init__(self, setup: Setup, workdir: Path, ready_timeout: float) -> None:
        super().__init__(setup, workdir, ready_timeout)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = spawn(self.setup.single(self.port, self.key), self.setup.env("single"), self.log_path)
        self._probe_until_served_by(self.proc, self.setup.workers)

    def workers(self) -> set[int]:
        """The server's worker processes (uvicorn's spawn also starts multiprocessing's resource tracker)."""
        assert self.proc is not None
        found = set()
        for pid in children(self.proc.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"resource_tracker" not in cmdline:
                found.add(pid)
        return found

    def restart(self, kind: str) -> None:
        assert self.proc is not None and kind == "hup"
        old = self.workers()
        self.proc.send_signal(signal.SIGHUP)
        # Done when none of the old workers is left and as many new ones have answered.
        wait_until(lambda: not (self.workers() & old), self.ready_timeout, f"{self.key}: old workers gone")
        self._probe_until_served_by(self.proc, self.setup.workers, exclude=old)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, signal.SIGTERM, timeout=20)


# -- one load run under one restart schedule ------------------------------------------------

@dataclass
class Schedule:
    restarts: int
    period: float
    min_gap: float
    settle: float
    tail: float


def run_variant(c: Contender, variant: str, schedule: Schedule, *, concurrency: int, timeout: float, id_base: int,
                ids_dir: Path, bucket: float, keepalive_requests: int) -> dict[str, Any]:
    kinds = [c.restart_kinds[i % len(c.restart_kinds)] for i in range(schedule.restarts)]
    nstat_before = nstat()
    prog_before = prog_stats(c.prog_id())
    counters_before = c.program_counters()
    hard_bound = schedule.settle + schedule.tail + schedule.restarts * (schedule.period + 2 * c.ready_timeout + 40)
    load = Load(HOST, c.port, concurrency=concurrency, duration=hard_bound, max_requests=50_000_000,
                keepalive=variant == "keep-alive", timeout=timeout, request_ids=True, id_base=id_base,
                record_latencies=False, requests_per_connection=keepalive_requests, reuse_check=True)
    t0 = time.monotonic()
    load.start()
    steps: list[dict[str, Any]] = []
    error = None
    try:
        time.sleep(schedule.settle)
        prev_at: float | None = None
        prev_ready = 0.0
        for kind in kinds:
            if prev_at is not None:
                target = max(prev_at + schedule.period, prev_ready + schedule.min_gap)
                time.sleep(max(0.0, target - time.monotonic()))
            at = time.monotonic()
            c.restart(kind)
            ready = time.monotonic()
            steps.append({"kind": kind, "at": round(at - t0, 3), "serving_after": round(ready - at, 3)})
            prev_at, prev_ready = at, ready
        time.sleep(schedule.tail)
    except BenchError as exc:
        error = str(exc)
        log(f"  {c.key} {variant}: {error}")
    finally:
        result = load.stop()
    in_app = bench_app.read_ids(str(ids_dir))
    accepted = recording.read_accepted(str(ids_dir))
    out = analyse(result, accepted, in_app, t0, steps, bucket)
    out.update({
        "variant": variant,
        "restarts": len(steps),
        "steps": steps,
        "error": error,
        "nstat": delta(nstat(), nstat_before),
        "bpf_prog": _prog_delta(prog_before, prog_stats(c.prog_id())),
        "program_counters": {k: v - counters_before.get(k, 0) for k, v in c.program_counters().items()},
    })
    return out


def _prog_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    if not before or not after:
        return {}
    runs = after["run_cnt"] - before["run_cnt"]
    ns = after["run_time_ns"] - before["run_time_ns"]
    return {"runs": runs, "run_time_ns": ns, "ns_per_run": round(ns / runs, 1) if runs else None}


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def accepted_during(accepted: dict[int, list[float]], r: Any) -> bool:
    """Did a worker accept request ``r``'s connection while ``r`` was under way (same client port)?"""
    times = accepted.get(r.port)
    if not r.port or not times:
        return False
    i = bisect.bisect_left(times, r.sent)
    return i < len(times) and times[i] <= r.ended


def analyse(result: LoadResult, accepted: dict[int, list[float]], in_app: set[int], t0: float,
            steps: list[dict[str, Any]], bucket: float) -> dict[str, Any]:
    """Classify every failure, and summarise latency, throughput, shares and the timeline.

    A failed request was lost inside a worker if a worker accepted its
    connection while it was under way (bench/recording.py), or the app was
    called with it.  Otherwise: lost at the connection level if it was the
    first on its connection (no worker ever accepted that connection:
    refused, or reset in a listener's queue or handshake); if it was sent on a
    keep-alive connection that had carried requests before, the server side
    closed or lost that connection with the request unread, which HTTP
    clients retry and no port sharing can prevent.
    """
    reqs = result.requests
    ok = [r for r in reqs if r.kind == "ok"]
    failed = [r for r in reqs if r.kind != "ok"]
    held = [r.id in in_app or (not r.reused and accepted_during(accepted, r)) for r in failed]
    in_worker = [r for r, h in zip(failed, held) if h]
    conn_new = [r for r, h in zip(failed, held) if not h and not r.reused]
    conn_reused = [r for r, h in zip(failed, held) if not h and r.reused]
    # What the app's record alone would call connection-level: the difference was accepted by a
    # worker that died before calling the app.
    app_unseen = [r for r in failed if r.id not in in_app]
    # Checks of the method: every answered request reached the app, and every answered request
    # on a new connection has its accept recorded.
    unrecorded_app = sum(1 for r in ok if r.id not in in_app)
    unrecorded_accept = sum(1 for r in ok if not r.reused and not accepted_during(accepted, r))
    classes = {id(r): "in_worker" for r in in_worker}
    classes.update({id(r): "connection" for r in conn_new})
    classes.update({id(r): "reused_keepalive" for r in conn_reused})
    lat = sorted(r.ended - r.sent for r in ok)
    elapsed = result.elapsed or 1e-9

    def kinds(rs: list[Any]) -> dict[str, int]:
        return dict(sorted(Counter(r.kind for r in rs).items()))

    starts = [s["at"] for s in steps]

    def step_of(r: Any) -> int:
        return sum(1 for t in starts if t <= r.ended - t0) - 1

    per_step = [{"connection": 0, "reused_keepalive": 0, "in_worker": 0} for _ in steps]
    before_first = 0
    for group, name in ((conn_new, "connection"), (conn_reused, "reused_keepalive"), (in_worker, "in_worker")):
        for r in group:
            i = step_of(r)
            if i < 0:
                before_first += 1
            else:
                per_step[i][name] += 1
    by_kind: dict[str, dict[str, int]] = {}
    for s, f in zip(steps, per_step):
        k = by_kind.setdefault(s["kind"], {"restarts": 0, "connection": 0, "reused_keepalive": 0, "in_worker": 0})
        k["restarts"] += 1
        for name in ("connection", "reused_keepalive", "in_worker"):
            k[name] += f[name]

    roles: Counter[str] = Counter()
    pids: dict[str, set[str]] = {}
    for r in ok:
        parts = r.answer.split()
        role = parts[0] if parts else "?"
        roles[role] += 1
        if len(parts) > 1:
            pids.setdefault(role, set()).add(parts[1])
    n_ok = max(len(ok), 1)

    # Timeline: per bucket of request end time.
    n = int(elapsed / bucket) + 1
    tl_ok = [0] * n
    tl_failed = [0] * n
    tl_lat: list[list[float]] = [[] for _ in range(n)]
    for r in reqs:
        i = min(n - 1, max(0, int((r.ended - t0) / bucket)))
        if r.kind == "ok":
            tl_ok[i] += 1
            tl_lat[i].append(r.ended - r.sent)
        else:
            tl_failed[i] += 1
    for l in tl_lat:
        l.sort()

    return {
        "requests": len(reqs),
        "ok": len(ok),
        "failed": len(failed),
        "failures_by_kind": kinds(failed),
        "lost_connection_level": len(conn_new),
        "failed_on_reused_keepalive": len(conn_reused),
        "lost_in_worker": len(in_worker),
        "lost_in_worker_in_app": sum(1 for r in in_worker if r.id in in_app),
        "lost_never_reached_app": len(app_unseen),
        "connection_level_by_kind": kinds(conn_new),
        "reused_keepalive_by_kind": kinds(conn_reused),
        "in_worker_by_kind": kinds(in_worker),
        "check_answered_not_in_app": unrecorded_app,
        "check_answered_accept_not_recorded": unrecorded_accept,
        "by_restart_kind": by_kind,
        "failures_before_first_restart": before_first,
        "failures_per_restart": per_step,
        "latency_ms": {"p50": round(_pct(lat, 0.5) * 1e3, 2), "p99": round(_pct(lat, 0.99) * 1e3, 2),
                       "p99_9": round(_pct(lat, 0.999) * 1e3, 2), "max": round((lat[-1] if lat else 0) * 1e3, 2)},
        "elapsed_s": round(elapsed, 2),
        "throughput_rps": round(len(ok) / elapsed, 1),
        "share": {role: round(v / n_ok, 4) for role, v in sorted(roles.items())},
        "answered_by": {role: v for role, v in sorted(roles.items())},
        "worker_pids": {role: len(v) for role, v in sorted(pids.items())},
        # every failed request (at most 5000), times in seconds since the load started
        "failed_requests": [
            {"id": r.id, "sent": round(r.sent - t0, 4), "ended": round(r.ended - t0, 4), "kind": r.kind,
             "class": classes[id(r)], "reused": r.reused, "port": r.port, "in_app": r.id in in_app}
            for r in failed[:5000]],
        "timeline": {"bucket_s": bucket, "ok": tl_ok, "failed": tl_failed,
                     "p99_ms": [round(_pct(l, 0.99) * 1e3, 1) if l else None for l in tl_lat],
                     "max_ms": [round(l[-1] * 1e3, 1) if l else None for l in tl_lat]},
    }


# -- steady state: this project vs one plain server ----------------------------------------------

def cpu_seconds(roots: Sequence[subprocess.Popen | None]) -> float:
    """CPU time of these processes and their children (workers), all threads, in seconds.

    From /proc/PID/task/*/schedstat (nanoseconds on CPU), not utime+stime (10 ms ticks).
    """
    pids: set[int] = set()
    for proc in roots:
        if proc is not None:
            pids.add(proc.pid)
            pids |= children(proc.pid)
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                continue
    return total / 1e9


def overhead(args: argparse.Namespace, workdir: Path, pin_root: Path) -> dict[str, Any]:
    """Steady-state throughput of reuseport-standby against one plain server, no restarts.

    Both run all along (each idle while not measured).  Throughput on a
    shared machine swings with other people's work from one second to the
    next, so each round measures two ways: *alternating* (the full load
    against one, then the other; the order flips every round: ABBA...) and
    *simultaneous* (half the load against each at once, so both see the
    same contention; the start order flips too).  Reported: the median of
    the per-round ratios and their range, and server CPU time per request
    (every process each side runs: ours is supervisor, primary and standby
    with their workers).
    """
    app_wsgi, app_asgi = "reuseport_standby.demo_app:app", "reuseport_standby.demo_app:asgi_app"
    setup = Setup(args.server, args.workers, 0, None, workdir, wsgi=app_wsgi, asgi=app_asgi)
    ours = Supervised(setup, workdir, args.ready_timeout, pin_root)
    ours.key = "overhead-reuseport-standby"
    ours.log_path = workdir / f"{ours.key}.log"
    plain = SingleHup(setup, workdir, args.ready_timeout)
    plain.key = "overhead-plain"
    plain.log_path = workdir / f"{plain.key}.log"
    rounds: list[dict[str, Any]] = []

    def load(c: Contender, concurrency: int) -> Load:
        return Load(HOST, c.port, concurrency=concurrency, duration=args.overhead_seconds, timeout=args.timeout,
                    record_latencies=False)

    def row(i: int, mode: str, side: str, r: LoadResult, cpu: float) -> dict[str, Any]:
        return {"round": i, "mode": mode, "side": side, "ok": r.ok, "failed": r.failed,
                "elapsed_s": round(r.elapsed, 3), "rps": round(r.ok / r.elapsed, 1) if r.elapsed else 0.0,
                "server_cpu_s": round(cpu, 4), "answered_by": dict(r.served_by)}

    try:
        ours.start()
        plain.start()
        procs = {"reuseport-standby": lambda: [ours.supervisor, ours.primary, ours.standby],
                 "plain": lambda: [plain.proc]}
        sides = {"reuseport-standby": ours, "plain": plain}
        for c in (ours, plain):  # warm up
            Load(HOST, c.port, concurrency=args.concurrency, duration=1.0, timeout=args.timeout,
                 record_latencies=False).start().wait()
        for i in range(args.overhead_rounds):
            order = ["reuseport-standby", "plain"] if i % 2 == 0 else ["plain", "reuseport-standby"]
            for side in order:
                cpu0 = cpu_seconds(procs[side]())
                r = load(sides[side], args.concurrency).start().wait()
                rounds.append(row(i, "alternating", side, r, cpu_seconds(procs[side]()) - cpu0))
            cpu0s = {side: cpu_seconds(procs[side]()) for side in order}
            loads = {side: load(sides[side], max(1, args.concurrency // 2)).start() for side in order}
            results = {side: loads[side].wait() for side in order}
            for side in order:
                rounds.append(row(i, "simultaneous", side, results[side], cpu_seconds(procs[side]()) - cpu0s[side]))
    finally:
        ours.stop()
        plain.stop()

    def summary(mode: str) -> dict[str, Any]:
        a = [r for r in rounds if r["mode"] == mode and r["side"] == "reuseport-standby"]
        b = [r for r in rounds if r["mode"] == mode and r["side"] == "plain"]
        ratios = sorted(x["rps"] / y["rps"] for x, y in zip(a, b) if y["rps"])
        cpu_ratios = sorted((y["server_cpu_s"] / y["ok"]) / (x["server_cpu_s"] / x["ok"])
                            for x, y in zip(a, b) if x["ok"] and y["ok"] and x["server_cpu_s"])
        n_a, n_b = sum(x["ok"] for x in a), sum(y["ok"] for y in b)
        return {
            "rounds": len(ratios),
            "reuseport_standby_rps_mean": round(statistics.mean(x["rps"] for x in a), 1) if a else None,
            "plain_rps_mean": round(statistics.mean(y["rps"] for y in b), 1) if b else None,
            "ratio_median": round(statistics.median(ratios), 4) if ratios else None,
            "ratio_q1": round(_pct(ratios, 0.25), 4) if ratios else None,
            "ratio_q3": round(_pct(ratios, 0.75), 4) if ratios else None,
            "ratio_min": round(ratios[0], 4) if ratios else None,
            "ratio_max": round(ratios[-1], 4) if ratios else None,
            "reuseport_standby_cpu_ms_per_request": round(1e3 * sum(x["server_cpu_s"] for x in a) / n_a, 4) if n_a else None,
            "plain_cpu_ms_per_request": round(1e3 * sum(y["server_cpu_s"] for y in b) / n_b, 4) if n_b else None,
            # plain's CPU per request over ours: the throughput ratio a CPU-bound server would see
            "cpu_ratio_median": round(statistics.median(cpu_ratios), 4) if cpu_ratios else None,
            "cpu_ratio_q1": round(_pct(cpu_ratios, 0.25), 4) if cpu_ratios else None,
            "cpu_ratio_q3": round(_pct(cpu_ratios, 0.75), 4) if cpu_ratios else None,
        }

    return {
        "app": app_wsgi if args.server == "gunicorn" else app_asgi,
        "app_sleep_ms": 0,
        "plain": f"single {args.server}, {args.workers} workers",
        "seconds_per_round": args.overhead_seconds,
        "alternating": summary("alternating"),
        "simultaneous": summary("simultaneous"),
        "rounds": rounds,
        "target": 0.97,
    }


def synthetic_bpf_cost(connections: int) -> dict[str, Any]:
    """bench/loader.py's measurement: the program's run time per selection, by what it has to probe."""
    bench_loader = _load_module("bench_loader", REPO / "bench" / "loader.py")
    try:
        return bench_loader.selection_cost(connections)
    finally:
        remove_tree(bench_loader.BASE)


# -- main ----------------------------------------------------------------------------------------

def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM: stop like ^C, still cleaning up and writing the results


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", choices=("gunicorn", "uvicorn"), default="gunicorn",
                    help="gunicorn (sync workers, the Flask demo app) or uvicorn (the ASGI demo app); default gunicorn")
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help=f"comma-separated subset of {', '.join(CONTENDERS)} (default: all, in that order)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated: new-connection (a new connection per request), keep-alive (default: both)")
    ap.add_argument("--workers", type=int, default=2, help="workers per instance (default 2)")
    ap.add_argument("--concurrency", type=int, default=32, help="client threads (default 32)")
    ap.add_argument("--restarts", type=int, default=20,
                    help="restarts per contender in the new-connection variant (default 20: SIGTERM, SIGKILL alternately)")
    ap.add_argument("--keepalive-restarts", type=int, default=10,
                    help="restarts per contender in the keep-alive variant (default 10)")
    ap.add_argument("--keepalive-requests", type=int, default=50,
                    help="keep-alive variant: requests per connection before the client opens a new one, as pools "
                         "recycle connections (0: never; default 50)")
    ap.add_argument("--period", type=float, default=2.0, help="seconds between restarts (default 2)")
    ap.add_argument("--min-gap", type=float, default=0.5,
                    help="at least this long between a new primary serving and the next restart (default 0.5)")
    ap.add_argument("--settle", type=float, default=1.0, help="load before the first restart, s (default 1)")
    ap.add_argument("--tail", type=float, default=2.0, help="load after the last restart, s (default 2)")
    ap.add_argument("--app-sleep-ms", type=float, default=2.0, help="work per request in the app, ms (default 2)")
    ap.add_argument("--timeout", type=float, default=5.0, help="client timeout per request, s (default 5)")
    ap.add_argument("--ready-timeout", type=float, default=60.0,
                    help="how long a (re)started instance may take to serve, s (default 60)")
    ap.add_argument("--overhead-rounds", type=int, default=16,
                    help="steady-state rounds, each: one alternating pair and one simultaneous (0 to skip; default 16)")
    ap.add_argument("--overhead-seconds", type=float, default=1.5,
                    help="seconds per steady-state measurement (default 1.5)")
    ap.add_argument("--bpf-connections", type=int, default=2000,
                    help="connections per case for bench/loader.py's selection cost (0 to skip; default 2000)")
    ap.add_argument("--bucket", type=float, default=0.25, help="timeline resolution, s (default 0.25)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                    help="directory for restarts-SERVER.{json,md,png} (default bench/results)")
    ap.add_argument("--keep-records", action="store_true",
                    help="keep the servers' records of ids and accepts (in the log directory) for inspection")
    ap.add_argument("--no-netns", dest="netns", action="store_false",
                    help="stay in the current network namespace (nstat deltas then include other traffic)")
    ap.add_argument("--max-minutes", type=float, default=8.0,
                    help="phases that would start later than this are skipped, so that a run ends within about "
                         "2 minutes more (default 8)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in contenders:
        if name not in CONTENDERS:
            raise SystemExit(f"unknown contender {name!r}; choose from {', '.join(CONTENDERS)}")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if os.geteuid() != 0:
        raise SystemExit("run as root: the supervisor loads a BPF program")
    started_wall = time.time()
    t_start = time.monotonic()
    hard_deadline = t_start + args.max_minutes * 60
    if args.netns:
        enter_private_netns()
    signal.signal(signal.SIGTERM, _interrupted)

    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="rs-bench-", dir="/tmp"))
    workdir.chmod(0o755)
    pin_root = Path("/sys/fs/bpf/reuseport_standby_bench") / uuid.uuid4().hex[:10]
    ids_root = workdir / "ids"
    ids_root.mkdir()
    results: dict[str, Any] = {
        "meta": {
            "command": " ".join([".venv/bin/python", "bench/restarts.py", *(argv if argv is not None else sys.argv[1:])]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started_wall)),
            "kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "versions": versions(), "source": source_state(), "server": args.server, "workers": args.workers, "concurrency": args.concurrency,
            "restarts": args.restarts, "keepalive_restarts": args.keepalive_restarts, "period_s": args.period,
            "min_gap_s": args.min_gap, "app_sleep_ms": args.app_sleep_ms, "timeout_s": args.timeout,
            "keepalive_requests": args.keepalive_requests,
            "netns": args.netns, "contenders": contenders, "variants": variants,
            "loadavg_before": list(os.getloadavg()),
        },
        "contenders": {},
        "overhead": None,
        "bpf_cost": None,
    }
    id_base = 0
    try:
        with bpf_stats() as stats_on:
            results["meta"]["bpf_stats"] = stats_on
            for key in contenders:
                if time.monotonic() > hard_deadline:
                    log(f"skipping {key}: past --max-minutes")
                    results["meta"].setdefault("skipped", []).append(key)
                    continue
                ids_dir = ids_root / key
                ids_dir.mkdir()
                ids_dir.chmod(0o777)
                setup = Setup(args.server, args.workers, args.app_sleep_ms, ids_dir, workdir)
                c: Contender
                if key == "reuseport-standby":
                    c = Supervised(setup, workdir, args.ready_timeout, pin_root)
                elif key == "sockarray-select":
                    c = SockarraySelect(setup, workdir, args.ready_timeout, pin_root)
                elif key == "plain-reuseport":
                    c = PlainReuseport(setup, workdir, args.ready_timeout)
                else:
                    c = SingleHup(setup, workdir, args.ready_timeout)
                entry: dict[str, Any] = {"title": c.title, "restart_kinds": list(c.restart_kinds), "variants": {}}
                results["contenders"][key] = entry
                log(f"{key}: starting ({args.server}, {args.workers} workers per instance, port {c.port})")
                try:
                    c.start()
                    if isinstance(c, Supervised):
                        entry["mode"] = c.mode()
                    for variant in variants:
                        n = args.restarts if variant == "new-connection" else args.keepalive_restarts
                        if time.monotonic() > hard_deadline:
                            log(f"  skipping {key} {variant}: past --max-minutes")
                            results["meta"].setdefault("skipped", []).append(f"{key} {variant}")
                            continue
                        schedule = Schedule(n, args.period, args.min_gap, args.settle, args.tail)
                        log(f"  {key} {variant}: {n} restarts under load")
                        r = run_variant(c, variant, schedule, concurrency=args.concurrency, timeout=args.timeout,
                                        id_base=id_base, ids_dir=ids_dir, bucket=args.bucket,
                                        keepalive_requests=args.keepalive_requests)
                        id_base += 100_000_000
                        entry["variants"][variant] = r
                        log(f"  {key} {variant}: {r['requests']} requests, {r['throughput_rps']}/s; connection-level "
                            f"{r['lost_connection_level']}, reused keep-alive {r['failed_on_reused_keepalive']}, "
                            f"in workers {r['lost_in_worker']}; {r['failures_by_kind']}; "
                            f"max {r['latency_ms']['max']} ms; nstat {r['nstat']}")
                except BenchError as exc:
                    entry["error"] = str(exc)
                    log(f"{key}: {exc}")
                finally:
                    c.stop()
            if args.bpf_connections > 0 and time.monotonic() >= hard_deadline:
                results["meta"].setdefault("skipped", []).append("bpf cost")
            elif args.bpf_connections > 0:
                log(f"BPF selection cost (bench/loader.py, {args.bpf_connections} connections per case)")
                under_load = {k: v["variants"][var]["bpf_prog"] for k, v in results["contenders"].items()
                              for var in v["variants"] if v["variants"][var].get("bpf_prog")}
                results["bpf_cost"] = {"under_load": under_load, "synthetic": synthetic_bpf_cost(args.bpf_connections)}
        if args.overhead_rounds > 0 and time.monotonic() >= hard_deadline:
            results["meta"].setdefault("skipped", []).append("steady state")
        elif args.overhead_rounds > 0:
            log(f"steady state: {args.overhead_rounds} rounds, {args.overhead_seconds:g} s per measurement")
            try:
                results["overhead"] = overhead(args, workdir, pin_root)
                for mode in ("alternating", "simultaneous"):
                    o = results["overhead"][mode]
                    log(f"  {mode}: throughput ratio median {o['ratio_median']} ({o['ratio_min']}-{o['ratio_max']}); "
                        f"CPU ratio median {o['cpu_ratio_median']}")
            except BenchError as exc:
                results["overhead"] = {"error": str(exc)}
                log(f"steady state: {exc}")
    except KeyboardInterrupt:
        results["meta"]["interrupted"] = True
        log("interrupted; writing what was measured")
    finally:
        kill_everything()
        try:
            remove_tree(pin_root)
        except OSError as exc:
            log(f"could not remove {pin_root}: {exc}")
        try:
            pin_root.parent.rmdir()  # only if no other run uses it
        except OSError:
            pass
        results["meta"]["duration_s"] = round(time.monotonic() - t_start, 1)
        results["meta"]["loadavg_after"] = list(os.getloadavg())
        results["meta"]["logs"] = str(workdir)
        base = args.out / f"restarts-{args.server}"
        base.with_suffix(".json").write_text(json.dumps(results, separators=(",", ":")) + "\n")
        base.with_suffix(".md").write_text(report.markdown(results))
        try:
            report.chart(results, base.with_suffix(".png"))
        except Exception as exc:  # a chart must never cost the measurements
            log(f"chart failed: {exc!r}")
        if not args.keep_records:
            shutil.rmtree(ids_root, ignore_errors=True)
        log(f"wrote {base}.json, .md, .png in {results['meta']['duration_s']:.0f} s; server logs in {workdir}")
    print(base.with_suffix(".md").read_text())
    failed_phases = [k for k, e in results["contenders"].items()
                     if e.get("error") or any(v.get("error") for v in e.get("variants", {}).values())]
    skipped = results["meta"].get("skipped", [])
    if failed_phases or skipped or results["meta"].get("interrupted") or (results["overhead"] or {}).get("error"):
        log(f"incomplete: failed {failed_phases}, skipped {skipped}, interrupted {bool(results['meta'].get('interrupted'))}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
