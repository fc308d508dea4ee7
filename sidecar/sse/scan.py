"""Usage scanning: byte-level JSON helpers that find, cut out and decode usage.

Which events are decoded is decided by a cheap byte scan (``"usage":{`` ...);
these helpers do that scan without a JSON parse (``_has_usage_object``,
``_object_end``), salvage a usage object from the tail of an event or body too
big to parse (``_salvage_usage``), and decode the few events and kept text that
do get parsed (``_decode``, ``_unescape``), choosing the parser by size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from sidecar.sse.framing import Buf, _payload

KiB = 1024

# orjson parses fast but takes ~13x its input in scratch memory while it runs
# (measured with tracemalloc: a 1 MiB JSON string peaks at 14 MB). Inputs up to
# this size get orjson; bigger ones either the stdlib parser (2x, half the
# speed) for kept text, or no full parse at all for bodies (see _BodyTap).
ORJSON_PARSE_MAX = 256 * KiB

# A "usage" object bigger than this is not one; stops the brace scan early.
USAGE_OBJECT_MAX = 16 * KiB


_QUOTE = 0x22
_BACKSLASH = 0x5C
_SPACE = 0x20


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
    for _key, start, end in _usage_values(tail, from_end=True):
        if end > 0:
            try:
                obj = orjson.loads(bytes(tail[start:end]))
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                return obj
    return None


def _usage_values(buf: Buf, from_end: bool = False) -> Iterator[tuple[int, int, int]]:
    """(index of the key, start, end or -1) of each ``"usage"`` member whose value is
    an object, first to last (or last to first); end as ``_object_end`` gives it."""
    n = len(buf)
    i = buf.rfind(b'"usage"') if from_end else buf.find(b'"usage"')
    while i >= 0:
        start = _object_value_at(buf, i + 7, n)
        if start >= 0:
            yield i, start, _object_end(buf, start)
        i = buf.rfind(b'"usage"', 0, i) if from_end else buf.find(b'"usage"', i + 7)


