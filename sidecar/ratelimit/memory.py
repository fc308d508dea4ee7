"""The in-process bucket store: the embedded default, for one worker.

Reservation is synchronous (a dict lookup and some float arithmetic), so an
admission on this backend never takes a task or a loop turn. Buckets of
identities that went quiet are dropped once they have refilled, so a limit keyed
by client address cannot grow memory without bound.
"""

from __future__ import annotations

from typing import Final

from sidecar.ratelimit.bucket import Bucket, Grant, reserve
from sidecar.ratelimit.policy import Limits

# Above this many buckets, full (idle) ones are swept on the next reservation.
MAX_BUCKETS: Final = 100_000


class MemoryBackend:
    __slots__ = ("_buckets",)

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[Limits, Bucket, Bucket | None]] = {}

    def _get(self, name: str, limits: Limits, now: float) -> tuple[Bucket, Bucket | None]:
        entry = self._buckets.get(name)
        if entry is not None and entry[0] == limits:
            return entry[1], entry[2]
        if len(self._buckets) >= MAX_BUCKETS:
            self._sweep(now)
        tokens = Bucket.full(limits.tokens, limits.period, now)
        requests = None if limits.requests is None else Bucket.full(
            limits.requests, limits.period, now)
        if entry is not None:  # the limit changed (a reload): what was spent stays spent
            old = entry[1]
            old.refill(now)
            tokens.level = tokens.capacity - (old.capacity - old.level)
            if requests is not None and entry[2] is not None:
                old_r = entry[2]
                old_r.refill(now)
                requests.level = requests.capacity - (old_r.capacity - old_r.level)
        self._buckets[name] = (limits, tokens, requests)
        return tokens, requests

    def reserve(self, name: str, limits: Limits, cost: int, now: float) -> Grant:
        tokens, requests = self._get(name, limits, now)
        if requests is not None:
            return reserve(tokens, requests, cost, now)
        # The common case (a token bucket alone) is bucket.reserve's arithmetic inlined:
        # it runs on every admitted request, and the method calls were most of its cost.
        cap, rate = tokens.capacity, tokens.rate
        level = tokens.level
        if now > tokens.stamp:
            level += (now - tokens.stamp) * rate
            if level > cap:
                level = cap
            tokens.stamp = now
        need = (cost if cost < cap else cap) - level
        if need <= 0:
            level -= cost if cost < cap else cap
            tokens.level = level
            return Grant(True, 0.0, int(cap), int(level) if level > 0 else 0,
                         (cap - level) / rate)
        tokens.level = level
        return Grant(False, need / rate, int(cap), int(level) if level > 0 else 0,
                     (cap - level) / rate)

    def settle(self, name: str, limits: Limits, delta: int, now: float) -> None:
        entry = self._buckets.get(name)
        if entry is not None and delta:
            entry[1].adjust(delta, now)

    def _sweep(self, now: float) -> None:
        for name, (_, tokens, requests) in list(self._buckets.items()):
            tokens.refill(now)
            if requests is not None:
                requests.refill(now)
            if tokens.level >= tokens.capacity and (
                    requests is None or requests.level >= requests.capacity):
                del self._buckets[name]

    def close(self) -> None:
        self._buckets.clear()
