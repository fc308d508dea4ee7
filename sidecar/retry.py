"""When a failed attempt may be made again (pure: the clock is passed in).

* :class:`RetryReason` names what went wrong before the first byte, in the
  vocabulary of a route's ``retry_on`` list;
* :class:`RetryBudget` caps retries at a fraction of requests over a sliding window,
  so an outage of one provider cannot multiply the load on the others;
* :func:`parse_retry_after` reads a provider's ``retry-after`` (seconds or an HTTP date).
"""

from __future__ import annotations

import email.utils
from enum import StrEnum
from typing import Final

from sidecar.window import SlidingCounts


class RetryReason(StrEnum):
    CONNECT = "connect"  # refused, reset or timed out while connecting, TLS failure
    FIRST_BYTE_TIMEOUT = "first_byte_timeout"
    # The provider closed the connection with no byte back after reading the request:
    # it may have started generating, so replaying the POST is not safe by default.
    RESET = "reset"
    STATUS_429 = "429"
    STATUS_500 = "500"
    STATUS_502 = "502"
    STATUS_503 = "503"
    STATUS_504 = "504"


DEFAULT_RETRY_ON: Final = frozenset({
    RetryReason.CONNECT, RetryReason.FIRST_BYTE_TIMEOUT, RetryReason.STATUS_429,
    RetryReason.STATUS_500, RetryReason.STATUS_502, RetryReason.STATUS_503,
    RetryReason.STATUS_504,
})
STATUS_REASONS: Final = {int(r.value): r for r in RetryReason if r.value.isdigit()}

# Sliding window of the budget: this many buckets of BUDGET_BUCKET_S seconds.
BUDGET_BUCKETS: Final = 10
BUDGET_BUCKET_S: Final = 1.0
# Retries always allowed in a window whatever its request count, so that a quiet
# route can still fail over (as Envoy's min_retry_concurrency does).
BUDGET_MIN_RETRIES: Final = 3


class RetryBudget:
    """At most ``ratio`` retries per request over the last ``window`` seconds."""

    __slots__ = ("_window", "ratio")

    def __init__(self, ratio: float = 0.2) -> None:
        self.ratio = ratio
        self._window = SlidingCounts(BUDGET_BUCKETS, BUDGET_BUCKET_S)  # (requests, retries)

    def request(self, now: float) -> None:
        self._window.bucket(now)[1] += 1

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget if it has one left."""
        current = self._window.bucket(now)
        requests, retries = self._window.totals(now)
        if retries >= BUDGET_MIN_RETRIES and retries >= self.ratio * requests:
            return False
        current[2] += 1
        return True


# Longest cool-down a provider can ask for: a typo'd or hostile retry-after must not
# take an upstream out of service for a day.
MAX_RETRY_AFTER_S: Final = 300.0


def parse_retry_after(value: bytes | None, now_epoch: float) -> float | None:
    """Seconds to wait from a ``retry-after`` value (delta-seconds or an HTTP date),
    capped at MAX_RETRY_AFTER_S; None when absent or unreadable."""
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return min(MAX_RETRY_AFTER_S, float(text))
    try:
        seconds = float(text)  # some providers send fractions ("1.5")
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - now_epoch
    if seconds != seconds:  # NaN
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))
