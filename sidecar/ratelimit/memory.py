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
        # The policy's Limits object is the same one request after request: identity
        # first, and the dataclass's __eq__ only after a reload built new ones.
        if entry is not None and (entry[0] is limits or entry[0] == limits):
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
        if limits.requests is not None:
            tokens, requests = self._get(name, limits, now)
            return reserve(tokens, requests, cost, now)
        wait, remaining, reset = self.reserve_tokens(name, limits, cost, now)
        return Grant(wait == 0.0, wait, limits.tokens, remaining, reset)

    def reserve_tokens(self, name: str, limits: Limits, cost: int,
                       now: float) -> tuple[float, int, float]:
        """A token bucket alone (no request count): charge ``cost`` if it fits.

        Returns the seconds to wait (0.0: granted and charged), the tokens left and the
        seconds until the bucket is full. It is bucket.reserve's arithmetic inlined and
        without a Grant: it runs on every admitted request, and the calls and the
        object were most of its cost.
        """
        entry = self._buckets.get(name)
        tokens = entry[1] if entry is not None and entry[0] is limits \
            else self._get(name, limits, now)[0]
        cap, rate = tokens.capacity, tokens.rate
        level = tokens.level
        if now > tokens.stamp:
            level += (now - tokens.stamp) * rate
            if level > cap:
                level = cap
            tokens.stamp = now
        take = cost if cost < cap else cap
        if take <= level:
            level -= take
            wait = 0.0
        else:
            wait = (take - level) / rate
        tokens.level = level
        return wait, int(level) if level > 0 else 0, (cap - level) / rate

    def settle(self, name: str, limits: Limits, delta: int, now: float) -> None:
        entry = self._buckets.get(name)
        if entry is None or not delta:
            return
        tokens = entry[1]  # Bucket.adjust, inlined for the same reason as above
        cap, level = tokens.capacity, tokens.level
        if now > tokens.stamp:
            level += (now - tokens.stamp) * tokens.rate
            if level > cap:
                level = cap
            tokens.stamp = now
        level -= delta
        tokens.level = level if level < cap else cap

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
