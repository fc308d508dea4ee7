"""Token-bucket arithmetic (pure): no clock, no I/O, no locks.

A bucket holds up to ``capacity`` units and refills continuously at ``rate``
units per second (capacity / period). A request *reserves* its estimate at
admission and the bucket is later *adjusted* by the difference between what was
used and what was reserved (a refund when negative). A reservation is granted
when the bucket holds the whole cost; a cost larger than the capacity is capped
at the capacity, so a request bigger than the budget can still run once the
bucket is full instead of never. Because a grant needs the whole cost present,
concurrent reservations of one key never overdraw; only a settlement that
reports more than was reserved can take the level below zero, and the debt is
paid back by refill before the next grant.

The Redis backend runs the same arithmetic in Lua (``redis_backend``); the unit
tests drive both with the same cases.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Bucket:
    capacity: float
    rate: float  # units per second
    level: float
    stamp: float  # the clock reading ``level`` was computed at

    @classmethod
    def full(cls, capacity: float, period: float, now: float) -> Bucket:
        return cls(capacity, capacity / period, capacity, now)

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_for(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` (capped at capacity) fits; 0.0 when it fits now."""
        self.refill(now)
        need = min(cost, self.capacity) - self.level
        return 0.0 if need <= 0 else need / self.rate

    def take(self, cost: float) -> None:
        """Charge a granted reservation (after ``wait_for`` said 0)."""
        self.level -= min(cost, self.capacity)

    def adjust(self, delta: float, now: float) -> None:
        """Settle: charge ``delta`` more (used beyond the reservation) or refund it."""
        self.refill(now)
        self.level = min(self.capacity, self.level - delta)

    def remaining(self) -> int:
        return max(0, int(self.level))

    def reset_after(self) -> float:
        """Seconds until the bucket is full again (OpenAI's x-ratelimit-reset-*)."""
        return max(0.0, (self.capacity - self.level) / self.rate)


@dataclass(slots=True)  # not frozen: one per request, and a frozen init is slow
class Grant:
    """The answer to one reservation, with what the rate-limit headers report."""

    ok: bool
    retry_after: float  # seconds; 0 when ok
    limit_tokens: int
    remaining_tokens: int
    reset_tokens: float
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float | None = None
    # False when a remote backend could not be reached and let the request in anyway
    # (limits.redis_failure: open): nothing was reserved, so nothing is to be refunded.
    held: bool = True


def reserve(tokens: Bucket, requests: Bucket | None, cost: float, now: float) -> Grant:
    """Reserve ``cost`` tokens and one request, both or neither."""
    wait = tokens.wait_for(cost, now)
    if requests is not None:
        wait = max(wait, requests.wait_for(1, now))
    ok = wait == 0.0
    if ok:
        tokens.take(cost)
        if requests is not None:
            requests.take(1)
    return Grant(
        ok=ok, retry_after=wait, limit_tokens=int(tokens.capacity),
        remaining_tokens=tokens.remaining(), reset_tokens=tokens.reset_after(),
        limit_requests=None if requests is None else int(requests.capacity),
        remaining_requests=None if requests is None else requests.remaining(),
        reset_requests=None if requests is None else requests.reset_after(),
    )
