"""The supervisor under attack while it serves: end to end, with real gunicorn instances and real TCP load.

1. A peer that floods ``status`` without reading its replies, and more idle control connections
   than the supervisor has file descriptors, while a primary and a standby serve a bounded load.
2. A worker-scope rolling reload of ``run`` with 12 workers per instance and two addresses, whose
   ``status`` is longer than one control message (it used to end the supervisor with "message of
   17000 bytes exceeds 16384").
3. The runner's own reload socket: any reply (a long error, a big result) reaches ``reload``, and a
   request it cannot parse gets an answer instead of a dropped connection (no root needed).

Everything runs on 127.0.0.1; every loop is bounded in count and in time.  Run with ``-s`` to see
the measured figures.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import free_port
from helpers.procs import REPO, SupervisorProc, stop_process_group, wait_for
from helpers.servers import APPS, BIN, InstanceProc, gunicorn_cmd
from reuseport_standby import client, protocol
from reuseport_standby.client import connect, request
from reuseport_standby.errors import ProtocolError, SupervisorUnavailable
from reuseport_standby.loadgen import Load, exchange

HOST = "127.0.0.1"
MAX_STATUS_LATENCY = 1.0  # seconds a connected client may wait for `status`, whatever other peers do


# -- helpers ---------------------------------------------------------------------------------------------

@dataclass
class Latencies:
    """`status` round trips of one client: seconds each, and the requests that got no answer in time."""

    seconds: list[float] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def max(self) -> float:
        return max(self.seconds) if self.seconds else float("nan")

    def __str__(self) -> str:
        return (f"{len(self.seconds)} answered, median {self.median * 1e3:.1f} ms, max {self.max * 1e3:.1f} ms, "
                f"{len(self.unanswered)} unanswered{': ' + '; '.join(self.unanswered[:3]) if self.unanswered else ''}")


def _fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _processes_of_service(service: str) -> list[tuple[int, str]]:
    """Every live process started with REUSEPORT_STANDBY_SERVICE=service (instances and their workers)."""
    needle = f"REUSEPORT_STANDBY_SERVICE={service}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    continue
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append((int(entry), cmdline.strip()))
    return found


# -- 1. a slow reader and 1,100 idle control connections while a pair serves load ------------------------

IDLE_CONNECTIONS = 1100
SUPERVISOR_NOFILE = 1024  # the usual default soft limit; this machine's may be higher, so the test sets it
ATTACK_SECONDS = 5.0

# Holds idle control connections in a process of its own (root, so no per-uid cap applies), so
# that this test process keeps its own descriptors low (client.request uses select()).
IDLE_HOLDER = """
import json, resource, socket, sys, time
control, want, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < want + 64:
    resource.setrlimit(resource.RLIMIT_NOFILE, (want + 64, max(hard, want + 64)))
held, refused, gone = [], 0, False
deadline = time.monotonic() + seconds
last_gain = time.monotonic()
while len(held) < want and time.monotonic() < deadline and time.monotonic() - last_gain < 1.0:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.setblocking(False)
    try:
        s.connect(control)
    except BlockingIOError:  # the control socket's backlog is full: the supervisor does not accept
        s.close()
        refused += 1
        time.sleep(0.002)
        continue
    except (FileNotFoundError, ConnectionRefusedError):  # no supervisor there any more
        s.close()
        gone = True
        break
    held.append(s)
    last_gain = time.monotonic()
print(json.dumps({"connected": len(held), "refused": refused, "supervisor_gone": gone}), flush=True)
sys.stdin.read()
for s in held:
    s.close()
print(json.dumps("closed"), flush=True)
"""


def _flood(control: str, stop: threading.Event, deadline: float, stats: dict[str, int]) -> None:
    """Send `status` requests as fast as the socket takes them and never read a reply; when the
    supervisor hangs up, connect again and go on (bounded by ``deadline``)."""
    req = protocol.encode({"op": "status"})
    sock: socket.socket | None = None
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            if sock is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.setblocking(False)
                try:
                    s.connect(control)
                    sock = s
                    stats["connections"] += 1
                except (BlockingIOError, FileNotFoundError, ConnectionRefusedError):
                    s.close()
                    stats["connect_refused"] += 1
                    time.sleep(0.01)
                    continue
            sent = 0
            while sent < 200:
                try:
                    sock.send(req)
                    sent += 1
                except BlockingIOError:
                    break
                except (BrokenPipeError, ConnectionResetError):
                    stats["dropped"] += 1
                    sock.close()
                    sock = None
                    break
            stats["sent"] += sent
            time.sleep(0.005)
    finally:
        if sock is not None:
            sock.close()


def _observe(sock: socket.socket, stop: threading.Event, deadline: float, out: Latencies) -> None:
    """`status` on an already-connected socket, again and again; each must be answered within 1 s."""
    while not stop.is_set() and time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            reply, _ = request(sock, {"op": "status"}, timeout=MAX_STATUS_LATENCY)
            assert reply["ok"]
            out.seconds.append(time.perf_counter() - t0)
        except (SupervisorUnavailable, ProtocolError, OSError) as exc:
            out.unanswered.append(f"{type(exc).__name__}: {exc}")
            if isinstance(exc, OSError) or "closed" in str(exc):
                return  # the connection is gone: nothing more to observe
        time.sleep(0.05)


def _gunicorn(sup: SupervisorProc, role: str, env: dict[str, str]) -> InstanceProc:
    cmd = gunicorn_cmd("wsgi_app:app", "--workers", "2", "--graceful-timeout", "10")
    return InstanceProc(cmd, sup, role, env=env, cwd=APPS)


def test_a_slow_reader_and_1100_idle_connections_while_a_pair_serves_load(supervisor, short_tmp: Path) -> None:
    sup = supervisor()
    env = {"TEST_APP_REQUEST_DELAY": "0.005", "XDG_RUNTIME_DIR": str(short_tmp)}
    port = int(sup.binds[0].rpartition(":")[2])
    standby = _gunicorn(sup, "standby", env).start().wait_active()
    primary = _gunicorn(sup, "primary", env).start().wait_active()
    observer = connect(sup.control)
    holder: subprocess.Popen | None = None
    threads: list[threading.Thread] = []
    stop = threading.Event()
    try:
        assert request(observer, {"op": "ping"}, timeout=2)[0]["ok"]  # accepted before the attack
        pid = sup.status()["supervisor"]["pid"]
        assert pid == sup.proc.pid
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (SUPERVISOR_NOFILE, hard))
        fds_before = _fd_count(pid)

        deadline = time.monotonic() + ATTACK_SECONDS + 15  # a hard bound for every thread
        latencies = Latencies()
        flood: dict[str, int] = {"sent": 0, "dropped": 0, "connections": 0, "connect_refused": 0}
        with Load(HOST, port, concurrency=8, duration=ATTACK_SECONDS + 10, max_requests=20_000) as load:
            time.sleep(0.3)
            threads = [threading.Thread(target=_observe, args=(observer, stop, deadline, latencies), daemon=True),
                       threading.Thread(target=_flood, args=(sup.control, stop, deadline, flood), daemon=True)]
            for t in threads:
                t.start()
            attack_started = time.monotonic()
            holder = subprocess.Popen([sys.executable, "-c", IDLE_HOLDER, sup.control, str(IDLE_CONNECTIONS), "8"],
                                      cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
            idle = json.loads(holder.stdout.readline() or "null")
            assert idle is not None, f"the idle holder said nothing: {holder.stderr.read()[-2000:]}"
            peak_fds = _fd_count(pid)
            while time.monotonic() < attack_started + ATTACK_SECONDS:
                peak_fds = max(peak_fds, _fd_count(pid))
                time.sleep(0.1)
            stop.set()
            for t in threads:
                t.join(5)
            holder.stdin.close()
            assert json.loads(holder.stdout.readline() or "null") == "closed"
            holder.wait(10)
            load.stop()
        result = load.result

        alive = sup.proc.poll() is None
        st = sup.status() if alive else {}
        log = sup.log()
        print(f"\nunder attack for {ATTACK_SECONDS:.0f} s: {IDLE_CONNECTIONS} idle control connections tried, "
              f"{idle['connected']} connected ({idle['refused']} attempts found the backlog full); supervisor fds "
              f"{fds_before} before, {peak_fds} at the peak (RLIMIT_NOFILE {SUPERVISOR_NOFILE}); flooder: "
              f"{flood['sent']} status requests sent unread over {flood['connections']} connection(s), dropped "
              f"{flood['dropped']} time(s)\n  connected client's status: {latencies}\n  load: {result.summary()}")

        assert alive, f"the supervisor exited with {sup.proc.returncode}:\n{log[-3000:]}"
        assert st["supervisor"]["pid"] == pid
        assert latencies.unanswered == [], latencies
        assert len(latencies.seconds) >= 10, latencies
        assert latencies.max < MAX_STATUS_LATENCY, latencies
        assert result.failed == 0, result.failures
        assert result.ok > 200, result.summary()
        states = {i["pid"]: i["state"] for i in st["instances"]}
        assert states == {standby.proc.pid: "active", primary.proc.pid: "active"}, st["instances"]
        assert st["supervisor"]["demotions"] == 0 and all(i["demotions"] == 0 for i in st["instances"])
        # The attack did what it says: the supervisor ran out of descriptors and dropped the flooder.
        assert idle["connected"] + 1 > SUPERVISOR_NOFILE - fds_before, idle
        assert peak_fds >= SUPERVISOR_NOFILE - 1, peak_fds
        assert "cannot accept a control connection" in log
        assert "did not read its replies" in log and flood["dropped"] >= 1
        assert flood["sent"] >= 200
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait(5)
        observer.close()
        primary.stop()
        standby.stop()


# -- 2. a worker-scope rolling reload whose status is longer than one message -----------------------------

WORKERS = 12


class WorkerScopeRun:
    """``reuseport-standby run --scope worker`` on two loopback addresses, 12 gunicorn workers per instance."""

    def __init__(self, tmp: Path, pin_root: Path) -> None:
        self.service = f"a{uuid.uuid4().hex[:8]}"
        self.control = str(tmp / f"{self.service}.sock")
        self.ports = [free_port(), free_port()]
        self.log_path = tmp / f"{self.service}.log"
        cmd = [sys.executable, "-m", "reuseport_standby", "run", "--service", self.service, "--scope", "worker",
               *[a for p in self.ports for a in ("--bind", f"{HOST}:{p}")], "--control", self.control,
               "--pin-root", str(pin_root), "--ready-timeout", "40", "--stop-timeout", "15",
               "--", "gunicorn", "-w", str(WORKERS), "--graceful-timeout", "5", "versioned_app:app"]
        env = {**os.environ, "PYTHONPATH": str(APPS), "XDG_RUNTIME_DIR": str(tmp)}
        env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log,
                                         start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self, timeout: float = 5.0) -> dict:
        return client.query(self.service, "status", self.control, timeout=timeout)["status"]

    def serving(self) -> dict | None:
        """The status once a primary and a standby head each have 12 active workers and both addresses answer."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"run exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            st = self.status(timeout=2)
        except (SupervisorUnavailable, ProtocolError, OSError):
            return None
        heads = {i["pid"]: i["role"] for i in st["instances"] if i["parent"] is None and i["state"] == "active"}
        workers = [i for i in st["instances"] if i["parent"] in heads and i["state"] == "active"]
        if sorted(heads.values()) != ["primary", "standby"] or len(workers) != 2 * WORKERS:
            return None
        if any(exchange(HOST, p, timeout=2)[0] != "ok" for p in self.ports):
            return None
        return st

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        stop_process_group(self.proc, signal.SIGKILL, 5)
        return self.proc.returncode


def _poll_status(run: WorkerScopeRun, stop: threading.Event, deadline: float, out: Latencies,
                 sizes: list[tuple[int, int]]) -> None:
    """`status` over a new connection every 0.2 s: its round trip, its size in bytes and its instances."""
    while not stop.is_set() and time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            st = run.status(timeout=5)
            out.seconds.append(time.perf_counter() - t0)
            sizes.append((len(protocol._dump({"ok": True, "status": st})), len(st["instances"])))
        except (SupervisorUnavailable, ProtocolError, OSError) as exc:
            out.unanswered.append(f"{type(exc).__name__}: {exc}")
        stop.wait(0.2)


def test_worker_scope_rolling_reload_of_12_workers_on_2_addresses(short_tmp: Path, pin_root: Path) -> None:
    """The reload's status (2 addresses x 2 instances x 12 workers) takes more than one message:
    the supervisor chunks it, and neither it nor `run` nor the reload fails."""
    t_start = time.monotonic()
    run = WorkerScopeRun(short_tmp, pin_root)
    stop = threading.Event()
    poller: threading.Thread | None = None
    try:
        before = wait_for(run.serving, 40, 0.2, what=f"run to serve with {WORKERS} workers\n{run.log()[-2000:]}")
        sup_pid = before["supervisor"]["pid"]
        assert len(_processes_of_service(run.service)) >= 2 * (WORKERS + 1), "the leftover check would see nothing"
        old_heads = {i["pid"] for i in before["instances"] if i["parent"] is None}
        latencies, sizes = Latencies(), []
        loads = [Load(HOST, p, concurrency=2, duration=60, max_requests=30_000).start() for p in run.ports]
        try:
            time.sleep(0.3)
            poller = threading.Thread(target=_poll_status, args=(run, stop, time.monotonic() + 60, latencies, sizes),
                                      daemon=True)
            poller.start()
            t0 = time.monotonic()
            reload = subprocess.run([sys.executable, "-m", "reuseport_standby", "reload", "--service", run.service,
                                     "--control", run.control, "--timeout", "50"], cwd=REPO, capture_output=True,
                                    text=True, timeout=60)
            reload_seconds = time.monotonic() - t0
            time.sleep(0.3)
        finally:
            stop.set()
            if poller is not None:
                poller.join(10)
            results = [load.stop() for load in loads]
        after = run.status()
        print(f"\nworker-scope reload ({WORKERS} workers, 2 addresses) took {reload_seconds:.1f} s: "
              f"{reload.stdout.strip() or reload.stderr.strip()[-300:]}\n  status during the reload: {latencies}; "
              f"largest {max(sizes, default=(0, 0))[0]} bytes ({max((n for _, n in sizes), default=0)} instances, "
              f"message limit {protocol.MAX_MESSAGE})\n  "
              + "\n  ".join(f"load on :{p}: {r.summary()}" for p, r in zip(run.ports, results)))

        assert reload.returncode == 0, f"{reload.stdout}{reload.stderr}\n{run.log()[-3000:]}"
        assert after["supervisor"]["pid"] == sup_pid, f"the supervisor was restarted:\n{run.log()[-3000:]}"
        assert "restarting it" not in run.log()
        new_heads = {i["pid"] for i in after["instances"] if i["parent"] is None and i["state"] == "active"}
        assert len(new_heads) == 2 and not new_heads & old_heads, after["instances"]
        assert latencies.unanswered == [], latencies
        assert latencies.max < MAX_STATUS_LATENCY, latencies
        assert max(size for size, _ in sizes) > protocol.MAX_MESSAGE, "the reload's status never needed chunks"
        for r in results:
            assert r.failed == 0, r.failures
            assert r.ok > 50, r.summary()
    finally:
        stop.set()
        code = run.stop()
    assert code == 0, run.log()[-3000:]
    wait_for(lambda: not _processes_of_service(run.service), 10, 0.1,
             what=f"the instances of {run.service} to be gone: {_processes_of_service(run.service)}")
    print(f"  run stopped with {code}; nothing of it left running; the whole test took "
          f"{time.monotonic() - t_start:.1f} s")


# -- 3. the runner's reload socket answers every request, however long the answer -------------------------

@pytest.fixture
def reload_socket(short_tmp: Path):
    """A Runner's reload socket alone (no supervisor, no instances, no root), served by a bounded thread.

    Yields the runner (tests replace its ``reload``) and the control path ``request_reload`` is given."""
    from reuseport_standby import runner as runner_mod

    control = str(short_tmp / "r.sock")
    runner = runner_mod.Runner.__new__(runner_mod.Runner)
    runner.run_path = runner_mod.run_socket_path(control)
    runner._server = protocol.listen_unix(runner.run_path, "test runner", backlog=8)
    stop = threading.Event()

    def serve() -> None:
        import select

        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            if not select.select([runner._server], [], [], 0.05)[0]:
                continue
            try:
                conn, _ = runner._server.accept()
            except BlockingIOError:
                continue
            runner._serve_request(conn)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield runner, control
    stop.set()
    t.join(5)
    runner._server.close()


def test_a_reload_reply_longer_than_one_message_reaches_reload(reload_socket) -> None:
    """It went out with protocol.send, which refuses more than MAX_MESSAGE: the thread died and
    `reload` heard "closed the control connection", not the outcome."""
    from reuseport_standby.run_client import request_reload
    from reuseport_standby.runner import InstanceFailed

    runner, control = reload_socket
    big = {"ok": True, "replaced": [{"role": "standby", "pid": 1, "generation": 3}] * 2000, "seconds": 1.5}
    assert len(protocol._dump(big)) > 3 * protocol.MAX_MESSAGE
    runner.reload = lambda **_: big
    assert request_reload("svc", control, timeout=10) == {"v": protocol.VERSION, **big}

    why = "new primary (pid 42) exited with status 1 before it was ready: " + "Traceback line\n" * 3000
    runner.reload = lambda **_: (_ for _ in ()).throw(InstanceFailed(why))
    with pytest.raises(ProtocolError) as err:
        request_reload("svc", control, timeout=10)
    assert err.value.code == "rolled_back" and str(err.value) == str(InstanceFailed(why))  # whole, with its pointer


def test_the_reload_socket_answers_what_it_cannot_use(reload_socket) -> None:
    """A request that is not a JSON object, too long, or a reload that fails unexpectedly: an error
    reply each (it used to end the thread with no reply)."""
    from reuseport_standby.run_client import request_reload, run_socket_path

    runner, control = reload_socket

    def ask(data: bytes) -> dict:
        with connect(run_socket_path(control)) as s:
            s.sendall(data)
            s.settimeout(10)
            raw, _, _ = protocol.recv(s)
            return json.loads(protocol.join_reply(raw, lambda: protocol.recv(s)[0]))

    assert ask(b"[1, 2]")["error"] == "unknown_op"
    assert ask(b"\xff not json")["error"] == "malformed"
    assert ask(b"{" + b" " * (protocol.MAX_MESSAGE + 10) + b"}")["error"] == "too_large"
    bad_plan = ask(json.dumps({"op": "reload", "canary": {"weights": [50, 10], "step_seconds": 1e9}}).encode())
    assert bad_plan["error"] == "bad_request" and "increase" in bad_plan["message"]
    assert ask(b'{"op": "reload", "health_path": "../etc"}')["error"] == "bad_request"

    def broken(**_: object) -> dict:
        raise KeyError("primary")

    runner.reload = broken
    with pytest.raises(ProtocolError) as err:
        request_reload("svc", control, timeout=10)
    assert err.value.code == "internal" and "KeyError" in str(err.value)
    runner.reload = lambda **_: {"ok": True, "not json": {1, 2}}
    with pytest.raises(ProtocolError) as err:
        request_reload("svc", control, timeout=10)
    assert err.value.code == "internal" and "could not be encoded" in str(err.value)
