"""What an instance's requests came to: counts by status class and a latency histogram.

Workers count (``Recorder``, a few hundred nanoseconds per request), the
heartbeats carry the cumulative counts to the supervisor, and a canary
reload compares two instances over one window by subtracting two
snapshots.  Everything here is pure: no sockets, no clocks but the
caller's.

The histogram has fixed, shared bucket bounds (a geometric series, four
buckets per doubling from 100 µs to about 60 s), so snapshots from any
process add and subtract bucket by bucket, and a quantile is accurate to
one bucket (19 %).
"""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

#: the status classes, in wire order; "exception": the app raised; "no_response": it ended without one
KINDS = ("1xx", "2xx", "3xx", "4xx", "5xx", "exception", "no_response")
#: what counts as an error for a canary: the server's fault, not the client's
ERROR_KINDS = ("5xx", "exception", "no_response")

LOWEST = 1e-4  # seconds: the upper bound of bucket 0
PER_DOUBLING = 4
BUCKETS = 79  # bucket i holds latencies up to LOWEST * 2 ** (i / 4); the last one everything above ~54 s
MAX_COUNT = 2 ** 53  # JSON numbers stay exact below this


def bucket_of(seconds: float) -> int:
    if seconds <= LOWEST:
        return 0
    i = math.ceil(PER_DOUBLING * math.log2(seconds / LOWEST) - 1e-9)
    return min(i, BUCKETS - 1)


def upper_bound(i: int) -> float:
    """The largest latency bucket ``i`` holds (seconds); the last bucket's is its lower bound's next step."""
    return LOWEST * 2 ** (i / PER_DOUBLING)


@dataclass
class Outcomes:
    """Cumulative counts: what one process, instance or window saw."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    latency: list[int] = field(default_factory=lambda: [0] * BUCKETS)

    @property
    def requests(self) -> int:
        return sum(self.counts.values())

    @property
    def errors(self) -> int:
        return sum(self.counts[k] for k in ERROR_KINDS)

    def error_rate(self) -> float | None:
        n = self.requests
        return self.errors / n if n else None

    def quantile(self, q: float) -> float | None:
        """The latency below which a fraction ``q`` of the requests fell (a bucket's upper bound; None if empty)."""
        total = sum(self.latency)
        if not total:
            return None
        need = q * total
        seen = 0
        for i, c in enumerate(self.latency):
            seen += c
            if seen >= need:
                return upper_bound(i)
        return upper_bound(BUCKETS - 1)

    def __add__(self, other: "Outcomes") -> "Outcomes":
        return Outcomes({k: self.counts[k] + other.counts[k] for k in KINDS},
                        [a + b for a, b in zip(self.latency, other.latency)])

    def __sub__(self, earlier: "Outcomes") -> "Outcomes":
        """What happened between ``earlier`` and this snapshot (never negative: a counter that went
        back, a process that restarted, counts from zero again)."""
        if any(self.counts[k] < earlier.counts[k] for k in KINDS) or any(
                a < b for a, b in zip(self.latency, earlier.latency)):
            return Outcomes(dict(self.counts), list(self.latency))
        return Outcomes({k: self.counts[k] - earlier.counts[k] for k in KINDS},
                        [a - b for a, b in zip(self.latency, earlier.latency)])

    def to_wire(self) -> dict[str, Any]:
        """The heartbeat's ``outcomes`` field: counts by kind, the histogram as sparse [bucket, count] pairs."""
        return {**{k: v for k, v in self.counts.items() if v},
                "latency": [[i, c] for i, c in enumerate(self.latency) if c]}

    @classmethod
    def from_wire(cls, msg: object) -> "Outcomes":
        """Parse and check a peer's ``outcomes`` (ValueError saying what is wrong)."""
        if not isinstance(msg, dict):
            raise ValueError(f"'outcomes' must be an object, got {type(msg).__name__}")
        unknown = set(msg) - set(KINDS) - {"latency"}
        if unknown:
            raise ValueError(f"'outcomes' has unknown keys {sorted(unknown)[:5]}; known: {', '.join(KINDS)}, latency")
        out = cls()
        for k in KINDS:
            out.counts[k] = _count(msg.get(k, 0), k)
        pairs = msg.get("latency", [])
        if not isinstance(pairs, list) or len(pairs) > BUCKETS:
            raise ValueError(f"'outcomes.latency' must be a list of at most {BUCKETS} [bucket, count] pairs")
        for pair in pairs:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ValueError("'outcomes.latency' must hold [bucket, count] pairs")
            i = pair[0]
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < BUCKETS:
                raise ValueError(f"a latency bucket is an integer from 0 to {BUCKETS - 1}, got {i!r}")
            out.latency[i] = _count(pair[1], "latency count")
        return out

    def summary(self) -> dict[str, Any]:
        """For people and dashboards: counts, error rate, p50/p99 in milliseconds."""
        rate = self.error_rate()
        p50, p99 = self.quantile(0.5), self.quantile(0.99)
        return {"requests": self.requests, **self.counts, "errors": self.errors,
                "error_rate": None if rate is None else round(rate, 4),
                "p50_ms": None if p50 is None else round(p50 * 1000, 2),
                "p99_ms": None if p99 is None else round(p99 * 1000, 2)}


def _count(v: object, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < MAX_COUNT:
        raise ValueError(f"'{what}' must be a count (an integer from 0 to 2**53), got {v!r}")
    return v


def kind_of(status: int) -> str:
    if 100 <= status < 600:
        return KINDS[status // 100 - 1]
    return "5xx"  # a status no client understands is the server's fault


#: the buckets' upper bounds but the last's, for ``Recorder.record``: a bisection instead of a logarithm
_BOUNDS = [upper_bound(i) for i in range(BUCKETS - 1)]


class Recorder:
    """One process's counts, shared by its threads.  ``record`` is the only per-request cost."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(KINDS, 0)
        self._latency = [0] * BUCKETS

    def record(self, kind: str, seconds: float) -> None:
        i = bisect.bisect_left(_BOUNDS, seconds)  # bucket_of(seconds), a third of its cost
        with self._lock:
            self._counts[kind] += 1
            self._latency[i] += 1

    def snapshot(self) -> Outcomes:
        with self._lock:
            return Outcomes(dict(self._counts), list(self._latency))


#: this process's recorder (workers count into it; its heartbeats, or its master's, report it)
RECORDER = Recorder()


def _went_back(new: Outcomes, old: Outcomes) -> bool:
    return any(new.counts[k] < old.counts[k] for k in KINDS) or any(a < b for a, b in zip(new.latency, old.latency))


class Reports:
    """A master's table of its workers' cumulative reports, keyed by pid: their sum never goes down.

    A worker that exits keeps its last report in the sum.  A report lower
    than the last one of its pid is a new process with a reused pid: the
    old one's counts are kept apart (``retired``).  Past ``limit`` entries,
    those of pids ``alive`` says are gone are folded into ``retired``, so
    the table stays bounded however many workers come and go.
    """

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self.by_pid: dict[int, Outcomes] = {}
        self.retired = Outcomes()
        self._lock = threading.Lock()

    def update(self, pid: int, outcomes: Outcomes, alive: Callable[[int], bool]) -> None:
        with self._lock:
            old = self.by_pid.get(pid)
            if old is not None and _went_back(outcomes, old):
                self.retired = self.retired + old
            self.by_pid[pid] = outcomes
            if len(self.by_pid) > self.limit:
                for gone in [p for p in self.by_pid if p != pid and not alive(p)]:
                    self.retired = self.retired + self.by_pid.pop(gone)

    def total(self) -> Outcomes:
        with self._lock:
            total = self.retired
            for o in self.by_pid.values():
                total = total + o
            return total
