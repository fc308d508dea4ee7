"""SSE framing: where events end, with any line endings, and what an event's data is.

Owns the one event-splitting loop that the streaming taps, the include_usage
stripper (and a stream translator) share: ``split_events`` joins a read to the
held incomplete event and finds the complete events in it.

This is per-read hot-path code. Events are found with ``bytes.find`` on one
buffer; separators are ``\\n\\n`` on the fast path, and once a ``\\r`` shows up in
a stream its owner passes ``cr=True`` for good, switching to a regex that
accepts every SSE line ending (``\\r\\n``, ``\\n``, ``\\r``): slower, always
correct. ``split_events`` reports events as index pairs in a list its caller
owns and reuses, so a read costs one call and no allocation beyond the caller's
own slices, and nothing is called per event.
"""

from __future__ import annotations

import re

# A separator ("\r\n\r\n" at most) may straddle two reads: re-scan this many
# bytes of what was already held.
_SEP_OVERLAP = 3

# Two consecutive SSE line terminators (\r\n | \n | \r). The first may not be a
# bare \r followed by \n (that is one \r\n terminator, not two).
_BOUNDARY = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
_CR = 0x0D
_LF = 0x0A

Buf = bytes | bytearray


def split_events(
    held: bytearray, data: Buf, cr: bool, bounds: list[int], at_end: bool = False
) -> Buf:
    """The complete events in ``held + data``, as (end, next) pairs in ``bounds``.

    ``bounds`` is cleared and filled with ``end, next, end, next, ...``: event k
    spans ``buf[next of k-1 : end]`` (the first starts at 0) and its separator
    ``buf[end:next]``. Returned is ``buf``, what the indices point into:

    * nothing held: ``data`` itself, whose incomplete tail (after the last
      ``next``) is already appended to ``held``;
    * else ``held``, with ``data`` appended: the caller removes what it consumed
      once done with the events (``del held[:next]``), so no copy is made.

    With ``cr``, a separator ending in the buffer's last byte with a \\r is not
    taken unless ``at_end``: that \\r may be the first half of a \\r\\n still in
    flight, and taking it would make the split depend on where reads end.
    ``at_end`` (with empty ``data``) looks at everything held once more.
    """
    if held:
        scan = 0 if at_end else max(len(held) - _SEP_OVERLAP, 0)
        held += data
        buf: Buf = held
    else:
        scan = 0
        buf = data
    bounds.clear()
    append = bounds.append
    if not cr:
        find = buf.find
        i = find(b"\n\n", scan)
        while i >= 0:
            append(i)
            i += 2
            append(i)
            i = find(b"\n\n", i)
    else:
        n = len(buf)
        search = _BOUNDARY.search
        m = search(buf, scan)
        while m is not None:
            end = m.end()
            if end == n and buf[n - 1] == _CR and not at_end:
                break
            append(m.start())
            append(end)
            m = search(buf, end)
    if buf is not held:
        rest = bounds[-1] if bounds else 0
        if rest < len(buf):
            held += buf[rest:] if rest else buf
    return buf


def _first_boundary(buf: Buf, pos: int, cr: bool) -> tuple[int, int]:
    """(end of the event, start of the next) for the first separator at/after pos, or (-1, -1).

    The same separators as ``split_events`` (a trailing \\r is not yet one).
    """
    if not cr:
        i = buf.find(b"\n\n", pos)
        return (i, i + 2) if i >= 0 else (-1, -1)
    m = _BOUNDARY.search(buf, pos)
    if m is None or (m.end() == len(buf) and buf[-1] == _CR):
        return -1, -1
    return m.start(), m.end()


def _event_at(buf: bytes, i: int) -> bytes | None:
    """The complete ``\\n\\n``-terminated event containing index ``i``, separator included."""
    if i < 0:
        return None
    end = buf.find(b"\n\n", i)
    if end < 0:
        return None  # incomplete: let the full parse decide what a cut event means
    start = buf.rfind(b"\n\n", 0, i)
    return buf[start + 2 if start >= 0 else 0 : end + 2]


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
