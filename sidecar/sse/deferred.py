"""The deferred tap: a stream's bytes kept, and parsed only when asked (``DeferredTap``).

What ``make_tap`` hands out for every SSE response. ``usage()``, which the proxy
asks of every response, cuts out the few events that can carry usage and parses
only those; anything it is not sure of goes to the parsing tap of ``streams``.
"""

from __future__ import annotations

from sidecar.endpoints import EndpointKind
from sidecar.sse.framing import _CR, _event_at
from sidecar.sse.scan import _chat_usage_dict
from sidecar.sse.streams import _stream_tap
from sidecar.sse.tap import Counter, KiB, Tap, TapResult
from sidecar.usage import Usage, usage_from_openai

# Stream bytes a DeferredTap keeps before it hands them to the parsing tap.
# Parsing a paced stream event by event as it flows cost ~7 us per event on the
# proxy's hot path (18% of its user CPU in the benchmark profile), yet nearly
# every response is a few KiB with its usage in the last events: keeping the
# bytes and looking once, at the end, is far cheaper. Past this size the parsing
# tap takes over, so memory per stream stays bounded whatever its length.
DEFER_BYTES = 64 * KiB

# Markers of the events that carry usage, as providers write them (compact JSON).
# Where one is missing, usage() falls back to a full parse: slower, same answer.
_USAGE_MARK = b'"usage":{'
_ANTHROPIC_START = b'"type":"message_start"'
_ANTHROPIC_DELTA = b'"type":"message_delta"'
_RESPONSES_DONE = (
    b'"type":"response.completed"',
    b'"type":"response.incomplete"',
    b'"type":"response.failed"',
)


class DeferredTap(Tap):
    """Keeps a stream's bytes and parses them only when asked; the same answers as
    the parsing tap it wraps (which it feeds in order, so splits never matter).

    ``usage()`` is the cheap question the proxy asks of every response: it cuts
    out just the events that can carry usage (found with ``bytes.rfind``) and
    parses only those. ``result()`` (content text for an estimate) parses all.
    """

    __slots__ = ("_body_cap", "_buf", "_counter", "_inner", "_kind", "_spilled")

    def __init__(self, kind: EndpointKind, body_cap: int, counter: Counter | None) -> None:
        # What the parsing tap is made from, kept as plain fields: a closure per
        # stream cost ~0.2 KiB on every open stream.
        self._kind = kind
        self._body_cap = body_cap
        self._counter = counter
        # The parsing tap is built only when first needed: most streams never need it,
        # and building one per request cost CPU and ~1 KiB per open stream.
        self._inner: Tap | None = None
        # Made on the first feed: an open stream whose payload still waits in the
        # relay's batch (most of them, between events) holds no empty buffer here.
        self._buf: bytearray | None = None
        self._spilled = False  # the parsing tap has seen bytes: usage() must ask it

    def _make(self) -> Tap:
        return _stream_tap(self._kind, self._body_cap, self._counter)

    def _parser(self) -> Tap:
        if self._inner is None:
            self._inner = self._make()
        return self._inner

    def feed(self, data: bytes | memoryview) -> None:
        buf = self._buf
        if buf is None:
            buf = self._buf = bytearray(data)
        else:
            buf += data
        if len(buf) > DEFER_BYTES:
            self._drain()

    def _drain(self) -> None:
        if self._buf:
            # From here on the parsing tap holds bytes _buf no longer has, so
            # usage() must ask it (a result() taken mid-stream drains too).
            self._spilled = True
            self._parser().feed(bytes(self._buf))
            self._buf.clear()

    def result(self) -> TapResult:
        self._drain()
        return self._parser().result()

    def usage(self) -> Usage | None:
        buf = self._buf or b""
        if not self._spilled and _CR not in buf:
            events = self._usage_events(bytes(buf))
            if events is not None:
                if not events:
                    return None
                if self._kind not in ("messages", "responses"):
                    # One chat/completions event carrying the usage object: decode it
                    # directly, as _ChatTap would, without building a parsing tap.
                    usage = _chat_usage_dict(events)
                    if usage is not None:
                        return usage_from_openai(usage)
                probe = self._make()
                probe.feed(events)
                return probe.result().usage
        return self.result().usage

    def _usage_events(self, buf: bytes) -> bytes | None:
        """The complete events that can carry usage, b"" for none, None for "not sure"."""
        kind = self._kind
        if kind == "messages":
            start = _event_at(buf, buf.find(_ANTHROPIC_START))
            delta = _event_at(buf, buf.rfind(_ANTHROPIC_DELTA))
            if start is None or delta is None:
                return None
            return start + delta
        if kind == "responses":
            for mark in _RESPONSES_DONE:
                i = buf.rfind(mark)
                if i >= 0:
                    return _event_at(buf, i)
            return None
        i = buf.rfind(_USAGE_MARK)
        if i < 0:
            # No usage object at all: a parse could only agree, unless the JSON is
            # spaced ("usage": {), which only the full parse understands.
            return b"" if b'"usage"' not in buf else None
        return _event_at(buf, i)
