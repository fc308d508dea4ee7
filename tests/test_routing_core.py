"""The pure routing cores: health and ejection, the retry budget, retry-after, strategies."""

from __future__ import annotations

import email.utils
from collections import Counter

import pytest

from sidecar.health import EjectionPolicy, State, UpstreamHealth
from sidecar.retry import MAX_RETRY_AFTER_S, RetryBudget, parse_retry_after
from sidecar.router import Balancer

# -- health -------------------------------------------------------------------------------

def test_consecutive_failures_eject_with_doubling_back_off_and_one_probe() -> None:
    h = UpstreamHealth("a", EjectionPolicy(consecutive_failures=3, base_ejection=5.0))
    for _ in range(2):
        h.record_failure(100.0)
    assert h.available(100.0)
    h.record_failure(100.0)  # the third in a row
    assert h.state(100.0) is State.EJECTED and not h.available(104.9)
    assert h.state(105.0) is State.HALF_OPEN and h.available(105.0)
    h.begin(105.0)  # the probe
    assert h.state(105.0) is State.PROBING and not h.available(105.0)  # one probe only
    h.record_failure(105.1)  # the probe failed: twice as long
    h.end()
    assert not h.available(114.9) and h.available(115.1)
    h.begin(115.1)
    h.record_success(115.2, ttfb=0.1)
    h.end()
    assert h.state(115.2) is State.HEALTHY and h.inflight == 0
    # the back-off was reset by the success
    for _ in range(3):
        h.record_failure(200.0)
    assert h.available(205.0) and not h.available(204.9)


def test_a_failing_active_check_takes_an_upstream_out_whatever_its_passive_state() -> None:
    h = UpstreamHealth("a")
    h.check_failed(10.0)
    assert not h.available(10.0) and h.state(10.0) is State.CHECK_FAILING
    h.record_success(10.5)  # a request that went anyway (panic) does not clear the check
    assert not h.available(11.0) and h.active_down
    h.check_passed(12.0)
    assert h.available(12.0) and h.state(12.0) is State.HEALTHY


def test_an_active_check_pass_after_a_failure_lets_an_ejected_upstream_be_probed() -> None:
    h = UpstreamHealth("a")
    for _ in range(h.policy.consecutive_failures):
        h.record_failure(100.0)
    assert h.state(100.0) is State.EJECTED
    assert h.check_failed(100.5) and not h.check_failed(100.6)  # news once
    assert h.check_passed(101.0) and not h.check_passed(101.1)
    assert h.state(101.0) is State.HALF_OPEN and h.available(101.0)
    h.begin(101.0)
    h.record_failure(101.2)  # the probe failed: the back-off was kept, so twice as long
    h.end()
    assert not h.available(101.2 + 2 * h.policy.base_ejection - 0.1)
    # A check that merely keeps passing does not cut the ejection short.
    assert not h.check_passed(102.0) and h.state(102.0) is State.EJECTED


def test_error_rate_over_the_window_ejects() -> None:
    h = UpstreamHealth("a", EjectionPolicy(consecutive_failures=100, error_rate=0.5,
                                           min_requests=10))
    for i in range(10):
        t = 50.0 + i * 0.1
        (h.record_failure if i % 3 != 2 else h.record_success)(t)  # 7 of 10 fail
    assert h.state(51.0) is State.EJECTED


def test_old_failures_leave_the_window() -> None:
    def run(later: float) -> State:
        h = UpstreamHealth("a", EjectionPolicy(consecutive_failures=100, error_rate=0.5,
                                               min_requests=10))
        for _ in range(9):
            h.record_failure(10.0)  # under min_requests: no ejection yet
        for _ in range(5):
            h.record_success(later)
        h.record_failure(later)
        return h.state(later)

    assert run(10.5) is State.EJECTED  # 10 of 15 failed within the window
    assert run(30.0) is State.HEALTHY  # 20 s later only 1 of 6 counts


def test_cool_down_is_not_a_failure() -> None:
    h = UpstreamHealth("a")
    h.cool_down(10.0, 2.0)
    assert h.state(11.0) is State.COOLING and not h.available(11.9)
    assert h.available(12.0) and h.state(12.0) is State.HEALTHY


def test_latency_ewma() -> None:
    h = UpstreamHealth("a")
    h.record_success(0.0, ttfb=1.0)
    h.record_success(0.0, ttfb=2.0)
    assert h.ewma_ttfb == pytest.approx(1.3)


# -- retry budget -----------------------------------------------------------------------------

def test_budget_caps_retries_at_its_ratio_of_requests() -> None:
    budget = RetryBudget(0.2)
    granted = 0
    for i in range(200):
        now = 1000.0 + i * 0.01  # 200 requests within 2 s
        budget.request(now)
        granted += budget.try_spend(now)
    assert 38 <= granted <= 41  # 20% of 200, plus at most the floor's head start


def test_budget_has_a_floor_for_quiet_routes_and_refills_as_the_window_slides() -> None:
    budget = RetryBudget(0.2)
    budget.request(0.0)
    assert [budget.try_spend(0.0) for _ in range(4)] == [True, True, True, False]
    budget.request(20.0)  # the old retries left the window
    assert budget.try_spend(20.0)


# -- retry-after -------------------------------------------------------------------------------

def test_retry_after_seconds_date_and_junk() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after(b"2", now) == 2.0
    assert parse_retry_after(b"1.5", now) == 1.5
    date = email.utils.formatdate(now + 30, usegmt=True).encode()
    assert parse_retry_after(date, now) == pytest.approx(30, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True).encode(), now) == 0
    assert parse_retry_after(b"86400", now) == MAX_RETRY_AFTER_S
    assert parse_retry_after(b"soon", now) is None
    assert parse_retry_after(None, now) is None
    assert parse_retry_after(b"nan", now) is None


# -- strategies --------------------------------------------------------------------------------

def _healths(n: int) -> list[UpstreamHealth]:
    return [UpstreamHealth(str(i)) for i in range(n)]


def test_smooth_weighted_round_robin_is_exact_and_interleaved() -> None:
    b = Balancer("weighted", (5, 1, 1))
    hs = _healths(3)
    picks = [b.pick(hs, 0.0) for _ in range(7)]
    assert Counter(picks) == {0: 5, 1: 1, 2: 1}
    assert picks == [0, 0, 1, 0, 2, 0, 0]  # nginx's sequence: never 5 in a row
    b2 = Balancer("weighted", (50, 50))
    assert Counter(b2.pick(_healths(2), 0.0) for _ in range(1000)) == {0: 500, 1: 500}


def test_tried_and_unavailable_upstreams_are_skipped() -> None:
    hs = _healths(3)
    b = Balancer("weighted", (1, 1, 1))
    assert b.pick(hs, 0.0, tried=0b011) == 2
    hs[2].cool_down(0.0, 10.0)
    assert b.pick(hs, 0.0, tried=0b011) is None
    assert Balancer("weighted", (0, 1)).pick(_healths(2), 0.0) == 1  # weight 0: never
    single = Balancer("weighted", (1,))
    assert single.pick(_healths(1), 0.0) == 0 and single.pick(_healths(1), 0.0, 1) is None


def test_priority_least_inflight_and_latency() -> None:
    hs = _healths(3)
    assert Balancer("priority", (1, 1, 1)).pick(hs, 0.0) == 0
    assert Balancer("priority", (1, 1, 1)).pick(hs, 0.0, tried=1) == 1
    hs[0].inflight, hs[1].inflight, hs[2].inflight = 4, 1, 2
    assert Balancer("least_inflight", (1, 1, 1)).pick(hs, 0.0) == 1
    hs[0].record_success(0.0, 0.5)
    hs[1].record_success(0.0, 0.2)
    # the untried upstream (no samples) is tried first, then the fastest
    assert Balancer("latency", (1, 1, 1)).pick(hs, 0.0) == 2
    assert Balancer("latency", (1, 1, 1)).pick(hs, 0.0, tried=0b100) == 1
