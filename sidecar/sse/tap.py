"""The tap interface: what a tap is fed, what it reports, and the caps it works within.

``Tap`` and ``TapResult`` are what the proxy sees; the taps themselves live in
``streams`` (SSE), ``body`` (JSON bodies) and ``deferred`` (the one ``make_tap``
hands out for streams). ``body_cap`` and the oversize head/tail it implies are
shared by all of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.usage import Usage

KiB = 1024
MiB = 1024 * KiB

# Default for the most bytes of one SSE event, or of one non-streaming body, the
# tap holds (config: limits.tap_body_bytes). Beyond it the event/body is not
# parsed: the tap keeps only its head and tail and salvages usage from the tail,
# where every provider puts it (see _salvage_usage); content in it is lost.
DEFAULT_BODY_CAP = 4 * MiB

# Of an event/body that outgrew body_cap: the head (enough for the event name
# and JSON "type") and the tail (enough for any usage object and what follows
# it) are kept; the middle is discarded.
OVERSIZE_HEAD_BYTES = 512
OVERSIZE_TAIL_BYTES = 64 * KiB

# Text -> tokens: the tokenizer a tap may be given to count kept text as it goes.
Counter = Callable[[str], int]


@dataclass(frozen=True, slots=True)
class TapResult:
    usage: Usage | None  # None when no usage frame was seen
    # Completion text received and not yet counted, for an estimate when usage is None
    # (everything received when no counter was given, up to COMPLETION_TEXT_CAP).
    completion_text: str
    events: int  # SSE events seen (blocks with a data field); 0 for non-streaming bodies
    # A terminal event was seen ([DONE], message_stop, response.completed/incomplete/
    # failed); for a non-streaming body: it was complete and parsed.
    done: bool
    # Tokens the tap's ``counter`` already counted for text it discarded.
    completion_tokens_counted: int = 0
    # Escaped text bytes dropped at COMPLETION_TEXT_CAP (no counter given).
    completion_bytes_dropped: int = 0
    # An event or body outgrew body_cap; its content was lost (usage was salvaged if possible).
    truncated: bool = False

    def completion_estimate(self, count: Counter) -> int:
        """Completion tokens from what the tap saw: counted + count(kept text) (+ extrapolated).

        When text was dropped at the cap, the dropped bytes are assumed to tokenise
        like the kept ones (the kept text is the start of the same answer).
        """
        kept = count(self.completion_text) if self.completion_text else 0
        n = self.completion_tokens_counted + kept
        if self.completion_bytes_dropped and self.completion_text:
            kept_bytes = len(self.completion_text.encode("utf-8", "surrogatepass"))
            n += round(kept * self.completion_bytes_dropped / kept_bytes)
        return n


class Tap(ABC):
    """Receives response body bytes; reports usage and content seen so far."""

    __slots__ = ()  # so that subclasses with slots carry no __dict__ (one per stream)

    @abstractmethod
    def feed(self, data: bytes | memoryview) -> None: ...

    @abstractmethod
    def result(self) -> TapResult:
        """May be called at any time, any number of times (also mid-stream)."""

    def usage(self) -> Usage | None:
        """The usage the provider reported, if any; may be cheaper than ``result()``."""
        return self.result().usage
