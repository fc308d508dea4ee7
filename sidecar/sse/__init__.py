"""The usage tap: incremental SSE parsing and usage extraction (pure, no I/O).

The proxy feeds a ``Tap`` the decoded response body (de-chunked, not
de-compressed: the sidecar asks providers for identity encoding) exactly as it
arrives, in arbitrary splits, and asks for a ``TapResult`` whenever the request
ends: cleanly, on an upstream error, or when the client hangs up mid-stream.
This package owns ``make_tap``, the entry point; the parts are:

* ``framing``: SSE event boundaries (LF fast path, any line endings after a
  ``\\r``) and the one event-splitting loop, ``split_events``;
* ``scan``: byte-level usage scanning, salvage and decoding;
* ``text``: kept completion text for an estimate when no usage frame comes;
* ``tap``: ``Tap``, ``TapResult`` and the caps;
* ``streams``: the SSE taps per dialect; ``body``: the JSON-body tap;
* ``deferred``: ``DeferredTap``, which keeps a stream and parses it when asked;
* ``stripper``: ``UsageChunkStripper``, which hides an injected usage chunk.

This is the hot path: every streamed byte passes through ``feed``. Memory per
stream is bounded: one incomplete event (<= ``body_cap``), the kept completion
text (<= ``COMPLETION_TEXT_CAP``), and a ``OVERSIZE_TAIL_BYTES`` tail of an
event or body that outgrew ``body_cap``. What happens at each cap is documented
where the cap is defined.
"""

from __future__ import annotations

from sidecar.endpoints import endpoint_kind
from sidecar.sse.body import _BodyTap
from sidecar.sse.deferred import DEFER_BYTES, DeferredTap
from sidecar.sse.framing import split_events
from sidecar.sse.scan import (
    ORJSON_PARSE_MAX,
    USAGE_OBJECT_MAX,
    _decode,
    _has_usage_object,
    _object_end,
    _salvage_usage,
    _unescape,
)
from sidecar.sse.streams import _AnthropicTap, _ChatTap, _ResponsesTap, _SseTap, _stream_tap
from sidecar.sse.stripper import STRIPPER_HOLD_MAX, UsageChunkStripper
from sidecar.sse.tap import (
    DEFAULT_BODY_CAP,
    OVERSIZE_HEAD_BYTES,
    OVERSIZE_TAIL_BYTES,
    Counter,
    Tap,
    TapResult,
)
from sidecar.sse.text import COMPLETION_TEXT_CAP, COUNT_FLUSH_BYTES, _Text


def make_tap(
    api_format: str,
    path: str,
    stream: bool,
    *,
    body_cap: int = DEFAULT_BODY_CAP,
    counter: Counter | None = None,
) -> Tap:
    """The tap for one response.

    ``stream`` says the response body is an SSE stream (text/event-stream), not
    whether the request asked for one: an error answer to a streaming request is
    a plain JSON body. ``counter`` (text -> tokens), when given, is called to
    count-and-discard kept completion text every ``COUNT_FLUSH_BYTES``.
    """
    kind = endpoint_kind(api_format, path)
    if not stream:
        return _BodyTap(api_format, kind, body_cap, counter)
    return DeferredTap(kind, body_cap, counter)



__all__ = [
    "COMPLETION_TEXT_CAP",
    "COUNT_FLUSH_BYTES",
    "DEFAULT_BODY_CAP",
    "DEFER_BYTES",
    "ORJSON_PARSE_MAX",
    "OVERSIZE_HEAD_BYTES",
    "OVERSIZE_TAIL_BYTES",
    "STRIPPER_HOLD_MAX",
    "USAGE_OBJECT_MAX",
    "DeferredTap",
    "Tap",
    "TapResult",
    "UsageChunkStripper",
    "make_tap",
    "split_events",
]

# Private names kept importable from here as before the split (tests, debugging).
_PRIVATE = (
    _AnthropicTap,
    _BodyTap,
    _ChatTap,
    _ResponsesTap,
    _SseTap,
    _Text,
    _decode,
    _has_usage_object,
    _object_end,
    _salvage_usage,
    _stream_tap,
    _unescape,
)
