"""Is our program still the one choosing sockets for the group?  Pure bookkeeping.

Attaching a program through a listener handed to an instance is impossible
(each is locked with SO_LOCK_FILTER before it leaves the supervisor), but
the kernel lets any holder *detach* the group's program
(``SO_DETACH_REUSEPORT_BPF`` checks no lock).  Without a program the kernel
picks a member by hash: the primary, the standby, a pending listener, or
the supervisor's anchor.  The supervisor re-attaches on every tick; this
module tells it when that re-attach was a restoration.

The evidence is the anchor.  While some instance slot is live our program
sends the anchor nothing but what it counts (``parked``, ``migrated to
parking``, and the kernel-hash fall-backs it counts too), so more
connections found waiting on the anchor than the program counted there
means some were chosen without it.  A bypassed connection lands on the
anchor with probability 1/N (N members in the group); docs/security.md
gives the measured window.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..kernel.layout import Counter

#: program counters that can put a new or migrated connection on the anchor
ANCHOR_COUNTERS = (Counter.PARKED, Counter.MIGRATED_PARKED, Counter.FELL_BACK, Counter.MIGRATE_FELL_BACK)
LOG_INTERVAL = 10.0  # seconds: a detach loop is counted in full but logged at most this often


def anchor_allowance(counters: dict[Counter, int]) -> int:
    """How many connections the program may have put on the anchor so far."""
    return sum(counters.get(c, 0) for c in ANCHOR_COUNTERS)


@dataclass
class ProgramWatch:
    """One address: connections found on the anchor against the program's own count of them.

    ``base`` is the program's allowance when watching began (the counters
    are per-CPU totals kept in a pinned map across supervisor restarts).
    """

    base: int
    arrived: int = 0          # connections found queued on the anchor since watching began
    explained: int = 0        # of those, the ones already reported as bypasses
    restorations: int = 0     # times the program was found bypassed (and re-attached)
    bypassed: int = 0         # connections seen on the anchor that the program did not send there
    last_restoration: float | None = None  # wall-clock time
    _unlogged: int = field(default=0, repr=False)
    _logged_at: float = field(default=-LOG_INTERVAL, repr=False)

    def found_on_anchor(self, queued: int, allowance: int) -> int:
        """Record ``queued`` connections found on the anchor; ``allowance`` is read *after* the queue
        (every connection the program parked was counted before it could be queued).

        Returns how many of them the program did not send (0: all is well)."""
        self.arrived += queued
        excess = self.arrived - self.explained - (allowance - self.base)
        if excess <= 0:
            return 0
        self.explained += excess
        self.bypassed += excess
        self.restorations += 1
        self._unlogged += 1
        self.last_restoration = time.time()
        return excess

    def take_log_batch(self, now: float) -> int:
        """Restorations not yet logged, if it is time to log them (0 otherwise): a detach loop must not flood."""
        if not self._unlogged or now - self._logged_at < LOG_INTERVAL:
            return 0
        n, self._unlogged, self._logged_at = self._unlogged, 0, now
        return n

    def as_dict(self) -> dict[str, object]:
        return {"restorations": self.restorations, "bypassed_connections": self.bypassed,
                "last_restoration": self.last_restoration}
