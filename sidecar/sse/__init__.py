"""The usage tap: incremental SSE parsing and usage extraction (pure, no I/O).

The proxy feeds a ``Tap`` the decoded response body (de-chunked, not
de-compressed: the sidecar asks providers for identity encoding) exactly as it
arrives, in arbitrary splits, and asks for a ``TapResult`` whenever the request
ends: cleanly, on an upstream error, or when the client hangs up mid-stream.

This is the hot path: every streamed byte passes through ``feed``. So:

* Events are split with ``bytes.find`` on one buffer; at most one incomplete
  event is held (bounded by ``body_cap``, see ``_SseTap``). Separators are
  ``\\n\\n`` on the fast path; once a ``\\r`` shows up in a stream the parser
  switches for good to a regex that accepts every SSE line ending
  (``\\r\\n``, ``\\n``, ``\\r``) — slower, always correct.
* Which events are decoded is decided by a cheap byte scan (``"usage":{``,
  ``message_start``, ``message_delta``, ``response.completed`` ...). Only those
  are parsed with orjson: one or two per stream. (The one exception is a
  provider that puts usage in every chunk, e.g. vLLM's continuous usage stats:
  the chat tap only remembers the last such chunk and decodes it at result().)
* Content deltas, kept for a tiktoken estimate when no usage frame ever comes,
  are never JSON-decoded on the way: the escaped bytes of the string value
  after ``"content":`` (``"text":``, ``"delta":`` ...) are cut out with
  ``bytes.find`` and unescaped once, at ``result()``.

Memory per stream is bounded: one incomplete event (<= ``body_cap``), the kept
completion text (<= ``COMPLETION_TEXT_CAP``), and a ``OVERSIZE_TAIL_BYTES``
tail of an event or body that outgrew ``body_cap``. What happens at each cap is
documented where the cap is defined.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.usage import (
    EndpointKind,
    Usage,
    endpoint_kind,
    usage_from_anthropic,
    usage_from_anthropic_stream,
    usage_from_body,
    usage_from_openai,
    usage_from_openai_embeddings,
    usage_from_openai_responses,
)

KiB = 1024
MiB = 1024 * KiB

# Default for the most bytes of one SSE event, or of one non-streaming body, the
# tap holds (config: limits.tap_body_bytes). Beyond it the event/body is not
# parsed: the tap keeps only its head and tail and salvages usage from the tail,
# where every provider puts it (see _salvage_usage); content in it is lost.
DEFAULT_BODY_CAP = 4 * MiB

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

# Of an event/body that outgrew body_cap: the head (enough for the event name
# and JSON "type") and the tail (enough for any usage object and what follows
# it) are kept; the middle is discarded.
OVERSIZE_HEAD_BYTES = 512
OVERSIZE_TAIL_BYTES = 64 * KiB

# orjson parses fast but takes ~13x its input in scratch memory while it runs
# (measured with tracemalloc: a 1 MiB JSON string peaks at 14 MB). Inputs up to
# this size get orjson; bigger ones either the stdlib parser (2x, half the
# speed) for kept text, or no full parse at all for bodies (see _BodyTap).
ORJSON_PARSE_MAX = 256 * KiB

# A "usage" object bigger than this is not one; stops the brace scan early.
USAGE_OBJECT_MAX = 16 * KiB

# A separator ("\r\n\r\n" at most) may straddle two reads: re-scan this many
# bytes of what was already held.
_SEP_OVERLAP = 3

# Two consecutive SSE line terminators (\r\n | \n | \r). The first may not be a
# bare \r followed by \n (that is one \r\n terminator, not two).
_BOUNDARY = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
_CR = 0x0D
_LF = 0x0A
_QUOTE = 0x22
_BACKSLASH = 0x5C
_SPACE = 0x20

Buf = bytes | bytearray
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


def _stream_tap(kind: EndpointKind, body_cap: int, counter: Counter | None) -> Tap:
    if kind == "messages":
        return _AnthropicTap(body_cap, counter)
    if kind == "responses":
        return _ResponsesTap(body_cap, counter)
    keys = _STREAM_KEYS.get(kind, _CHAT_KEYS + _COMPLETIONS_KEYS)
    return _ChatTap(keys, body_cap, counter)


# -- helpers ----------------------------------------------------------------------


def _unescape(escaped: Buf) -> str:
    """The text of concatenated JSON string bodies (the bytes between the quotes)."""
    if not escaped:
        return ""
    quoted = b'"' + escaped + b'"'
    if len(quoted) <= ORJSON_PARSE_MAX:
        try:
            text: str = orjson.loads(quoted)
            return text
        except orjson.JSONDecodeError:
            pass
    # The stdlib parser: for big texts (see ORJSON_PARSE_MAX), and for lone
    # surrogates, which orjson rejects (a \ud83d closing one delta is fine once
    # its pair from the next is joined on, a truly lone one is not) while the
    # stdlib keeps them, for the UTF-16 round trip below to re-pair or replace.
    try:
        loose: str = json.loads(quoted)
    except ValueError:
        return bytes(escaped).decode("utf-8", "replace")
    if b"\\ud" in escaped or b"\\uD" in escaped:
        loose = loose.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return loose


def _payload(ev: Buf) -> bytes:
    """The event's data: its ``data:`` lines joined by \\n (SSE field parsing)."""
    body = bytes(ev).rstrip(b"\n")
    # Bytes are looked for as ints: `b"\n" in body` first tries the needle as an int and
    # raises and discards a TypeError on the way (~1,200 instructions on Python 3.11).
    if body.startswith(b"data: ") and _LF not in body and _CR not in body:
        return body[6:]  # the usual event: one "data: " line, nothing else
    parts: list[bytes] = []
    for line in bytes(ev).splitlines():
        if line.startswith(b"data"):
            rest = line[4:]
            if rest[:1] == b":":
                rest = rest[1:]
                if rest[:1] == b" ":
                    rest = rest[1:]
            elif rest:
                continue  # a field named e.g. "database", not "data"
            parts.append(rest)
    return b"\n".join(parts)


def _decode(ev: Buf) -> dict[str, Any] | None:
    payload = _payload(ev)
    try:
        # See ORJSON_PARSE_MAX: big events go to the leaner stdlib parser.
        obj = orjson.loads(payload) if len(payload) <= ORJSON_PARSE_MAX else json.loads(payload)
    except ValueError:  # orjson.JSONDecodeError and json.JSONDecodeError both are
        return None
    return obj if isinstance(obj, dict) else None


def _chat_usage_dict(ev: Buf) -> dict[str, Any] | None:
    """The usage object of one chat/completions event, or None."""
    obj = _decode(ev)
    usage = _dict(obj, "usage")
    if usage is None:  # Groq nests it: {"x_groq": {"usage": {...}}}
        usage = _dict(_dict(obj, "x_groq"), "usage")
    return usage


def _dict(obj: Mapping[str, Any] | None, key: str) -> dict[str, Any] | None:
    if obj is None:
        return None
    value = obj.get(key)
    return value if isinstance(value, dict) else None


def _object_value_at(buf: Buf, i: int, n: int) -> int:
    """After a ``"usage"`` at i-len: index of the ``{`` its value starts with, or -1."""
    while i < n and buf[i] == _SPACE:
        i += 1
    if i >= n or buf[i] != 0x3A:  # ':'
        return -1
    i += 1
    while i < n and buf[i] == _SPACE:
        i += 1
    return i if i < n and buf[i] == 0x7B else -1  # '{'


def _has_usage_object(ev: Buf) -> bool:
    """A ``"usage"`` key whose value is an object (not ``null``) appears in ev.

    A quote inside a JSON string is always escaped, so an unescaped ``"usage"``
    followed by ``:`` can only be a key.
    """
    find = ev.find
    n = len(ev)
    i = find(b'"usage"')
    while i >= 0:
        if _object_value_at(ev, i + 7, n) >= 0:
            return True
        i = find(b'"usage"', i + 7)
    return False


def _object_end(buf: Buf, start: int) -> int:
    """Index after the JSON object opening at buf[start] ('{'), or -1 if not within bounds."""
    depth = 0
    in_str = False
    escaped = False
    limit = min(len(buf), start + USAGE_OBJECT_MAX)
    for i in range(start, limit):
        c = buf[i]
        if in_str:
            if escaped:
                escaped = False
            elif c == _BACKSLASH:
                escaped = True
            elif c == _QUOTE:
                in_str = False
        elif c == _QUOTE:
            in_str = True
        elif c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def _string_end(buf: Buf, end: int) -> int:
    """The closing quote at or after ``end``, skipping quotes escaped by a backslash."""
    while end > 0 and buf[end - 1] == _BACKSLASH:
        b = end - 1
        while buf[b - 1] == _BACKSLASH:
            b -= 1
        if (end - b) % 2 == 0:  # an even run of backslashes escapes itself, not the quote
            return end
        end = buf.find(b'"', end + 1)
    return end


def _salvage_usage(tail: Buf) -> dict[str, Any] | None:
    """The last ``"usage":{...}`` object in the tail of an oversized event/body.

    Every provider writes usage after the (large) content: top-level ``usage``
    after ``choices``/``content``/``output``. Best effort: the object is taken
    only if it is complete and decodes.
    """
    n = len(tail)
    i = tail.rfind(b'"usage"')
    while i >= 0:
        start = _object_value_at(tail, i + 7, n)
        if start >= 0:
            end = _object_end(tail, start)
            if end > 0:
                try:
                    obj = orjson.loads(bytes(tail[start:end]))
                except orjson.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict):
                    return obj
        i = tail.rfind(b'"usage"', 0, i)
    return None


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
_RESPONSES_TERMINAL = (b"response.completed", b"response.incomplete", b"response.failed")
_RESPONSES_TERMINAL_LINES = tuple(b"event: " + t for t in _RESPONSES_TERMINAL)
_AUDIO_DELTA = b"event: response.audio.delta\n"
_AUDIO_DELTA_DATA = b'data: {"type":"response.audio.delta"'



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


# -- streaming taps -------------------------------------------------------------


class _SseTap(Tap):
    """Event splitting shared by the streaming taps; subclasses handle complete events."""

    __slots__ = (
        "_cap",
        "_cr",
        "_done",
        "_events",
        "_grab",
        "_head",
        "_pending",
        "_skip_lf",
        "_skipping",
        "_slow",
        "_tail",
        "_text",
        "_truncated",
    )

    def __init__(self, body_cap: int, counter: Counter | None) -> None:
        self._cap = body_cap
        self._pending = bytearray()  # the one incomplete event
        self._cr = False  # a \r was seen: split with _BOUNDARY from now on
        self._skipping = False  # inside an event that outgrew the cap
        # result() took an event ending in a bare \r; a \n arriving next is that
        # separator's second half, not a new (empty) line.
        self._skip_lf = False
        self._slow = False  # _cr or _skipping: the one-event-per-read fast path is off
        self._head = b""
        self._tail = bytearray()
        self._text = _Text(counter)
        self._grab = self._text.grab
        self._events = 0
        self._done = False
        self._truncated = False

    def feed(self, data: bytes | memoryview) -> None:
        if type(data) is not bytes:
            data = bytes(data)  # memoryview has no find/in; one copy, needed to slice events anyway
        if not (self._pending or self._slow) and data.endswith(b"\n\n"):
            # A paced provider writes one whole event per read: then that read is the
            # event. Checked line by line with single-byte finds (memchr, several times
            # faster than searching for b"\n\n"): no blank line before the end, no \r.
            last = len(data) - 2
            i = data.find(b"\n")
            while i < last and data[i + 1] != 0x0A:
                i = data.find(b"\n", i + 1)
            if i == last and 0 < last <= self._cap and _CR not in data:
                self._event(data[:last])
                return
        if not data:
            return
        if not self._cr and _CR in data:
            self._cr = self._slow = True
        if self._skip_lf:
            self._skip_lf = False
            if data[0] == 0x0A:
                data = data[1:]
                if not data:
                    return
        if self._skipping:
            self._feed_skipping(data)
            return
        pending = self._pending
        if pending:
            scan = max(len(pending) - _SEP_OVERLAP, 0)
            pending += data
            buf: Buf = pending
        else:
            scan = 0
            buf = data
        start = 0
        on_event = self._event
        cap = self._cap
        if not self._cr:
            find = buf.find
            i = find(b"\n\n", scan)
            while i >= 0:
                if i - start > cap:
                    self._too_big(buf, start, i)
                elif i > start:
                    on_event(buf[start:i])
                start = i + 2
                i = find(b"\n\n", start)
        else:
            for ev_start, ev_end, nxt in _cr_events(buf, scan):
                if ev_end - ev_start > cap:
                    self._too_big(buf, ev_start, ev_end)
                elif ev_end > ev_start:
                    on_event(buf[ev_start:ev_end])
                start = nxt
        if buf is pending:
            if start:
                del pending[:start]
        elif start < len(buf):
            pending += buf[start:] if start else buf
        if len(pending) > self._cap:
            self._start_skipping()

    def _too_big(self, buf: Buf, start: int, end: int) -> None:
        """A complete event over the cap, read in one go: treated as if it had been
        skipped, so that the result never depends on how the reads were split."""
        self._events += 1
        self._truncated = True
        self._oversized(
            bytes(buf[start : start + OVERSIZE_HEAD_BYTES]),
            buf[max(end - OVERSIZE_TAIL_BYTES, start) : end],
        )

    def _start_skipping(self) -> None:
        """The held event outgrew the cap: keep its head and tail only."""
        pending = self._pending
        self._skipping = self._slow = True
        self._truncated = True
        self._head = bytes(pending[:OVERSIZE_HEAD_BYTES])
        self._tail = bytearray(pending[-OVERSIZE_TAIL_BYTES:])
        self._pending = bytearray()

    def _feed_skipping(self, data: bytes | memoryview) -> None:
        tail = self._tail
        scan = max(len(tail) - _SEP_OVERLAP, 0)
        tail += data
        end, nxt = _first_boundary(tail, scan, self._cr)
        if end < 0:
            # Trim only when twice the size: one memmove per OVERSIZE_TAIL_BYTES fed.
            if len(tail) > 2 * OVERSIZE_TAIL_BYTES:
                del tail[:-OVERSIZE_TAIL_BYTES]
            return
        rest = bytes(tail[nxt:])
        self._skipping = False
        self._slow = self._cr
        self._tail = bytearray()
        self._events += 1
        self._oversized(self._head, tail[max(end - OVERSIZE_TAIL_BYTES, 0) : end])
        self._head = b""
        if rest:
            self.feed(rest)

    @abstractmethod
    def _event(self, ev: Buf) -> None: ...

    def _oversized(self, head: bytes, tail: Buf) -> None:
        """An event that outgrew the cap ended; head/tail are all that is left of it."""

    @abstractmethod
    def _usage(self) -> Usage | None: ...

    def _settle_trailing_cr(self) -> None:
        """The held bytes end in a separator whose last \\r may yet become \\r\\n.

        Asked for a result now, take the event: the stream may have ended, and a
        \\n that still arrives is dropped by feed() (see _skip_lf).
        """
        pending = self._pending
        start = 0
        for ev_start, ev_end, nxt in _cr_events(pending, 0, at_end=True):
            if ev_end > ev_start:
                self._event(pending[ev_start:ev_end])
            start = nxt
        if start:
            del pending[:start]
            self._skip_lf = True

    def result(self) -> TapResult:
        if self._cr and self._pending and self._pending[-1] == _CR and not self._skipping:
            self._settle_trailing_cr()
        text = self._text
        return TapResult(
            usage=self._usage(),
            completion_text=text.text(),
            events=self._events,
            done=self._done,
            completion_tokens_counted=text.counted,
            completion_bytes_dropped=text.dropped,
            truncated=self._truncated,
        )


def _first_boundary(buf: Buf, pos: int, cr: bool) -> tuple[int, int]:
    """(end of the event, start of the next) for the first separator at/after pos, or (-1, -1)."""
    if not cr:
        i = buf.find(b"\n\n", pos)
        return (i, i + 2) if i >= 0 else (-1, -1)
    for _start, end, nxt in _cr_events(buf, pos):
        return end, nxt
    return -1, -1


def _cr_events(buf: Buf, pos: int, at_end: bool = False) -> list[tuple[int, int, int]]:
    """(event start, event end, next start) for each complete event, any line endings.

    A separator ending in the buffer's last byte with a \\r is not taken unless
    ``at_end``: that \\r may be the first half of a \\r\\n still in flight, and
    taking it would make the split depend on where reads happen to end.
    """
    out: list[tuple[int, int, int]] = []
    n = len(buf)
    start = 0
    m = _BOUNDARY.search(buf, pos)
    while m is not None:
        end = m.end()
        if end == n and buf[n - 1] == _CR and not at_end:
            break
        out.append((start, m.start(), end))
        start = end
        m = _BOUNDARY.search(buf, end)
    return out


# "data: [DONE]" plus room for an "id:" line or stray spaces; longer events are chunks.
_DONE_EVENT_MAX = 64


def _is_done(ev: Buf) -> bool:
    return b"[DONE]" in ev and _payload(ev).strip() == b"[DONE]"


class _ChatTap(_SseTap):
    """OpenAI Chat Completions and legacy Completions streams.

    Usage comes in a final chunk (``"choices":[]``) when stream_options.include_usage
    is on; every other chunk then carries ``"usage":null``, which is skipped.
    Only the last usage-carrying chunk is kept, and decoded at result().
    """

    __slots__ = ("_keys", "_usage_dict", "_usage_ev")

    def __init__(self, keys: tuple[bytes, ...], body_cap: int, counter: Counter | None) -> None:
        super().__init__(body_cap, counter)
        self._keys = keys
        self._usage_ev: Buf | None = None  # last chunk with a usage object, not yet decoded
        self._usage_dict: dict[str, Any] | None = None

    def _event(self, ev: Buf) -> None:
        if not ev.startswith(b"data:") and b"data:" not in ev:
            return  # comment / keep-alive only
        self._events += 1
        grab = self._grab
        for key in self._keys:
            if grab(ev, key):
                break
        if ev.endswith(b',"usage":null}'):
            return  # OpenAI's every chunk once include_usage is on: settled in O(1)
        # "usage" is the last key of OpenAI's chunks: look from the end, and settle
        # the two compact forms without a scan; anything else gets the full check.
        u = ev.rfind(b'"usage"')
        if u >= 0:
            if ev.startswith(b":{", u + 7) or (
                not ev.startswith(b":null", u + 7) and _has_usage_object(ev)
            ):
                self._usage_ev = ev
        elif len(ev) <= _DONE_EVENT_MAX and _is_done(ev):
            self._done = True

    def _oversized(self, head: bytes, tail: Buf) -> None:
        usage = _salvage_usage(tail)
        if usage is not None:
            self._usage_ev, self._usage_dict = None, usage

    def _usage(self) -> Usage | None:
        ev = self._usage_ev
        if ev is not None:
            self._usage_ev = None
            usage = _chat_usage_dict(ev)
            if usage is not None:
                self._usage_dict = usage
        return usage_from_openai(self._usage_dict) if self._usage_dict is not None else None


class _ResponsesTap(_SseTap):
    """OpenAI Responses API streams: ``*.delta`` text, usage in ``response.completed``."""

    __slots__ = ("_usage_dict",)

    def __init__(self, body_cap: int, counter: Counter | None) -> None:
        super().__init__(body_cap, counter)
        self._usage_dict: dict[str, Any] | None = None

    def _event(self, ev: Buf) -> None:
        if not ev.startswith(b"data:") and b"data:" not in ev:
            return
        self._events += 1
        # response.audio.delta carries base64 audio, not text; its name leads the
        # event (the event line, or the JSON "type" that opens the data).
        if ev.startswith(_AUDIO_DELTA) or ev.startswith(_AUDIO_DELTA_DATA):
            return
        if self._grab(ev, b'"delta":'):
            return
        if ev.startswith(_RESPONSES_TERMINAL_LINES) or (
            not ev.startswith(b"event:") and any(t in ev for t in _RESPONSES_TERMINAL)
        ):
            if len(ev) > ORJSON_PARSE_MAX:
                # It echoes the whole output: take its usage from the tail, no full parse.
                self._oversized(bytes(ev[:OVERSIZE_HEAD_BYTES]), ev[-OVERSIZE_TAIL_BYTES:])
                return
            obj = _decode(ev)
            kind = obj.get("type") if obj is not None else None
            if isinstance(kind, str) and kind.encode() in _RESPONSES_TERMINAL:
                self._done = True
                usage = _dict(_dict(obj, "response"), "usage")
                if usage is not None:
                    self._usage_dict = usage

    def _oversized(self, head: bytes, tail: Buf) -> None:
        # response.completed echoes the whole output, so it is the event most
        # likely to outgrow the cap.
        if any(t in head for t in _RESPONSES_TERMINAL):
            self._done = True
            usage = _salvage_usage(tail)
            if usage is not None:
                self._usage_dict = usage

    def _usage(self) -> Usage | None:
        d = self._usage_dict
        return usage_from_openai_responses(d) if d is not None else None


class _AnthropicTap(_SseTap):
    """Anthropic Messages streams: message_start / content_block_delta / message_delta."""

    __slots__ = ("_delta", "_start")

    def __init__(self, body_cap: int, counter: Counter | None) -> None:
        super().__init__(body_cap, counter)
        self._start: dict[str, Any] | None = None  # message_start message.usage
        self._delta: dict[str, Any] | None = None  # last message_delta usage

    def _event(self, ev: Buf) -> None:
        if not ev.startswith(b"data:") and b"data:" not in ev:
            return
        self._events += 1
        # Anthropic names every event on its first line: an O(1) test for the
        # frequent one; a stream without event lines gets the scan.
        if ev.startswith(b"event: content_block_delta") or (
            not ev.startswith(b"event:") and b"content_block_delta" in ev
        ):
            grab = self._grab
            for key in _ANTHROPIC_KEYS:
                if grab(ev, key):
                    break
            return
        if b"message_start" in ev:
            obj = _decode(ev)
            if obj is not None and obj.get("type") == "message_start":
                usage = _dict(_dict(obj, "message"), "usage")
                if usage is not None:
                    self._start = usage
        elif b"message_delta" in ev:
            obj = _decode(ev)
            if obj is not None and obj.get("type") == "message_delta":
                usage = _dict(obj, "usage")
                if usage is not None:
                    self._delta = usage
        elif b"message_stop" in ev:
            obj = _decode(ev)
            if obj is not None and obj.get("type") == "message_stop":
                self._done = True

    def _usage(self) -> Usage | None:
        if self._start is None and self._delta is None:
            return None
        return usage_from_anthropic_stream(self._start, self._delta)


# -- non-streaming bodies ---------------------------------------------------------


class _BodyTap(Tap):
    """A JSON body: copied up to body_cap, looked at when asked.

    Bodies up to ORJSON_PARSE_MAX are parsed whole. Bigger ones (embeddings
    batches reach megabytes of floats) are not: orjson would need ~13x the body in
    scratch memory and the stdlib parser tens of ms on the event loop. Their usage
    is taken from the tail instead, where every provider writes it after the
    large part (see _salvage_usage), and ``done`` means that usage was found in a
    body ending in ``}``. Beyond body_cap only that tail is kept at all.
    """

    __slots__ = ("_api_format", "_buf", "_cap", "_counter", "_kind", "_over", "_tail")

    def __init__(
        self, api_format: str, kind: EndpointKind, body_cap: int, counter: Counter | None
    ) -> None:
        self._api_format = api_format
        self._kind = kind
        self._cap = body_cap
        self._counter = counter
        self._buf = bytearray()
        self._over = False
        self._tail = bytearray()

    def feed(self, data: bytes | memoryview) -> None:
        if self._over:
            tail = self._tail
            tail += data
            if len(tail) > 2 * OVERSIZE_TAIL_BYTES:
                del tail[:-OVERSIZE_TAIL_BYTES]
            return
        buf = self._buf
        buf += data
        if len(buf) > self._cap:
            # Give up on the body rather than grow: keep a tail to salvage usage from.
            self._over = True
            self._tail = bytearray(buf[-OVERSIZE_TAIL_BYTES:])
            self._buf = bytearray()

    def _usage_of(self, usage: dict[str, Any]) -> Usage:
        if self._api_format == "anthropic":
            return usage_from_anthropic(usage)
        if self._kind == "embeddings":
            return usage_from_openai_embeddings(usage)
        return usage_from_openai(usage)

    def _parse(self) -> tuple[Usage | None, bool]:
        """(usage, done) of what was fed so far."""
        if not self._over and len(self._buf) <= ORJSON_PARSE_MAX:
            try:
                obj = orjson.loads(self._buf)
            except orjson.JSONDecodeError:
                return None, False
            if not isinstance(obj, dict):
                return None, False
            embeddings = self._kind == "embeddings"
            return usage_from_body(self._api_format, obj, embeddings=embeddings), True
        tail = self._tail if self._over else self._buf[-OVERSIZE_TAIL_BYTES:]
        salvaged = _salvage_usage(tail)
        if salvaged is None:
            return None, False
        return self._usage_of(salvaged), tail.rstrip().endswith(b"}")

    def usage(self) -> Usage | None:
        return self._parse()[0]

    def result(self) -> TapResult:
        usage, done = self._parse()
        text = _Text(self._counter)
        if not self._over:
            for key in _BODY_KEYS[self._kind]:
                text.grab(self._buf, key)
        return TapResult(
            usage=usage,
            completion_text=text.text(),
            events=0,
            done=done,
            completion_tokens_counted=text.counted,
            completion_bytes_dropped=text.dropped,
            truncated=self._over,
        )


# -- hiding the injected usage chunk ------------------------------------------------

# The most bytes of one incomplete event the stripper holds back from the client.
# A bigger event cannot be the small usage chunk, so it is forwarded as it comes.
STRIPPER_HOLD_MAX = 1 * MiB

_NULL_USAGE_COMPACT = b',"usage":null'
# Any spacing, either side of the member (json.dumps-style servers).
_NULL_USAGE = re.compile(rb'\s*,\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,\s*')


class UsageChunkStripper:
    """Removes from an OpenAI Chat Completions / Completions stream what
    ``stream_options.include_usage`` added (other formats carry usage the
    client asked for and must not be given a stripper).

    Used when the sidecar injected include_usage into a request whose client did
    not ask for it: the usage-only chunk (a usage object with ``"choices":[]``,
    or with no choices at all as some compatible servers send it) is dropped, a
    usage object riding on a content chunk is cut out of it, and ``"usage":null``
    is removed from every other chunk, so the client gets the stream it would
    have got without the sidecar. Only complete events are
    returned; at most one incomplete event is held (up to STRIPPER_HOLD_MAX).
    The tap is fed the unstripped bytes separately.
    """

    __slots__ = ("_cr", "_passthrough", "_pending", "_recent")

    def __init__(self) -> None:
        self._pending = bytearray()
        self._cr = False
        self._passthrough = False  # forwarding an oversized event until its end
        self._recent = b""  # last bytes forwarded in passthrough, to spot a split separator

    def feed(self, data: bytes | memoryview) -> bytes:
        if not data:
            return b""
        if type(data) is not bytes:
            data = bytes(data)
        if not self._cr and _CR in data:
            self._cr = True
        out: list[Buf] = []
        if self._passthrough:
            data = self._pass(data, out)
            if not data:
                return b"".join(out)
        pending = self._pending
        if pending:
            scan = max(len(pending) - _SEP_OVERLAP, 0)
            pending += data
            buf: Buf = pending
        else:
            scan = 0
            buf = data
            if (
                not self._cr
                and b'"usage"' not in buf
                and buf.endswith(b"\n\n")
                and not out
            ):
                return buf  # the common case when include_usage was not injected upstream
            if not self._cr and not out and buf.endswith(b"\n\n"):
                # Whole events with only "usage":null in them (every chunk of an OpenAI
                # stream whose usage we asked for): one C-level replace for the read.
                # The pattern holds no newline, so it never spans two events.
                stripped = buf.replace(_NULL_USAGE_COMPACT, b"")
                if b'"usage"' not in stripped:
                    return stripped
        start = 0
        for ev_start, ev_end, nxt in _events_from(buf, scan, self._cr):
            if buf.find(b'"usage"', ev_start, ev_end) < 0:
                out.append(buf[ev_start:nxt])
            else:
                kept = _strip(buf[ev_start:ev_end])
                if kept:  # a dropped event takes its separator with it
                    out.append(kept + buf[ev_end:nxt])
            start = nxt
        if buf is pending:
            if start:
                del pending[:start]
        elif start < len(buf):
            pending += buf[start:] if start else buf
        if len(pending) > STRIPPER_HOLD_MAX:
            out.append(bytes(pending))
            self._recent = bytes(pending[-_SEP_OVERLAP:])
            self._pending = bytearray()
            self._passthrough = True
        return b"".join(out)

    def _pass(self, raw: bytes, out: list[Buf]) -> bytes:
        """Forward the oversized event's bytes up to its end; return what follows it."""
        probe = self._recent + raw
        end, nxt = _first_boundary(probe, 0, self._cr)
        if end < 0:
            out.append(raw)
            self._recent = probe[-_SEP_OVERLAP:]
            return b""
        cut = nxt - len(self._recent)
        out.append(raw[:cut])
        self._passthrough = False
        self._recent = b""
        return raw[cut:]

    def flush(self) -> bytes:
        """End of stream: whatever incomplete event is left, as received."""
        pending = self._pending
        self._pending = bytearray()
        self._passthrough = False
        if not self._cr:
            return bytes(pending)
        # At the end a separator's final \r is final too: strip that last event as usual.
        out: list[Buf] = []
        start = 0
        for ev_start, ev_end, nxt in _cr_events(pending, 0, at_end=True):
            kept = _strip(pending[ev_start:ev_end])
            if kept:
                out.append(kept + pending[ev_end:nxt])
            start = nxt
        out.append(pending[start:])
        return b"".join(out)


def _strip(ev: Buf) -> Buf:
    """One event without what include_usage added: b"" for the usage-only chunk."""
    if _NULL_USAGE_COMPACT in ev:
        ev = ev.replace(_NULL_USAGE_COMPACT, b"")
        if b'"usage"' not in ev:
            return ev
    if _has_usage_object(ev):
        if b'"choices":[]' in ev or b'"choices": []' in ev or b'"choices"' not in ev:
            return b""  # the usage-only chunk the client never asked for
        return _cut_usage_object(ev)
    return _NULL_USAGE.sub(b"", ev)


def _events_from(buf: Buf, pos: int, cr: bool) -> list[tuple[int, int, int]]:
    if cr:
        return _cr_events(buf, pos)
    out: list[tuple[int, int, int]] = []
    start = 0
    find = buf.find
    i = find(b"\n\n", pos)
    while i >= 0:
        out.append((start, i, i + 2))
        start = i + 2
        i = find(b"\n\n", start)
    return out


def _cut_usage_object(ev: Buf) -> Buf:
    """Remove a ``"usage":{...}`` member (with its comma) from an event's JSON."""
    n = len(ev)
    i = ev.find(b'"usage"')
    while i >= 0:
        start = _object_value_at(ev, i + 7, n)
        if start >= 0:
            end = _object_end(ev, start)
            if end < 0:
                return ev
            j = i
            while j > 0 and ev[j - 1] in b" \t":
                j -= 1
            if j > 0 and ev[j - 1] == 0x2C:  # a preceding comma goes with it
                return ev[: j - 1] + ev[end:]
            k = end
            while k < n and ev[k] in b" \t":
                k += 1
            if k < n and ev[k] == 0x2C:  # first member: take the following comma
                k += 1
                while k < n and ev[k] in b" \t":
                    k += 1
                return ev[:i] + ev[k:]
            return ev[:i] + ev[end:]
        i = ev.find(b'"usage"', i + 7)
    return ev


__all__ = [
    "COMPLETION_TEXT_CAP",
    "DEFAULT_BODY_CAP",
    "Tap",
    "TapResult",
    "UsageChunkStripper",
    "make_tap",
]


# -- deferred tapping ---------------------------------------------------------------

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


def _event_at(buf: bytes, i: int) -> bytes | None:
    """The complete ``\n\n``-terminated event containing index ``i``, separator included."""
    if i < 0:
        return None
    end = buf.find(b"\n\n", i)
    if end < 0:
        return None  # incomplete: let the full parse decide what a cut event means
    start = buf.rfind(b"\n\n", 0, i)
    return buf[start + 2 if start >= 0 else 0 : end + 2]
