"""The lifecycle of one proxied request, as data: its phases and the moves between them.

A request is *admitted* (parsed, inspected, allowed in), then *connecting* (waiting
for a provider connection) or straight to *awaiting head* (a kept-alive connection
was free and the request is written), then *streaming* once a provider head has
been accepted and committed to the client, then *draining* (the response is over:
its usage is being worked out, maybe by an estimate off the loop) and finally
*settled* (its meter row is queued).

Before the first byte reaches the client an attempt may end and another begin
(``AWAITING_HEAD -> CONNECTING`` or ``-> AWAITING_HEAD``): that is where failover
lives. ``STREAMING`` has one way out, ``DRAINING``: a request whose client has bytes
can never be retried, and the table below is what guarantees it, not a flag.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Final, Protocol

from sidecar.errors import SidecarError
from sidecar.meter import Outcome
from sidecar.retry import RetryReason

if TYPE_CHECKING:
    from sidecar.sse import Tap


class Phase(IntEnum):
    ADMITTED = 0
    CONNECTING = 1
    AWAITING_HEAD = 2
    STREAMING = 3
    DRAINING = 4
    SETTLED = 5
    QUEUED = 6  # waiting for a slot on an upstream at max_concurrent (sidecar.gate)


# Every legal move. Anything else is a bug in the proxy and raises LifecycleError.
TRANSITIONS: Final[Mapping[Phase, frozenset[Phase]]] = {
    # Refused before any attempt (bad JSON, no upstream, admission) goes straight to
    # DRAINING; a free kept-alive connection skips CONNECTING.
    # An attempt on an upstream at max_concurrent waits QUEUED first (any attempt:
    # the first, a failover, a replay).
    Phase.ADMITTED: frozenset({Phase.CONNECTING, Phase.AWAITING_HEAD, Phase.QUEUED,
                               Phase.DRAINING}),
    # Given a slot it connects or takes a kept-alive connection; shed or left: DRAINING.
    Phase.QUEUED: frozenset({Phase.CONNECTING, Phase.AWAITING_HEAD, Phase.DRAINING}),
    # A failed connect may fail over to another upstream's connect.
    Phase.CONNECTING: frozenset({Phase.CONNECTING, Phase.AWAITING_HEAD, Phase.QUEUED,
                                 Phase.DRAINING}),
    # Retry before the first byte: on a new connection or on a free kept-alive one.
    Phase.AWAITING_HEAD: frozenset({Phase.STREAMING, Phase.CONNECTING, Phase.AWAITING_HEAD,
                                    Phase.QUEUED, Phase.DRAINING}),
    Phase.STREAMING: frozenset({Phase.DRAINING}),
    Phase.DRAINING: frozenset({Phase.SETTLED}),
    Phase.SETTLED: frozenset(),
}

# The table as one bit mask per phase, for the per-request check: a shift and an and
# instead of a dict and a frozenset lookup.
_ALLOWED: Final[tuple[int, ...]] = tuple(
    sum(1 << target for target in TRANSITIONS[phase]) for phase in Phase
)

# The members as module constants for per-request code: Python 3.11's EnumType
# defines __getattr__, so each `Phase.X` is a call into a Python-level hook.
ADMITTED: Final = Phase.ADMITTED
CONNECTING: Final = Phase.CONNECTING
AWAITING_HEAD: Final = Phase.AWAITING_HEAD
STREAMING: Final = Phase.STREAMING
DRAINING: Final = Phase.DRAINING
SETTLED: Final = Phase.SETTLED
QUEUED: Final = Phase.QUEUED


class LifecycleError(SidecarError):
    """A move the table does not allow: a bug in the sidecar, never the client's fault."""

    code = "lifecycle_error"


class Lifecycle:
    """The phase of one request, changed only through :meth:`advance`."""

    __slots__ = ("phase",)

    def __init__(self) -> None:
        self.phase: Phase = ADMITTED

    def advance(self, to: Phase) -> None:
        if not (_ALLOWED[self.phase] >> to) & 1:
            raise LifecycleError(f"request cannot move from {self.phase.name} to {to.name}")
        self.phase = to

    @property
    def committed(self) -> bool:
        """Has (or had) the client a response head? Then no retry is possible."""
        return self.phase >= STREAMING


# ------------------------------------------------------------- the decision at the head

class BodyFilter(Protocol):
    """Rewrites a response body on its way to the client: the include_usage stripper
    (sidecar.sse.stripper) or a format translator (sidecar.translate). ``feed`` gets
    each payload piece and returns what the client gets for it now; ``flush``, at a
    clean end of the body, returns the rest."""

    def feed(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


# Accept this provider head: relay it, with this tap and body filter on the body and
# these headers added to it. A plain tuple: a NamedTuple's __new__ is Python code,
# paid on every request.
Proceed = tuple["Tap | None", BodyFilter | None, tuple[tuple[bytes, bytes], ...]]


@dataclass(frozen=True, slots=True)
class Retry:
    """Do not commit this attempt: end it, write nothing to the client.

    ``reason`` is what the meter records had this been the last attempt; ``cause``
    is the failure in the vocabulary of a route's ``retry_on``; ``retry_after``
    (seconds) is the provider's own hint. ``replay_safe`` says the provider cannot
    have read the request (a kept-alive connection found dead), so the same request
    may go again without counting as a failover; ``granted`` says the head decision
    already checked the attempt limit and the retry budget.
    """

    reason: Outcome
    error: SidecarError
    retry_after: float | None = None
    cause: RetryReason | None = None
    replay_safe: bool = False
    granted: bool = False


Decision = Proceed | Retry

__all__ = [
    "ADMITTED",
    "AWAITING_HEAD",
    "CONNECTING",
    "DRAINING",
    "SETTLED",
    "STREAMING",
    "TRANSITIONS",
    "BodyFilter",
    "Decision",
    "Lifecycle",
    "LifecycleError",
    "Outcome",
    "Phase",
    "Proceed",
    "Retry",
]
