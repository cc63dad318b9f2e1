"""``reuseport-standby demo --bad-version``: a bad deploy rolled back by itself, then a good one promoted.

The bundled app, under ``run``, reads its version from a file at import, as
new code on disk would be.  Under load, the demo deploys v2, which answers
500 to one request in five, with ``reload --canary``: v2 gets its share of
the first step, fails it, and is rolled back while v1 serves on.  Then it
deploys v3, a good version, which goes through the steps and is promoted.
The PNG timeline shows who answered each 100 ms: v2's share and its errors
during its one step, and v3 taking over.  Exits 0 when no connection failed,
v2 was rolled back and v3 promoted.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .demo import PICTURE_HINT, WithStandby, can_draw, free_port, say
from .demo_app import VERSION_FILE
from .errors import ReuseportStandbyError
from .kernel.pins import DEFAULT_PIN_ROOT, remove_tree
from .loadgen import Load, LoadResult
from .run_client import CanaryFailed, request_reload

VERSIONS = (("v1", "v1 (old)", "#2f6db5"), ("v2", "v2 (bad: 500 to 1 in 5)", "#d98c1f"),
            ("v3", "v3 (good)", "#3a9a4a"))


def demo_canary(step: float = 4.0, server: str = "gunicorn", concurrency: int = 16, out: Path | None = None) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="rs-demo-"))
    tmp.chmod(0o755)
    version = tmp / "version"
    version.write_text("v1 good")
    version.chmod(0o644)
    port = free_port()
    plan = {"weights": [10, 50], "step_seconds": step, "min_requests": 20, "max_error_rate": 0.01,
            "max_latency_ratio": 3.0}
    run = WithStandby(server, port, tmp, env={VERSION_FILE: str(version)})
    marks: list[tuple[float, str]] = []
    outcome: dict[str, Any] = {}
    drawing = can_draw()
    try:
        say(f"reuseport-standby canary: {server} on 127.0.0.1:{port}; load: {concurrency} clients, a new "
            f"connection per request; canary steps {plan['weights']} % of {step:g} s each")
        if not drawing:
            say(f"no matplotlib: the results as a table only; {PICTURE_HINT}")
        run.wait_ready()
        load = Load("127.0.0.1", port, concurrency=concurrency, duration=20 * step + 120, record_events=True,
                    max_requests=10_000_000).start()

        def deploy(name: str, mode: str) -> None:
            version.write_text(f"{name} {mode}")
            at = time.monotonic() - load._start
            marks.append((at, f"reload --canary ({name})"))
            say(f"  {at:5.1f} s  deploy {name} ({mode}) with reload --canary")

            def progress(event: dict[str, Any]) -> None:
                t = time.monotonic() - load._start
                say(f"  {t:5.1f} s    {event.get('progress')}")
                if event.get("step") in ("rolled_back", "promoted"):
                    marks.append((t, event["step"].replace("_", " ")))

            try:
                result = request_reload(run.service, run.control, timeout=30 * step + 120, progress=progress,
                                        options={"canary": plan})
                outcome[name] = "promoted" if any(r.get("promoted") for r in result["replaced"]) else "replaced"
            except CanaryFailed as exc:
                outcome[name] = "rolled back"
                say(f"           reload exited 1: {exc}")

        time.sleep(step)
        deploy("v2", "bad")
        time.sleep(step)
        deploy("v3", "good")
        time.sleep(step)
        result = load.stop()
    finally:
        run.stop()
        remove_tree(Path(DEFAULT_PIN_ROOT) / run.service)
    png = out or Path(tempfile.gettempdir()) / "reuseport-standby-demo-canary.png"
    connection_failures = _report(result, outcome)
    if drawing:
        from .timeline import draw

        try:
            draw(result.events, marks, png, f"canary reload, {server}: v2 rolled back by itself, v3 promoted",
                 groups=VERSIONS)
            print(f"timeline: {png}")
        except ImportError:
            drawing = False
    if not drawing:
        print(f"no timeline picture: {PICTURE_HINT}")
    if connection_failures or outcome != {"v2": "rolled back", "v3": "promoted"}:
        raise ReuseportStandbyError(f"the canary demo did not go as it should: {outcome}, {connection_failures} "
                                    f"connections failed; the log of run is {run.log.name}", see="the-demo-fails")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _report(result: LoadResult, outcome: dict[str, str]) -> int:
    by_version: dict[str, list[int]] = {}
    for _, kind, who in result.events:
        ok_err = by_version.setdefault(who or "?", [0, 0])
        if kind == "ok":
            ok_err[0] += 1
        elif kind.startswith("http_"):
            ok_err[1] += 1
    failed = sum(v for k, v in result.failures.items() if not k.startswith("http_"))
    print()
    for name, label, _ in VERSIONS:
        ok, err = by_version.get(name, [0, 0])
        print(f"  {label:<26} {ok + err:6d} answered, {err:4d} error responses"
              + (f"  -> {outcome[name]}" if name in outcome else ""))
    print(f"  {'connections failed':<26} {failed:6d}")
    print()
    print("THE BAD VERSION WAS ROLLED BACK BY ITSELF; NO CONNECTION FAILED" if failed == 0 and
          outcome.get("v2") == "rolled back" else f"{failed} CONNECTIONS FAILED; outcome {outcome}")
    return failed
