"""Avalanche protection (pure): at most N attempts on an upstream, the rest wait in order.

A slow provider must not take every connection with it. Each upstream with
``max_concurrent`` has a :class:`Gate`: an attempt enters when a slot is free;
otherwise it waits in a queue ordered by tier (rank 0 first), then by arrival,
bounded by ``max_queue``. A freed slot goes straight to the head of the queue,
so the slot count never drops below the limit while requests wait. Waiting is
bounded by ``queue_timeout``: the proxy arms one timer per waiter and sheds it
(503 + retry-after) when it fires. No clock or loop here; the proxy supplies both.
"""

from __future__ import annotations

import heapq
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class QueueFull(Exception):
    """The wait queue is at ``max_queue``: shed at once."""


class Waiter(Generic[T]):
    """One queued attempt. ``item`` is the proxy's (its flight); ``handle`` its timer."""

    __slots__ = ("alive", "handle", "item", "rank", "seq")

    def __init__(self, rank: int, seq: int, item: T) -> None:
        self.rank = rank
        self.seq = seq
        self.item = item
        self.alive = True
        # The proxy's queue_timeout timer (anything with cancel(): uvloop's TimerHandle
        # is not an asyncio.TimerHandle).
        self.handle: Cancellable | None = None

    def __lt__(self, other: Waiter[T]) -> bool:
        return (self.rank, self.seq) < (other.rank, other.seq)


class Gate(Generic[T]):
    """The slots and the wait queue of one upstream."""

    __slots__ = ("_heap", "_seq", "limit", "max_queue", "queued", "running", "timeout")

    def __init__(self, limit: int, max_queue: int, timeout: float) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self.timeout = timeout  # seconds a waiter may wait (the proxy's timer)
        self.running = 0
        self.queued = 0  # live waiters (the heap also holds cancelled ones until popped)
        self._heap: list[Waiter[T]] = []
        self._seq = 0

    def try_enter(self) -> bool:
        """Take a slot if one is free, and nobody is waiting for it already."""
        if self.running < self.limit and not self.queued:
            self.running += 1
            return True
        return False

    def wait(self, rank: int, item: T) -> Waiter[T]:
        """Queue ``item``; raises QueueFull when ``max_queue`` are waiting."""
        if self.queued >= self.max_queue:
            raise QueueFull
        self._seq += 1
        waiter = Waiter(rank, self._seq, item)
        heapq.heappush(self._heap, waiter)
        self.queued += 1
        return waiter

    def cancel(self, waiter: Waiter[T]) -> None:
        """A waiter leaves the queue (shed, or its client went). Removed lazily: a heap
        delete is O(n), popping a dead entry later is O(log n)."""
        if waiter.alive:
            waiter.alive = False
            self.queued -= 1

    def leave(self) -> Waiter[T] | None:
        """An attempt ended and frees its slot. Returns the waiter that takes it over
        (its slot already counted), or None when nobody waits."""
        heap = self._heap
        while heap:
            waiter = heapq.heappop(heap)
            if waiter.alive:
                waiter.alive = False
                self.queued -= 1
                return waiter  # the slot passes to it: running stays the same
        self.running -= 1
        return None

    def retry_after(self) -> int:
        """Seconds a shed client should wait: the queue's own timeout, at least 1."""
        return max(1, round(self.timeout))
