"""The canary's judgement and its plan, without processes (canary.py, outcomes.py)."""

from __future__ import annotations

import pytest

from reuseport_standby.canary import CanaryPlan, instance_outcomes, judge
from reuseport_standby.outcomes import BUCKETS, Outcomes, Recorder, bucket_of, upper_bound
from reuseport_standby.runner import ReloadOptions, reload_options


def window(ok: int, errors: int = 0, seconds: float = 0.01, *, slow: int = 0, slow_seconds: float = 1.0) -> Outcomes:
    r = Recorder()
    for _ in range(ok):
        r.record("2xx", seconds)
    for _ in range(errors):
        r.record("5xx", seconds)
    for _ in range(slow):
        r.record("2xx", slow_seconds)
    return r.snapshot()


PLAN = CanaryPlan(weights=(10, 50), step_seconds=10, max_error_rate=0.01, max_latency_ratio=2, min_requests=100)


def test_a_version_as_good_as_the_old_passes() -> None:
    v = judge(PLAN, window(200), window(1800), Outcomes(), final=False)
    assert v.passed is True and not v.reasons
    assert v.new["requests"] == 200 and v.old["requests"] == 1800


def test_a_fifth_of_500s_fails_on_the_error_rate_with_its_numbers() -> None:
    v = judge(PLAN, window(160, errors=40), window(1800), Outcomes(), final=False)
    assert v.passed is False
    assert "error rate 20.00% (40 of 200)" in v.reasons[0]


def test_errors_the_old_version_has_too_are_not_held_against_the_new() -> None:
    # a backend outage: both versions answer 5 % errors
    assert judge(PLAN, window(190, errors=10), window(1710, errors=90), Outcomes(), final=False).passed is True
    # but 5 % above the old version's is
    assert judge(PLAN, window(180, errors=20), window(1800), Outcomes(), final=False).passed is False


def test_a_three_times_slower_p99_fails_and_noise_under_the_floor_does_not() -> None:
    v = judge(PLAN, window(200, seconds=0.030), window(1800, seconds=0.010), Outcomes(), final=False)
    assert v.passed is False and "p99 latency" in v.reasons[0] and v.new["p99_ratio"] >= 2.5
    # 0.3 ms against 0.9 ms is loopback noise: both count as the floor
    assert judge(PLAN, window(200, seconds=0.0009), window(1800, seconds=0.0003), Outcomes(), final=False).passed


def test_the_tail_counts_not_the_median() -> None:
    # 3 % of requests 1 s slow: the median is unchanged, p99 is not
    v = judge(PLAN, window(194, slow=6), window(1800, seconds=0.01), Outcomes(), final=False)
    assert v.passed is False and v.new["p50_ms"] == v.old["p50_ms"]


def test_too_few_requests_wait_then_roll_back_on_no_evidence() -> None:
    assert judge(PLAN, window(20), window(1800), Outcomes(), final=False).passed is None
    v = judge(PLAN, window(20), window(1800), Outcomes(), final=True)
    assert v.passed is False and "not enough traffic to judge" in v.reasons[0] and "--min-requests" in v.reasons[0]
    zero = CanaryPlan(weights=(10,), min_requests=0)
    assert judge(zero, Outcomes(), Outcomes(), Outcomes(), final=True).passed is True


def test_an_old_version_without_traffic_in_the_window_is_judged_by_its_figures_since_the_start() -> None:
    since_start = window(1000, seconds=0.010)
    v = judge(PLAN, window(200, seconds=0.050), window(3), since_start, final=False)
    assert v.old["requests"] == 1000 and v.passed is False


def test_windows_subtract_and_a_restarted_counter_counts_from_zero() -> None:
    a, b = window(10), window(25, errors=5)
    d = b - a
    assert d.requests == 20 and d.errors == 5
    assert (a - b).requests == a.requests  # went back: the later snapshot is taken whole


def test_quantiles_are_within_one_bucket() -> None:
    for s in (0.0001, 0.00105, 0.0123, 0.5, 3.0):
        i = bucket_of(s)
        assert upper_bound(i) >= s and (i == 0 or upper_bound(i - 1) < s)
    assert bucket_of(1e6) == BUCKETS - 1


@pytest.mark.parametrize("bad, says", [
    ({"weights": []}, "1 to 10"), ({"weights": [10, 10]}, "increase"), ({"weights": [0]}, "from 1 to 100"),
    ({"weights": [101]}, "from 1 to 100"), ({"weights": [True]}, "from 1 to 100"), ({"weights": "10"}, "1 to 10"),
    ({"weights": [10], "step_seconds": 0}, "step-seconds"), ({"weights": [10], "max_error_rate": 2}, "max-error-rate"),
    ({"weights": [10], "max_latency_ratio": 0.5}, "max-latency-ratio"), ({"weights": [10], "min_requests": -1}, "min-requests"),
    ({"weights": [10], "min_requests": 1.5}, "whole"), ({"weights": [10], "nope": 1}, "unknown"),
    ({"weights": [10], "step_seconds": 10, "max_step_seconds": 5}, "at least"), ([], "object"),
])
def test_a_bad_plan_says_what_is_wrong(bad: object, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        CanaryPlan.from_wire(bad)


def test_a_plan_travels_and_defaults_its_step_limit() -> None:
    plan = CanaryPlan.from_wire({"weights": [10, 50], "step_seconds": 4})
    assert CanaryPlan.from_wire(plan.to_wire()) == plan and plan.step_limit == 20


def test_an_instance_sums_its_entry_and_its_workers() -> None:
    st = {"instances": [{"pid": 10, "outcomes": window(5).to_wire()},
                        {"pid": 11, "parent": 10, "parent_checked": True, "outcomes": window(7, errors=1).to_wire()},
                        {"pid": 20, "outcomes": window(100).to_wire()}, {"pid": 12, "parent": 10, "parent_checked": True},
                        # a peer that names 10 as its parent but is no child of it: its 500s must not count
                        {"pid": 13, "parent": 10, "parent_checked": False, "outcomes": window(0, errors=50).to_wire()}]}
    got = instance_outcomes(st, 10)
    assert got.requests == 13 and got.errors == 1


@pytest.mark.parametrize("msg, says", [
    ({"canary": {"weights": [50, 10]}}, "increase"), ({"canary": "10,50"}, "object"),
    ({"health_path": "healthz"}, "starting with"), ({"health_path": "/a b"}, "plain path"), ({"health_path": 1}, "string"),
    ({"health_path": "/x" * 600}, "at most"),
])
def test_a_bad_reload_request_is_refused_before_anything_starts(msg: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        reload_options(msg)


def test_reload_options_pass_a_plan_and_a_health_path_through() -> None:
    opts = reload_options({"canary": {"weights": [10, 50]}, "health_path": "/healthz?deep=1"})
    assert opts.canary is not None and opts.canary.weights == (10, 50) and opts.health_path == "/healthz?deep=1"
    assert reload_options({"health_path": ""}).health_path == "", "'' turns the check off"
    assert reload_options({}) == ReloadOptions()
