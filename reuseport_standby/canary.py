"""Judging a canary: the new version's outcomes over one step against the old version's.

Pure: the runner takes the snapshots (the supervisor's ``status``, fed by
the instances' heartbeats) and acts on the verdict; everything that decides
lives here, so that it is tested without a process.

A step fails when the new version's error rate (5xx, exceptions, no
response, over its requests) exceeds the old version's in the same window
by more than ``max_error_rate``, or its p99 latency exceeds
``max_latency_ratio`` times the old version's.  The old version's figures
come from the same window, so a backend outage that hurts both versions
fails neither; when the old version had too few requests in the window
(a weight near 100), its figures since the canary began stand in.  A step
that gave the new version fewer than ``min_requests`` requests is extended
up to ``max_step_seconds``; a quiet service that still has not sent enough
by then is not promoted on no evidence: the reload rolls back and says so
(``--min-requests 0`` judges whatever came).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .outcomes import Outcomes

#: p99s below this are compared as equal to it: a loopback request's 0.3 ms against 0.7 ms is noise, not a regression
LATENCY_FLOOR = 0.005


@dataclass(frozen=True)
class CanaryPlan:
    weights: tuple[int, ...]
    step_seconds: float = 30.0
    max_error_rate: float = 0.01
    max_latency_ratio: float = 2.0
    min_requests: int = 100
    #: a step waits at most this long for min_requests (default: 5 steps)
    max_step_seconds: float | None = None

    @property
    def step_limit(self) -> float:
        return self.max_step_seconds if self.max_step_seconds is not None else 5 * self.step_seconds

    def to_wire(self) -> dict[str, Any]:
        return asdict(self) | {"weights": list(self.weights)}

    @classmethod
    def from_wire(cls, msg: object) -> "CanaryPlan":
        """Check a reload request's ``canary`` object (ValueError saying what is wrong and what is allowed)."""
        if not isinstance(msg, dict):
            raise ValueError("'canary' must be an object")
        unknown = set(msg) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown canary settings {sorted(unknown)}")
        weights = msg.get("weights")
        if not isinstance(weights, list) or not 1 <= len(weights) <= 10 or any(
                isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= 100 for w in weights):
            raise ValueError(f"canary weights are 1 to 10 whole percentages from 1 to 100, got {weights!r}")
        if any(b <= a for a, b in zip(weights, weights[1:])):
            raise ValueError(f"canary weights must increase, got {','.join(map(str, weights))}")

        def number(name: str, lo: float, hi: float, default: Any) -> Any:
            v = msg.get(name, default)
            if v is None and default is None:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise ValueError(f"canary {name.replace('_', '-')} must be a number from {lo:g} to {hi:g}, got {v!r}")
            return v

        plan = cls(weights=tuple(weights),
                   step_seconds=float(number("step_seconds", 0.5, 86400, 30.0)),
                   max_error_rate=float(number("max_error_rate", 0, 1, 0.01)),
                   max_latency_ratio=float(number("max_latency_ratio", 1, 1000, 2.0)),
                   min_requests=int(number("min_requests", 0, 10**9, 100)),
                   max_step_seconds=number("max_step_seconds", 0.5, 7 * 86400, None))
        if isinstance(msg.get("min_requests", 0), float):
            raise ValueError("canary min-requests must be a whole number")
        if plan.max_step_seconds is not None and plan.max_step_seconds < plan.step_seconds:
            raise ValueError("canary max-step-seconds must be at least step-seconds")
        return plan


@dataclass
class Verdict:
    """One step's outcome.  ``passed`` None: not enough traffic yet to judge."""

    passed: bool | None
    reasons: list[str] = field(default_factory=list)
    new: dict[str, Any] = field(default_factory=dict)
    old: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": self.reasons, "new": self.new, "old": self.old}


def judge(plan: CanaryPlan, new: Outcomes, old: Outcomes, old_since_start: Outcomes, *,
          final: bool) -> Verdict:
    """The step's verdict.  ``final``: the step may not be extended any more (its limit is reached)."""
    baseline = old if old.requests >= max(plan.min_requests, 1) else old_since_start
    v = Verdict(None, new=new.summary(), old=baseline.summary())
    if new.requests < plan.min_requests:
        if final:
            v.passed = False
            v.reasons.append(f"not enough traffic to judge: the new version had {new.requests} requests, "
                             f"at least {plan.min_requests} are needed (lower --min-requests, or raise "
                             f"--step-seconds/--max-step-seconds for a quiet service)")
        return v
    rate = new.error_rate() or 0.0
    base_rate = baseline.error_rate() or 0.0
    if rate > base_rate + plan.max_error_rate:
        v.reasons.append(f"error rate {rate:.2%} ({new.errors} of {new.requests}) against the old version's "
                         f"{base_rate:.2%} + {plan.max_error_rate:.2%} allowed")
    p99, base_p99 = new.quantile(0.99), baseline.quantile(0.99)
    if p99 is not None and base_p99 is not None:
        ratio = max(p99, LATENCY_FLOOR) / max(base_p99, LATENCY_FLOOR)
        v.new["p99_ratio"] = round(ratio, 2)
        if ratio > plan.max_latency_ratio:
            v.reasons.append(f"p99 latency {p99 * 1000:.1f} ms, {ratio:.1f}x the old version's "
                             f"{base_p99 * 1000:.1f} ms (at most {plan.max_latency_ratio:g}x allowed)")
    v.passed = not v.reasons
    return v


def figures(summary: dict[str, Any]) -> str:
    """One window's figures for a progress line: requests, error rate, p99."""
    rate = summary.get("error_rate")
    p99 = summary.get("p99_ms")
    return (f"{summary.get('requests', 0)} requests, "
            f"{'no' if rate is None else f'{rate:.2%}'} errors, p99 {'-' if p99 is None else f'{p99:g} ms'}")


def instance_outcomes(status: dict[str, Any], pid: int) -> Outcomes:
    """An instance's cumulative outcomes from the supervisor's ``status``: its entry and its workers'.

    Only workers the kernel showed to be children of ``pid`` count (``parent_checked``): any peer may
    name a parent, and one that is not could otherwise add 500s to a canary and steer its verdict."""
    total = Outcomes()
    for inst in status.get("instances", []):
        if inst.get("pid") == pid or (inst.get("parent") == pid and inst.get("parent_checked", False)):
            wire = inst.get("outcomes")
            if wire:
                total = total + Outcomes.from_wire(wire)
    return total
