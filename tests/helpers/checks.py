"""What a fault may cost: the assertions shared by the gunicorn, uvicorn and worker-scope tests."""

from __future__ import annotations

from .servers import TracedReport

MAX_LATENCY = 1.0  # a SYN retransmit costs 1 s: anything below means none was dropped
GUNICORN_CONCURRENCY = 8
# Requests a SIGKILLed gunicorn primary can hold inside its workers (the rest wait in the
# listener's queue, which migrates): one per sync worker, worker_connections per
# gthread worker, and for asyncio as many as the clients send.
HELD_BY_WORKERS = {"sync": 2, "gthread": 4, "uvicorn": GUNICORN_CONCURRENCY}
IN_FLIGHT_KINDS = {"reset", "eof", "truncated"}  # what a request inside a SIGKILLed process sees


def check_faults(report: TracedReport, held: int) -> None:
    """No failure outside SIGKILLs; at a SIGKILL, only requests already sent, at most ``held``."""
    assert report.failures_of(None) == [], f"failures before any fault: {report}"
    for step in report.steps:
        if step.kind in ("kill", "kill_workers"):
            assert report.after_signal(step) == [], f"requests sent after a {step.kind} failed: {report}"
            assert len(report.in_flight(step)) <= held, f"more failed at a {step.kind} than workers held: {report}"
        else:
            assert report.failures_of(step) == [], f"requests failed at a {step.kind}: {report}"
    assert report.load.max_latency < MAX_LATENCY, f"a request waited {report.load.max_latency:.2f} s: {report}"
    assert report.load.ok > 50 * len(report.steps), f"too little load to mean anything: {report}"


def check_traced(report: TracedReport, *, concurrency: int) -> dict[str, list[int]]:
    """Nothing lost but what a SIGKILLed process held; returns failures per step kind."""
    assert report.failures_of(None) == [], f"failures before the first restart: {report}"
    for step in report.steps:
        failed = report.failures_of(step)
        if step.kind in ("kill", "freeze_kill"):
            assert report.after_signal(step) == [], f"requests sent after the kill failed: {report}"
            assert len(failed) <= concurrency, f"more failures than requests in flight: {report}"
            assert {kind for _, _, kind in failed} <= IN_FLIGHT_KINDS, report
        else:
            assert failed == [], f"{step.kind} restart lost requests: {report}"
    assert report.load.max_latency < MAX_LATENCY, f"a request took {report.load.max_latency:.2f} s (SYN retransmit?): {report}"
    assert report.load.ok > 50 * len(report.steps), f"too little load to mean anything: {report}"
    return report.by_kind()
