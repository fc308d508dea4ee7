"""Kept completion text: which JSON keys hold it, and how much of it is kept.

Content deltas, kept for a tiktoken estimate when no usage frame ever comes,
are never JSON-decoded on the way: the escaped bytes of the string value after
``"content":`` (``"text":``, ``"delta":`` ...) are cut out with ``bytes.find``
and unescaped once, at ``result()``. Memory is bounded by
``COMPLETION_TEXT_CAP``, or by ``COUNT_FLUSH_BYTES`` when a counter is given.
"""

from __future__ import annotations

from collections.abc import Mapping

from sidecar.endpoints import EndpointKind
from sidecar.sse.framing import Buf
from sidecar.sse.scan import _BACKSLASH, _QUOTE, _SPACE, _string_end, _unescape
from sidecar.sse.tap import Counter, KiB, MiB

# Escaped completion-text bytes kept for an estimate. Without a ``counter``,
# deltas beyond this are dropped and only their byte count is kept
# (TapResult.completion_bytes_dropped); TapResult.completion_estimate() then
# extrapolates the token count at the kept text's bytes-per-token ratio.
COMPLETION_TEXT_CAP = 1 * MiB

# With a ``counter``, kept text is counted and discarded each time it reaches
# this size instead, so the estimate stays exact-ish for any stream length.
# Much smaller than the cap because counting runs on the event loop: tiktoken
# took 9 ms (o200k) to 18 ms (cl100k) per 256 KiB on a slow 2-core VM, so 64 KiB
# keeps each pause to a few ms; the total work is the same either way.
COUNT_FLUSH_BYTES = 64 * KiB


# JSON keys whose string values are completion text, per endpoint. The first key
# that yields text in an event ends the search (a chunk carries one kind of delta).
_CHAT_KEYS = (
    b'"content":',
    b'"reasoning_content":',  # DeepSeek, vLLM
    b'"reasoning":',  # OpenRouter, newer vLLM
    b'"arguments":',  # tool calls
    b'"refusal":',
)
_COMPLETIONS_KEYS = (b'"text":',)
_STREAM_KEYS: Mapping[EndpointKind, tuple[bytes, ...]] = {
    "chat": _CHAT_KEYS,
    "completions": _COMPLETIONS_KEYS,
}
_ANTHROPIC_KEYS = (b'"text":', b'"thinking":', b'"partial_json":')
# Non-streaming bodies: every key counts (a body holds all of its parts).
_BODY_KEYS: Mapping[EndpointKind, tuple[bytes, ...]] = {
    "chat": _CHAT_KEYS,
    "completions": _COMPLETIONS_KEYS,
    "responses": (b'"text":', b'"arguments":'),
    "messages": (b'"text":', b'"thinking":'),
    "embeddings": (),
    "unknown": _CHAT_KEYS + _COMPLETIONS_KEYS,
}


class _Text:
    """Kept completion text: escaped bytes, capped, optionally counted and discarded."""

    __slots__ = ("buf", "counted", "counter", "dropped", "limit")

    def __init__(self, counter: Counter | None) -> None:
        self.buf = bytearray()
        self.counter = counter
        self.counted = 0
        self.dropped = 0
        self.limit = COUNT_FLUSH_BYTES if counter is not None else COMPLETION_TEXT_CAP

    def overflow(self, piece: Buf) -> None:
        """``piece`` does not fit under the limit: count-and-discard, or drop it."""
        counter = self.counter
        if counter is None:
            self.dropped += len(piece)
            return
        # Flush only between whole deltas, so no escape sequence is ever cut in two.
        if self.buf:
            self.counted += counter(_unescape(self.buf))
            self.buf.clear()
        if len(piece) >= self.limit:
            self.counted += counter(_unescape(piece))
        else:
            self.buf += piece

    def grab(self, ev: Buf, key: bytes) -> bool:
        """Keep the string values of every ``key`` in ev; True if any was non-empty."""
        i = ev.find(key)
        if i < 0:
            return False
        # Fast path, the shape of nearly every delta: one compact "key":"value"
        # without escaped quotes. Anything else takes the general loop.
        start = i + len(key) + 1
        end = ev.find(b'"', start)
        if (
            end > 0
            and ev[start - 1] == _QUOTE
            and ev[end - 1] != _BACKSLASH
            and ev.find(key, end) < 0
        ):
            if end == start:
                return False
            buf = self.buf
            if len(buf) + end - start <= self.limit:
                buf += ev[start:end]
            else:
                self.overflow(ev[start:end])
            return True
        return self._grab_all(ev, key, i)

    def _grab_all(self, ev: Buf, key: bytes, i: int) -> bool:
        find = ev.find
        n = len(ev)
        klen = len(key)
        found = False
        while i >= 0:
            j = i + klen
            if j < n and ev[j] == _SPACE:  # json.dumps-style "key": "value"
                j += 1
            if j >= n or ev[j] != _QUOTE:  # null, number, object: not text
                i = find(key, j)
                continue
            start = j + 1
            end = find(b'"', start)
            if end > 0 and ev[end - 1] == _BACKSLASH:
                end = _string_end(ev, end)
            if end < 0:  # unterminated: a truncated event; its text is lost
                return found
            if end > start:
                found = True
                if len(self.buf) + end - start <= self.limit:
                    self.buf += ev[start:end]
                else:
                    self.overflow(ev[start:end])
            i = find(key, end + 1)
        return found

    def text(self) -> str:
        return _unescape(self.buf)
