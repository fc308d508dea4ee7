"""Health of one upstream, as the router sees it (pure: the clock is passed in).

Passive outlier ejection: ``consecutive_failures`` failures in a row, or an error
rate over ``error_rate`` within the sliding window (with at least
``min_requests`` in it), eject the upstream for ``base_ejection`` seconds, doubled
for each ejection in a row up to ``max_ejection``. When the ejection expires the
upstream is *half-open*: exactly one real request is let through as a probe; its
success makes the upstream healthy again (and resets the back-off), its failure
ejects it again for twice as long. A provider's ``retry-after`` puts it in a
cool-down of its own, which neither counts as a failure nor resets the back-off.

Active checks (``health_check``, run by ``sidecar.health_check`` in a task of their
own, off the hot path) report through :meth:`check_failed` / :meth:`check_passed`
into one flag, ``active_down``, kept apart from the passive counts: an upstream
failing its check is unavailable whatever its passive state, and a failed check
never counts as a failed request (nor a passed one as a success). When a check
passes again after failing, an ejection still running is cut short to half-open,
so the next real request probes the upstream at once instead of waiting out the
back-off; the back-off itself is kept until that probe succeeds. A check that
keeps passing does not shorten ejections: an upstream that answers its health
path but fails real requests stays ejected for as long as its failures say.

Routing asks :meth:`UpstreamHealth.available` per candidate: a few comparisons,
O(1), no lock and no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from sidecar.window import SlidingCounts

# Sliding window of the error-rate rule: this many buckets of BUCKET_S seconds.
WINDOW_BUCKETS: Final = 10
BUCKET_S: Final = 1.0
# EWMA weight of the newest time-to-first-byte sample (the `latency` strategy).
EWMA_ALPHA: Final = 0.3


@dataclass(frozen=True, slots=True)
class EjectionPolicy:
    consecutive_failures: int = 5
    error_rate: float = 0.5  # failures / attempts in the window; 1.0 disables the rule
    min_requests: int = 20  # attempts in the window before the rate counts
    base_ejection: float = 5.0  # seconds
    max_ejection: float = 300.0


class State(IntEnum):
    HEALTHY = 0
    COOLING = 1  # told to wait by the provider (retry-after)
    EJECTED = 2  # failing: no request until the ejection ends
    HALF_OPEN = 3  # the ejection ended: one probe request may go
    PROBING = 4  # the probe is in flight: nothing else until it answers
    CHECK_FAILING = 5  # the active health check fails: no request until it passes


class UpstreamHealth:
    __slots__ = (
        "_ejected_until",
        "_ejections",
        "_failures_in_row",
        "_probing",
        "_window",
        "active_down",
        "cool_until",
        "ewma_ttfb",
        "inflight",
        "name",
        "policy",
    )

    def __init__(self, name: str, policy: EjectionPolicy | None = None) -> None:
        self.name = name
        self.policy = policy or EjectionPolicy()
        self.inflight = 0  # attempts running on it now (least_inflight, max_concurrent)
        self.ewma_ttfb: float | None = None  # seconds; None until the first sample
        self.cool_until = 0.0
        self.active_down = False  # the last active health check failed
        self._ejected_until = 0.0
        self._ejections = 0  # in a row, for the back-off
        self._failures_in_row = 0
        self._probing = False
        self._window = SlidingCounts(WINDOW_BUCKETS, BUCKET_S)  # (attempts, failures)

    # -- what the router asks -----------------------------------------------------------
    def state(self, now: float) -> State:
        if self.active_down:
            return State.CHECK_FAILING
        if self._ejections and now < self._ejected_until:
            return State.EJECTED
        if self._ejections:
            return State.PROBING if self._probing else State.HALF_OPEN
        if now < self.cool_until:
            return State.COOLING
        return State.HEALTHY

    def available(self, now: float) -> bool:
        """May a request go here now? (A half-open upstream takes one probe.)"""
        if self.active_down:
            return False
        if self._ejections:
            return now >= self._ejected_until and not self._probing
        return now >= self.cool_until

    def begin(self, now: float) -> None:
        """An attempt starts here (after ``available`` said yes)."""
        self.inflight += 1
        if self._ejections and now >= self._ejected_until:
            self._probing = True

    # -- what an attempt reports ----------------------------------------------------------
    def record_success(self, now: float, ttfb: float | None = None) -> None:
        self._window.bucket(now)[1] += 1  # the window is summed only when a failure asks
        self._failures_in_row = 0
        self._ejections = 0
        self._probing = False
        if ttfb is not None:
            prev = self.ewma_ttfb
            self.ewma_ttfb = ttfb if prev is None else prev + EWMA_ALPHA * (ttfb - prev)

    def record_failure(self, now: float) -> None:
        attempts, failures = self._count(now, failed=True)
        self._failures_in_row += 1
        p = self.policy
        if self._probing or self._failures_in_row >= p.consecutive_failures or (
            attempts >= p.min_requests and failures / attempts > p.error_rate
        ):
            self._eject(now)

    def end(self) -> None:
        """The attempt is over (whatever its result was recorded as)."""
        if self.inflight > 0:
            self.inflight -= 1

    def cool_down(self, now: float, seconds: float) -> None:
        """The provider asked for a pause (retry-after on a 429/503)."""
        self.cool_until = max(self.cool_until, now + max(0.0, seconds))

    # -- what the active health check reports (its own task, off the hot path) ---------
    def check_failed(self, now: float) -> bool:
        """The active check failed; True when that is news (the upstream was up)."""
        if self.active_down:
            return False
        self.active_down = True
        return True

    def check_passed(self, now: float) -> bool:
        """The active check passed; True when that is news (it had failed). Coming
        back cuts a running ejection short to half-open (see the module's docstring)."""
        if not self.active_down:
            return False
        self.active_down = False
        if self._ejections and now < self._ejected_until:
            self._ejected_until = now
        return True

    # -- internals ------------------------------------------------------------------------
    def _eject(self, now: float) -> None:
        p = self.policy
        self._ejections += 1
        self._ejected_until = now + min(p.max_ejection,
                                        p.base_ejection * 2 ** (self._ejections - 1))
        self._failures_in_row = 0
        self._probing = False
        self._window.clear()  # a fresh window after the ejection

    def _count(self, now: float, failed: bool) -> tuple[int, int]:
        bucket = self._window.bucket(now)
        bucket[1] += 1
        if failed:
            bucket[2] += 1
        return self._window.totals(now)
