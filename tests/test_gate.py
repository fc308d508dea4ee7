"""The gate's arithmetic (pure): slots, tier-ordered waiting, cancellation, hand-over."""

from __future__ import annotations

import pytest

from sidecar.gate import Gate, QueueFull


def test_slots_then_queue_then_full() -> None:
    gate: Gate[str] = Gate(limit=2, max_queue=2, timeout=5)
    assert gate.try_enter() and gate.try_enter()
    assert not gate.try_enter() and gate.running == 2
    gate.wait(1, "a")
    gate.wait(1, "b")
    with pytest.raises(QueueFull):
        gate.wait(0, "c")
    assert gate.queued == 2


def test_a_freed_slot_passes_to_the_best_tier_then_the_earliest() -> None:
    gate: Gate[str] = Gate(limit=1, max_queue=10, timeout=5)
    assert gate.try_enter()
    for rank, name in [(1, "free-1"), (0, "pro-1"), (1, "free-2"), (0, "pro-2")]:
        gate.wait(rank, name)
    order = []
    while (w := gate.leave()) is not None:
        order.append(w.item)
        assert gate.running == 1  # the slot went with it
    assert order == ["pro-1", "pro-2", "free-1", "free-2"]
    assert gate.running == 0 and gate.queued == 0


def test_cancelled_waiters_are_skipped_and_free_their_place() -> None:
    gate: Gate[str] = Gate(limit=1, max_queue=1, timeout=5)
    assert gate.try_enter()
    w = gate.wait(0, "gone")
    gate.cancel(w)
    gate.cancel(w)  # twice is harmless
    assert gate.queued == 0
    gate.wait(0, "next")  # the place is free again
    nxt = gate.leave()
    assert nxt is not None and nxt.item == "next"
    assert gate.leave() is None and gate.running == 0


def test_no_one_jumps_the_queue_while_others_wait() -> None:
    gate: Gate[str] = Gate(limit=1, max_queue=5, timeout=0.4)
    assert gate.try_enter()
    gate.wait(0, "w")
    assert not gate.try_enter()  # the slot, when freed, is the waiter's
    assert gate.retry_after() == 1
