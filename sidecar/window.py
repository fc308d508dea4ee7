"""A sliding window of two counts (pure: the clock is passed in).

Health (attempts, failures) and the retry budget (requests, retries) both count
over the last few seconds. The window is a ring of buckets ``width`` seconds wide;
a bucket whose time has passed is reset when it comes round again, so counting is a
few integer operations and summing visits ``len(ring)`` buckets.
"""

from __future__ import annotations


class SlidingCounts:
    __slots__ = ("_ring", "width")

    def __init__(self, buckets: int, width: float) -> None:
        self.width = width
        # [bucket index, first count, second count] per bucket
        self._ring: list[list[int]] = [[-1, 0, 0] for _ in range(buckets)]

    def bucket(self, now: float) -> list[int]:
        """The current bucket, to add to its counts (``[1]`` and ``[2]``)."""
        index = int(now // self.width)
        ring = self._ring
        b = ring[index % len(ring)]
        if b[0] != index:
            b[0], b[1], b[2] = index, 0, 0
        return b

    def totals(self, now: float) -> tuple[int, int]:
        """Both counts summed over the window that ends now."""
        oldest = int(now // self.width) - len(self._ring)
        first = second = 0
        for index, a, b in self._ring:
            if index > oldest:
                first += a
                second += b
        return first, second

    def clear(self) -> None:
        for b in self._ring:
            b[0] = -1
