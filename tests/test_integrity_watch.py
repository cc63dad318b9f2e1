"""The program-integrity bookkeeping (supervisor/integrity.py), without the kernel: when do connections
found on the anchor prove that our program was bypassed, and how is a detach loop logged."""

from __future__ import annotations

from reuseport_standby.kernel.layout import Counter
from reuseport_standby.supervisor.integrity import LOG_INTERVAL, ProgramWatch, anchor_allowance


def test_what_the_program_parked_is_no_evidence() -> None:
    w = ProgramWatch(base=100)  # counters kept in the pinned map from before this supervisor
    assert w.found_on_anchor(3, allowance=103) == 0
    assert w.found_on_anchor(2, allowance=106) == 0  # one more parked and still in its handshake: fine
    assert w.restorations == 0 and w.bypassed == 0


def test_more_on_the_anchor_than_the_program_sent_is_a_bypass_counted_once() -> None:
    w = ProgramWatch(base=0)
    assert w.found_on_anchor(4, allowance=1) == 3
    assert (w.restorations, w.bypassed) == (1, 3)
    # the same excess is not reported again; what the program parks afterwards is allowed as before
    assert w.found_on_anchor(1, allowance=2) == 0
    assert w.found_on_anchor(2, allowance=2) == 2
    assert (w.restorations, w.bypassed) == (2, 5)
    assert w.as_dict()["restorations"] == 2 and w.as_dict()["last_restoration"] is not None


def test_every_counter_that_can_reach_the_anchor_is_allowed() -> None:
    counters = {c: 1 for c in Counter}
    assert anchor_allowance(counters) == 4  # parked, migrated to parking, and the two kernel-hash fall-backs


def test_a_detach_loop_is_counted_in_full_but_logged_rarely() -> None:
    w = ProgramWatch(base=0)
    allowance = 0
    for _ in range(50):
        w.found_on_anchor(1, allowance)
    assert w.restorations == 50
    assert w.take_log_batch(now=1000.0) == 50
    w.found_on_anchor(1, allowance)
    assert w.take_log_batch(now=1000.0 + LOG_INTERVAL / 2) == 0
    assert w.take_log_batch(now=1000.0 + LOG_INTERVAL) == 1
    assert w.take_log_batch(now=2000.0) == 0  # nothing new
