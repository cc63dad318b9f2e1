"""`reuseport-standby run`, `reload` and `demo` as a user runs them: real processes, real load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import free_port
from helpers.procs import REPO, wait_for
from reuseport_standby import client
from reuseport_standby.errors import ProtocolError, SupervisorUnavailable
from reuseport_standby.loadgen import Load
from reuseport_standby.runner import request_reload

APPS = Path(__file__).parent / "apps"


class Run:
    def __init__(self, tmp: Path, pin_root: Path, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.service = f"r{uuid.uuid4().hex[:8]}"
        self.control = str(tmp / f"{self.service}.sock")
        self.port = free_port()
        self.log_path = tmp / f"{self.service}.log"
        full = [sys.executable, "-m", "reuseport_standby", "run", "--service", self.service,
                "--bind", f"127.0.0.1:{self.port}", "--control", self.control, "--pin-root", str(pin_root),
                "--ready-timeout", "20", "--", *cmd]
        e = {**os.environ, "PYTHONPATH": str(APPS), **(env or {})}
        e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}"
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
        return {i["role"]: i["pid"] for i in self.instances() if i["state"] == "active"}

    def wait_both(self, timeout: float = 60) -> dict[str, int]:
        def both() -> dict[str, int] | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"run exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            a = self.active()
            return a if set(a) == {"primary", "standby"} and len(self.instances()) == 2 else None
        return wait_for(both, timeout, 0.1, what=f"primary and standby active\n{self.log()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


GUNICORN = ["gunicorn", "-w", "2", "--graceful-timeout", "5", "versioned_app:app"]
UVICORN = ["uvicorn", "--workers", "2", "--timeout-graceful-shutdown", "5", "versioned_app:asgi_app"]


@pytest.mark.parametrize("cmd", [GUNICORN, UVICORN], ids=["gunicorn", "uvicorn"])
def test_rolling_reloads_under_load_lose_nothing(short_tmp: Path, pin_root: Path, cmd: list[str]) -> None:
    run = Run(short_tmp, pin_root, cmd)
    try:
        before = run.wait_both()
        pids = [before]
        with Load("127.0.0.1", run.port, concurrency=8, duration=300) as load:
            for _ in range(5):
                result = request_reload(run.service, run.control, timeout=120)
                assert [r["role"] for r in result["replaced"]] == ["standby", "primary"]
                pids.append(run.wait_both())
            load.stop()
        r = load.result
        print(f"\n{cmd[0]}: 5 rolling reloads: {r.summary()}")
        assert r.failed == 0, r.failures
        assert r.ok > 500
        assert r.max_latency < 1.0, "a SYN was retransmitted"
        assert len({p["primary"] for p in pids}) == 6 and len({p["standby"] for p in pids}) == 6
    finally:
        run.stop()


def test_broken_new_version_is_rolled_back(short_tmp: Path, pin_root: Path) -> None:
    flag = short_tmp / "broken"
    run = Run(short_tmp, pin_root, GUNICORN, env={"RS_TEST_BROKEN_FLAG": str(flag)})
    try:
        before = run.wait_both()
        with Load("127.0.0.1", run.port, concurrency=4, duration=120) as load:
            flag.touch()
            with pytest.raises(ProtocolError) as err:
                request_reload(run.service, run.control, timeout=120)
            assert err.value.code == "rolled_back" and "exited with status" in str(err.value)
            assert run.active() == before, "the old instances keep serving"
            flag.unlink()
            request_reload(run.service, run.control, timeout=120)
            after = run.wait_both()
            load.stop()
        assert after["primary"] != before["primary"]
        assert load.result.failed == 0, load.result.failures
    finally:
        run.stop()


def test_killing_runs_children_one_by_one_loses_nothing(short_tmp: Path, pin_root: Path) -> None:
    run = Run(short_tmp, pin_root, GUNICORN)
    try:
        run.wait_both()
        sup_pid = int(subprocess.check_output(["pgrep", "-f", f"supervise --service {run.service}"]).split()[0])
        with Load("127.0.0.1", run.port, concurrency=8, duration=120) as load:
            os.kill(sup_pid, signal.SIGKILL)
            wait_for(lambda: run.active() and len(run.instances()) == 2, 30, 0.1, what="supervisor back")
            for role in ("primary", "standby", "primary"):
                os.kill(run.active()[role], signal.SIGKILL)
                time.sleep(0.3)
                run.wait_both()
            time.sleep(0.5)
            load.stop()
        print(f"\nkilled supervisor, primary, standby, primary: {load.result.summary()}")
        assert load.result.failed == 0, load.result.failures
    finally:
        run.stop()
    assert "restarting it" in run.log()


def test_crash_loop_is_reported(short_tmp: Path, pin_root: Path) -> None:
    flag = short_tmp / "broken"
    flag.touch()
    run = Run(short_tmp, pin_root, GUNICORN, env={"RS_TEST_BROKEN_FLAG": str(flag)})
    try:
        wait_for(lambda: "crash-looping" in run.log(), 60, 0.2, what="crash loop report")
        flag.unlink()
        run.wait_both(timeout=90)  # recovers once the app imports again
    finally:
        run.stop()


def test_sigterm_stops_everything(short_tmp: Path, pin_root: Path) -> None:
    run = Run(short_tmp, pin_root, GUNICORN)
    run.wait_both()
    pids = list(run.active().values())
    run.stop()
    assert run.proc.returncode == 0, run.log()[-2000:]
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    assert not Path(run.control).exists()


def test_demo_exits_0_and_draws(tmp_path: Path, kernel: None) -> None:
    png = tmp_path / "demo.png"
    r = subprocess.run([sys.executable, "-m", "reuseport_standby", "demo", "--duration", "8", "--out", str(png)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "NOTHING FAILED" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_baseline_shows_failures(tmp_path: Path, kernel: None) -> None:
    png = tmp_path / "baseline.png"
    r = subprocess.run([sys.executable, "-m", "reuseport_standby", "demo", "--baseline", "--duration", "8", "--out", str(png)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    print(r.stdout)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "REQUESTS FAILED" in r.stdout
    assert png.exists()


def test_users_own_gunicorn_config_keeps_working(short_tmp: Path, pin_root: Path) -> None:
    """`run -- gunicorn -c their.conf.py ...`: their settings and hooks apply, ours are composed in."""
    marker = short_tmp / "hook-ran"
    conf = short_tmp / "their.conf.py"
    conf.write_text(
        "import pathlib\n"
        "workers = 3\n"
        "bind = '0.0.0.0:1'  # ignored under run: the supervisor owns the addresses\n"
        f"def post_worker_init(worker):\n    with open({str(marker)!r}, 'a') as f:\n        f.write(f'{{worker.pid}}\\n')\n"
    )
    run = Run(short_tmp, pin_root, ["gunicorn", "-c", str(conf), "versioned_app:app"])
    try:
        pids = run.wait_both()
        assert len(marker.read_text().split()) >= 1, "their post_worker_init ran in the workers"
        # The instance is ready when its first worker is; gunicorn forks the rest without waiting.
        def children() -> list[bytes]:
            r = subprocess.run(["pgrep", "-P", str(pids["primary"])], capture_output=True)
            return r.stdout.split()
        wait_for(lambda: len(children()) >= 3, timeout=30, what="3 gunicorn workers")
        assert len(children()) == 3, "their workers = 3 applies, not ours"
        with Load("127.0.0.1", run.port, concurrency=4, duration=120) as load:
            request_reload(run.service, run.control, timeout=120)
            run.wait_both()
            load.stop()
        assert load.result.failed == 0 and load.result.ok > 0
    finally:
        run.stop()
