"""The include_usage stripper: hides from the client the usage the sidecar asked for.

``UsageChunkStripper`` frames the stream with ``framing.split_events`` (the same
framing as the taps) and rewrites only the events that mention ``"usage"``;
whole reads without a usage object go through untouched or with one C-level
replace.
"""

from __future__ import annotations

import re

from sidecar.sse.framing import _CR, _SEP_OVERLAP, Buf, _first_boundary, split_events
from sidecar.sse.scan import _has_usage_object, _usage_values
from sidecar.sse.tap import MiB

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

    __slots__ = ("_bounds", "_cr", "_passthrough", "_pending", "_recent")

    def __init__(self) -> None:
        self._pending = bytearray()
        self._bounds: list[int] = []  # split_events' answer for the read at hand, reused
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
        if not (pending or out or self._cr) and data.endswith(b"\n\n"):
            if b'"usage"' not in data:
                return data  # the common case when include_usage was not injected upstream
            # Whole events with only "usage":null in them (every chunk of an OpenAI
            # stream whose usage we asked for): one C-level replace for the read.
            # The pattern holds no newline, so it never spans two events.
            stripped = data.replace(_NULL_USAGE_COMPACT, b"")
            if b'"usage"' not in stripped:
                return stripped
        buf = split_events(pending, data, self._cr, self._bounds)
        start = 0
        ends = iter(self._bounds)
        for end in ends:
            nxt = next(ends)
            if buf.find(b'"usage"', start, end) < 0:
                out.append(buf[start:nxt])
            else:
                kept = _strip(buf[start:end])
                if kept:  # a dropped event takes its separator with it
                    out.append(kept + buf[end:nxt])
            start = nxt
        if buf is pending and start:
            del pending[:start]
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
        split_events(pending, b"", True, self._bounds, at_end=True)
        start = 0
        ends = iter(self._bounds)
        for end in ends:
            nxt = next(ends)
            if pending.find(b'"usage"', start, end) < 0:
                # As in feed: an event with no usage goes as it is; an empty one (a blank
                # line before the last \r) is not the dropped usage chunk.
                out.append(pending[start:nxt])
            else:
                kept = _strip(pending[start:end])
                if kept:
                    out.append(kept + pending[end:nxt])
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


def _cut_usage_object(ev: Buf) -> Buf:
    """Remove a ``"usage":{...}`` member (with its comma) from an event's JSON."""
    n = len(ev)
    for i, _start, end in _usage_values(ev):
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
    return ev

