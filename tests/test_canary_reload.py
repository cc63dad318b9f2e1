"""`reload --canary` end to end: `run` with real gunicorn/uvicorn, real clients, a new version on disk.

Each test writes the version file the app reads at import (as a deploy puts new code on disk), asks
for a canary reload under load, and checks what the clients saw: which version answered, when, and
that no connection failed.  The contrast (a bad version without the canary) is the plain reload,
whose clients see the bad version's errors for as long as it serves.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from helpers.procs import wait_for
from helpers.runs import Run
from reuseport_standby.errors import ReuseportStandbyError
from reuseport_standby.loadgen import Load, LoadResult
from reuseport_standby.run_client import CanaryFailed, request_reload

GUNICORN = ["gunicorn", "-w", "2", "--graceful-timeout", "5", "canary_app:app"]
UVICORN = ["uvicorn", "--workers", "2", "--timeout-graceful-shutdown", "5", "canary_app:asgi_app"]
SERVERS = pytest.mark.parametrize("cmd", [GUNICORN, UVICORN], ids=["gunicorn", "uvicorn"])
STEP = 4.0
CANARY = {"weights": [10, 50], "step_seconds": STEP, "min_requests": 20, "max_error_rate": 0.01,
          "max_latency_ratio": 2.0}


class Steps:
    """The reload's progress events with the monotonic time each arrived."""

    def __init__(self) -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.events.append((time.monotonic(), event))

    def at(self, step: str) -> list[float]:
        return [t for t, e in self.events if e.get("step") == step]

    def text(self) -> str:
        return "\n".join(f"{t:.2f} {e.get('progress')}" for t, e in self.events)


def start(tmp: Path, pin_root: Path, cmd: list[str], first: str = "v1 good", env: dict[str, str] | None = None,
          args: tuple[str, ...] = ()) -> tuple[Run, Path]:
    version = tmp / "version"
    version.write_text(first)
    run = Run(tmp, pin_root, cmd, env={"RS_TEST_VERSION_FILE": str(version), **(env or {})}, args=args)
    return run, version


def settled(run: Run, version: Path) -> dict[str, int]:
    """Both instances active and all four of their workers past importing the app: a worker that imports
    it after the test wrote the next version would serve that version from an old instance."""
    active = run.wait_both()
    imports = Path(f"{version}.imports")
    wait_for(lambda: imports.exists() and len(imports.read_text().split("\n")) > 4, 30, 0.1,
             what=f"the four workers to import the app\n{run.log()[-2000:]}")
    return active


def answered_by(result: LoadResult, load: Load) -> list[tuple[float, str, str]]:
    """(monotonic time, outcome, version) of every request."""
    return [(load._start + t, kind, who) for t, kind, who in result.events]


def connection_failures(result: LoadResult) -> dict[str, int]:
    return {k: v for k, v in result.failures.items() if not k.startswith("http_")}


def canary_reload(run: Run, steps: Steps, **plan: Any) -> dict[str, Any]:
    return request_reload(run.service, run.control, timeout=180, progress=steps,
                          options={"canary": {**CANARY, **plan}})


@SERVERS
def test_a_good_version_is_promoted_through_the_steps(short_tmp: Path, pin_root: Path, cmd: list[str]) -> None:
    run, version = start(short_tmp, pin_root, cmd)
    try:
        before = settled(run, version)
        steps = Steps()
        with Load("127.0.0.1", run.port, concurrency=4, duration=120, record_events=True) as load:
            time.sleep(1)
            version.write_text("v2 good")
            result = canary_reload(run, steps)
            after = run.wait_both()
            time.sleep(1)
            load.stop()
        r = load.result
        print(f"\n{cmd[0]}: {r.summary()}\n{steps.text()}")
        assert [v["passed"] for v in result["canary"]["verdicts"]] == [True, True]
        assert result["replaced"][0] == {**result["replaced"][0], "role": "primary", "promoted": True}
        assert [x["role"] for x in result["replaced"]] == ["primary", "standby"]
        assert after["primary"] == result["replaced"][0]["pid"] and after["primary"] not in before.values()
        assert after["standby"] not in before.values()
        assert r.failed == 0, r.failures
        seen = answered_by(r, load)
        promoted = steps.at("promoted")[0]
        assert {who for t, _, who in seen if t > promoted + 0.5} == {"v2"}
        first_step = steps.at("weight")[0]
        share = [who for t, _, who in seen if first_step + 1 < t < first_step + STEP]
        assert 0.03 < share.count("v2") / len(share) < 0.25, "the first step's share is about 10 %"
    finally:
        run.stop_and_check_nothing_left()


@pytest.mark.parametrize("cmd, scope", [(GUNICORN, "instance"), (UVICORN, "instance"), (GUNICORN, "worker")],
                         ids=["gunicorn", "uvicorn", "gunicorn-worker-scope"])
def test_a_version_answering_500_is_rolled_back_at_the_first_step(short_tmp: Path, pin_root: Path,
                                                                  cmd: list[str], scope: str) -> None:
    """In worker scope the old standby's workers are drained with it (by its pid) and undrained after."""
    run, version = start(short_tmp, pin_root, cmd, env={"REUSEPORT_STANDBY_SCOPE": scope})
    try:
        before = settled(run, version)
        steps = Steps()
        with Load("127.0.0.1", run.port, concurrency=4, duration=120, record_events=True) as load:
            time.sleep(1)
            version.write_text("v2 bad500")
            with pytest.raises(CanaryFailed) as failed:
                canary_reload(run, steps)
            wait_for(lambda: run.active() == before, 15, 0.1, what=f"the old version serving: {run.instances()}")
            assert not [i for i in run.instances() if i["state"] == "drained"], "the old standby is undrained"
            time.sleep(1)
            load.stop()
        r = load.result
        print(f"\n{cmd[0]}: {r.summary()}\n{steps.text()}\n{failed.value}")
        verdicts = failed.value.fields["canary"]["verdicts"]
        assert len(verdicts) == 1 and verdicts[0]["weight"] == 10 and not verdicts[0]["passed"]
        assert "error rate" in str(failed.value) and "rolled back" in str(failed.value)
        assert connection_failures(r) == {}, r.failures
        seen = answered_by(r, load)
        errors = [(t, who) for t, kind, who in seen if kind == "http_500"]
        assert errors and {who for _, who in errors} == {"v2"}, "only the new version fails"
        began, ended = steps.at("weight")[0], steps.at("rolled_back")[0]
        assert all(began - 0.2 < t < ended + 0.5 for t, _ in errors), "and only during its step"
        assert {who for t, _, who in seen if t > ended + 1} == {"v1"}
        assert len(errors) < 0.3 * sum(1 for t, _, _ in seen if began < t < ended), "a share, not all"
    finally:
        run.stop_and_check_nothing_left()


def test_without_the_canary_the_bad_version_fails_for_as_long_as_it_serves(short_tmp: Path,
                                                                          pin_root: Path) -> None:
    """The contrast: a plain reload puts the same bad version in front of every client."""
    run, version = start(short_tmp, pin_root, GUNICORN)
    try:
        settled(run, version)
        with Load("127.0.0.1", run.port, concurrency=4, duration=120, record_events=True) as load:
            version.write_text("v2 bad500")
            request_reload(run.service, run.control, timeout=120)
            run.wait_both()
            time.sleep(3)
            load.stop()
        r = load.result
        print(f"\nplain reload of a bad version: {r.summary()}")
        assert r.failures.get("http_500", 0) > 50
        assert connection_failures(r) == {}
    finally:
        run.stop_and_check_nothing_left()


def test_a_three_times_slower_version_is_rolled_back(short_tmp: Path, pin_root: Path) -> None:
    run, version = start(short_tmp, pin_root, GUNICORN)
    try:
        before = settled(run, version)
        steps = Steps()
        with Load("127.0.0.1", run.port, concurrency=4, duration=120, record_events=True) as load:
            version.write_text("v2 slow")
            with pytest.raises(CanaryFailed) as failed:
                canary_reload(run, steps)
            wait_for(lambda: run.active() == before, 15, 0.1, what=f"the old version serving: {run.instances()}")
            load.stop()
        print(f"\n{load.result.summary()}\n{steps.text()}")
        assert "p99 latency" in str(failed.value)
        assert load.result.failed == 0, load.result.failures
    finally:
        run.stop_and_check_nothing_left()


@SERVERS
def test_a_version_whose_health_check_fails_never_gets_traffic(short_tmp: Path, pin_root: Path,
                                                                cmd: list[str]) -> None:
    run, version = start(short_tmp, pin_root, cmd, args=("--ready-timeout", "8"))
    try:
        before = settled(run, version)
        steps = Steps()
        with Load("127.0.0.1", run.port, concurrency=4, duration=120, record_events=True) as load:
            version.write_text("v2 unhealthy")
            with pytest.raises(Exception) as failed:
                request_reload(run.service, run.control, timeout=120, progress=steps,
                               options={"canary": CANARY, "health_path": "/healthz"})
            wait_for(lambda: run.active() == before, 15, 0.1, what=f"the old version serving: {run.instances()}")
            load.stop()
        r = load.result
        print(f"\n{cmd[0]}: {r.summary()}\n{steps.text()}\n{failed.value}")
        assert "not ready within 8 s (no 2xx from its workers' GET /healthz" in str(failed.value)
        assert "rolled back" in str(failed.value)
        assert steps.at("weight") == []
        assert r.failed == 0, r.failures
        v2 = [(round(t - load._start, 2), kind) for t, kind, who in answered_by(r, load) if who != "v1"]
        assert not v2, f"answered by the new version: {v2[:20]}\n{run.log()[-6000:]}"
    finally:
        run.stop_and_check_nothing_left()


def test_a_peer_posing_as_a_worker_of_the_canary_cannot_fail_it(short_tmp: Path, pin_root: Path) -> None:
    """Any member of the control socket's group may say hello with ``parent`` = the new version's pid and
    heartbeat 500s.  Only workers the kernel shows to be that process's children count, so the good
    version is promoted all the same (without the check this test sees the canary rolled back)."""
    from reuseport_standby import client
    from reuseport_standby.outcomes import Outcomes

    run, version = start(short_tmp, pin_root, GUNICORN)
    fake: list[Any] = []

    def pose(event: dict[str, Any]) -> None:
        steps(event)
        if event.get("step") != "started":
            return
        conn = client.connect(run.control)
        reply, socks = client.request(conn, {"op": "hello", "role": "standby", "pid": os.getpid(),
                                             "parent": event["pid"], "name": "gunicorn worker 1"})
        for s in socks:
            s.close()
        fake.append(conn)

        def beat() -> None:  # 500s that keep coming, so that every step's window sees them grow
            bad = Outcomes()
            for _ in range(100):  # at most 30 s
                bad.counts["5xx"] += 100
                bad.latency[-1] += 100
                try:
                    client.request(conn, {"op": "heartbeat", "outcomes": bad.to_wire()})
                except (OSError, ReuseportStandbyError):
                    return
                time.sleep(0.3)

        threading.Thread(target=beat, daemon=True).start()

    try:
        settled(run, version)
        steps = Steps()
        with Load("127.0.0.1", run.port, concurrency=4, duration=120, record_events=True) as load:
            version.write_text("v2 good")
            result = request_reload(run.service, run.control, timeout=180, progress=pose,
                                    options={"canary": CANARY})
            load.stop()
        print(f"\n{load.result.summary()}\n{steps.text()}")
        assert fake, "the fake worker said hello"
        entry = [i for i in client.query(run.service, "status", run.control)["status"]["instances"]
                 if i["pid"] == os.getpid()]
        assert entry and entry[0]["parent_checked"] is False and entry[0]["requests"]["5xx"] >= 1000
        assert [v["passed"] for v in result["canary"]["verdicts"]] == [True, True]
        assert load.result.failed == 0, load.result.failures
    finally:
        for conn in fake:
            conn.close()
        run.stop_and_check_nothing_left()
