"""The streaming taps: event handling per SSE dialect, on the shared framing.

``_SseTap`` holds the one incomplete event (bounded by ``body_cap``), frames
reads with ``framing.split_events`` and hands each complete event to its
subclass: ``_ChatTap`` (Chat Completions, legacy Completions), ``_ResponsesTap``
and ``_AnthropicTap``. Which events are decoded is decided by a cheap byte scan
(``"usage":{``, ``message_start``, ``message_delta``, ``response.completed``
...). Only those are parsed with orjson: one or two per stream. (The one
exception is a provider that puts usage in every chunk, e.g. vLLM's continuous
usage stats: the chat tap only remembers the last such chunk and decodes it at
result().)
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from sidecar.endpoints import EndpointKind
from sidecar.sse.framing import (
    _CR,
    _SEP_OVERLAP,
    Buf,
    _first_boundary,
    _payload,
    split_events,
)
from sidecar.sse.scan import (
    ORJSON_PARSE_MAX,
    _chat_usage_dict,
    _decode,
    _dict,
    _has_usage_object,
    _salvage_usage,
)
from sidecar.sse.tap import (
    OVERSIZE_HEAD_BYTES,
    OVERSIZE_TAIL_BYTES,
    Counter,
    Tap,
    TapResult,
)
from sidecar.sse.text import (
    _ANTHROPIC_KEYS,
    _CHAT_KEYS,
    _COMPLETIONS_KEYS,
    _STREAM_KEYS,
    _Text,
)
from sidecar.usage import (
    Usage,
    usage_from_anthropic_stream,
    usage_from_openai,
    usage_from_openai_responses,
)

_RESPONSES_TERMINAL = (b"response.completed", b"response.incomplete", b"response.failed")
_RESPONSES_TERMINAL_LINES = tuple(b"event: " + t for t in _RESPONSES_TERMINAL)
_AUDIO_DELTA = b"event: response.audio.delta\n"
_AUDIO_DELTA_DATA = b'data: {"type":"response.audio.delta"'


def _stream_tap(kind: EndpointKind, body_cap: int, counter: Counter | None) -> Tap:
    if kind == "messages":
        return _AnthropicTap(body_cap, counter)
    if kind == "responses":
        return _ResponsesTap(body_cap, counter)
    keys = _STREAM_KEYS.get(kind, _CHAT_KEYS + _COMPLETIONS_KEYS)
    return _ChatTap(keys, body_cap, counter)


class _SseTap(Tap):
    """Event splitting shared by the streaming taps; subclasses handle complete events."""

    __slots__ = (
        "_bounds",
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
        self._bounds: list[int] = []  # split_events' answer for the read at hand, reused
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
        buf = split_events(pending, data, self._cr, self._bounds)
        start = 0
        on_event = self._event
        cap = self._cap
        ends = iter(self._bounds)
        for end in ends:
            if end - start > cap:
                self._too_big(buf, start, end)
            elif end > start:
                on_event(buf[start:end])
            start = next(ends)
        if buf is pending and start:
            del pending[:start]
        if len(pending) > self._cap and _held_event_len(pending) > self._cap:
            self._start_skipping()

    def _too_big(self, buf: Buf, start: int, end: int) -> None:
        """A complete event over the cap, read in one go: treated as if it had been
        skipped, so that the result never depends on how the reads were split."""
        self._events += 1
        self._truncated = True
        self._oversized(
            # Bounded by the event's end: a head running on into the next events took
            # their markers for this one's (a response.completed seen in an event
            # before it), unlike an event skipped across reads (found by hypothesis).
            bytes(buf[start : min(start + OVERSIZE_HEAD_BYTES, end)]),
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
        split_events(pending, b"", True, self._bounds, at_end=True)
        start = 0
        ends = iter(self._bounds)
        for end in ends:
            if end > start:
                self._event(pending[start:end])
            start = next(ends)
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




# The most bytes of a separator that can begin in one read and end in the next ("\r\n\r").
_SEP_PREFIX_MAX = 3


def _held_event_len(pending: bytearray) -> int:
    """The held event's own length: without the line ends it may finish with, which can
    be the first half of its separator. Counting them against the cap made an event of
    exactly ``body_cap`` bytes oversized or not depending on where the reads were split
    (found by tests/fuzz_atheris.py). Asked only when the held bytes pass the cap."""
    end = len(pending)
    stop = max(end - _SEP_PREFIX_MAX, 0)
    while end > stop and pending[end - 1] in (0x0A, 0x0D):
        end -= 1
    return end


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
            # The last usage-carrying event decides, even when it does not decode: a
            # fallback to an earlier one would depend on whether a result() decoded that
            # one before the next arrived, i.e. on when results were asked for and how
            # the reads were split (found by tests/test_fuzz.py).
            self._usage_dict = _chat_usage_dict(ev)
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

