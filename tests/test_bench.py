"""bench/restarts.py end to end, tiny: two contenders, two restarts each; checks the shape of what it writes.

No timing or failure-count assertions: the machine is shared, and the
numbers are the benchmark's to report, not this test's to judge.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from helpers.procs import REPO

PER_RUN_KEYS = {
    "variant", "restarts", "steps", "error", "requests", "ok", "failed", "failures_by_kind", "lost_connection_level",
    "failed_on_reused_keepalive", "lost_in_worker", "lost_in_worker_in_app", "lost_never_reached_app",
    "by_restart_kind", "latency_ms", "throughput_rps", "share", "nstat", "timeline", "bpf_prog", "program_counters",
    "check_answered_not_in_app", "check_answered_accept_not_recorded",
}
NSTAT_KEYS = {"TcpExtListenDrops", "TcpExtListenOverflows", "TcpExtTCPMigrateReqSuccess", "TcpExtTCPMigrateReqFailure"}


def test_restarts_bench_writes_json_markdown_and_chart(tmp_path: Path, kernel: None) -> None:
    cmd = [sys.executable, str(REPO / "bench" / "restarts.py"), "--contenders", "reuseport-standby,plain-reuseport",
           "--restarts", "2", "--keepalive-restarts", "1", "--period", "1", "--settle", "0.5", "--tail", "0.5",
           "--concurrency", "8", "--overhead-rounds", "1", "--overhead-seconds", "1", "--bpf-connections", "50",
           "--out", str(tmp_path), "--max-minutes", "3"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((tmp_path / "restarts-gunicorn.json").read_text())
    shutil.rmtree(results["meta"]["logs"], ignore_errors=True)

    meta = results["meta"]
    assert meta["server"] == "gunicorn" and meta["contenders"] == ["reuseport-standby", "plain-reuseport"]
    assert meta["kernel"] and meta["cpus"] >= 1 and not meta.get("interrupted")
    assert set(results["contenders"]) == {"reuseport-standby", "plain-reuseport"}
    for key, entry in results["contenders"].items():
        assert "error" not in entry, entry.get("error")
        assert set(entry["variants"]) == {"new-connection", "keep-alive"}
        for variant, run in entry["variants"].items():
            assert PER_RUN_KEYS <= set(run), PER_RUN_KEYS - set(run)
            assert run["error"] is None
            assert run["restarts"] == (2 if variant == "new-connection" else 1)
            assert [s["kind"] for s in run["steps"]] == ["term", "kill"][:run["restarts"]]
            assert run["requests"] == run["ok"] + run["failed"] and run["ok"] > 0
            assert run["failed"] == (run["lost_connection_level"] + run["failed_on_reused_keepalive"]
                                     + run["lost_in_worker"])
            assert run["failed"] == sum(run["failures_by_kind"].values())
            assert set(run["latency_ms"]) == {"p50", "p99", "p99_9", "max"}
            assert NSTAT_KEYS <= set(run["nstat"])
            assert "primary" in run["share"]
            tl = run["timeline"]
            assert len(tl["ok"]) == len(tl["failed"]) == len(tl["p99_ms"]) == len(tl["max_ms"]) > 0
            assert sum(tl["ok"]) == run["ok"]
        if key == "reuseport-standby":
            assert entry["mode"] == "select_or_migrate"
            assert entry["variants"]["new-connection"]["bpf_prog"]["runs"] > 0
        else:
            assert entry["variants"]["new-connection"]["bpf_prog"] == {}

    ov = results["overhead"]
    for mode in ("alternating", "simultaneous"):
        assert {"ratio_median", "reuseport_standby_cpu_ms_per_request", "plain_cpu_ms_per_request",
                "cpu_ratio_median"} <= set(ov[mode])
    assert [(x["mode"], x["side"]) for x in ov["rounds"]] == [
        ("alternating", "reuseport-standby"), ("alternating", "plain"),
        ("simultaneous", "reuseport-standby"), ("simultaneous", "plain")]
    assert any(k.endswith("_ns") for k in results["bpf_cost"]["synthetic"])

    md = (tmp_path / "restarts-gunicorn.md").read_text()
    assert "| reuseport-standby | new-connection |" in md and "| plain-reuseport | keep-alive |" in md
    assert (tmp_path / "restarts-gunicorn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
