"""Edit a JSON object's top-level members in place, byte for byte.

Re-serialising a client's body (``orjson.dumps(orjson.loads(raw))``) is lossy: integers
beyond 64 bits become floats, ``1E2`` becomes ``100.0``, escapes and spacing change.
The provider must see exactly what the client sent apart from the members we edit, so
these functions splice new bytes into the original text instead.

They are not validators: the caller has already parsed ``raw`` with orjson. Only what
an edit must read is checked (the top-level members and, for :func:`set_nested`, the
one nested object); values in between are skipped by matching brackets, stepping over
strings, without looking inside. Python never loops per byte: a compiled pattern jumps
from one string or bracket to the next, and a string's end is found with ``bytes.find``
(memchr), so a megabyte of chat messages costs a few thousand steps.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

import orjson

__all__ = ["JsonEditError", "set_member", "set_nested"]


class JsonEditError(ValueError):
    """``raw`` is not a JSON object this module can edit."""


_QUOTE: Final = ord('"')
_BACKSLASH: Final = ord("\\")
_COLON: Final = ord(":")
_COMMA: Final = ord(",")
_OPEN_OBJECT: Final = ord("{")
_CLOSE_OBJECT: Final = ord("}")
_CLOSERS: Final = {ord("{"): ord("}"), ord("["): ord("]")}
_END: Final = -1  # what _byte_at reports past the end, so callers need no bounds checks

_WHITESPACE: Final = re.compile(rb"[ \t\n\r]*")
# Inside a container only strings and brackets matter.
_STRUCTURE: Final = re.compile(rb'["\[\]{}]')
# String content from a point outside any escape, up to the first unescaped quote (or
# endpos) and never stopping inside an escape. Strings end by memchr instead where they
# can: this walks every byte, hundreds of times slower. Possessive, so it never
# backtracks; DOTALL so an escape may precede any byte.
_STRING_CONTENT: Final = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+', re.DOTALL)
# An escaped quote further than this from the last one is hopped over with memchr; closer
# ones (tool-call arguments, quoted code) are cheaper to let the regex engine walk.
_SPARSE_QUOTE_GAP: Final = 64
# How far past such a quote the regex engine walks before memchr takes over again.
_REGEX_STRETCH: Final = 4096
_SCALAR: Final = re.compile(
    rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null"
)


class _Object(NamedTuple):
    """Where things are in one scanned object (offsets into the raw bytes)."""

    matches: list[tuple[int, int]]  # value span of each member with the wanted key
    last_value_end: int | None  # None: the object is empty
    close: int  # offset of the closing brace


_Edit = tuple[int, int, bytes]  # replace raw[start:end] with these bytes


def set_member(raw: bytes, key: str, value: bytes) -> bytes:
    """``raw`` with top-level member ``key`` set to the JSON text ``value``.

    ``value`` is already serialised (e.g. ``b'"deepseek-chat"'``) and is trusted, not
    re-parsed. Every top-level occurrence of ``key`` is replaced: parsers keep the last
    of duplicate keys, and replacing all of them keeps every reading the same. When
    absent, the member is appended after the last one (or is the only member of an
    empty object). Everything else in ``raw`` is kept byte for byte.
    """
    top = _scan_top(raw, key)
    return _splice(raw, _member_edits(top, key, value))


def set_nested(raw: bytes, key: str, sub_key: str, value: bytes) -> bytes:
    """``raw`` with ``raw[key][sub_key]`` set to the JSON text ``value``.

    Where ``key`` is an object, ``sub_key`` is set inside it as :func:`set_member`
    would, the rest of that object untouched; where it is anything else (null, a
    string...) it becomes ``{"sub_key":value}``; when absent, ``"key":{"sub_key":value}``
    is appended. Each duplicate of ``key`` is edited by the same rules.
    """
    top = _scan_top(raw, key)
    fresh = b"{" + _member(sub_key, value) + b"}"
    if not top.matches:
        return _splice(raw, _member_edits(top, key, fresh))
    edits: list[_Edit] = []
    for start, end in top.matches:
        if raw[start] == _OPEN_OBJECT:
            edits.extend(_member_edits(_scan_object(raw, start, sub_key), sub_key, value))
        else:
            edits.append((start, end, fresh))
    return _splice(raw, edits)


def _member_edits(obj: _Object, key: str, value: bytes) -> list[_Edit]:
    if obj.matches:
        return [(start, end, value) for start, end in obj.matches]
    member = _member(key, value)
    if obj.last_value_end is None:
        return [(obj.close, obj.close, member)]
    # Straight after the last value rather than before the brace, so a pretty-printed
    # body keeps its closing line as it was.
    return [(obj.last_value_end, obj.last_value_end, b"," + member)]


def _member(key: str, value: bytes) -> bytes:
    return orjson.dumps(key) + b":" + value


def _splice(raw: bytes, edits: list[_Edit]) -> bytes:
    # memoryview slices: the untouched stretches are copied once, into the result.
    view = memoryview(raw)
    parts: list[bytes | memoryview] = []
    done = 0
    for start, end, new in edits:
        parts.append(view[done:start])
        parts.append(new)
        done = end
    parts.append(view[done:])
    return b"".join(parts)


def _scan_top(raw: bytes, key: str) -> _Object:
    start = _skip_whitespace(raw, 0)
    if _byte_at(raw, start) != _OPEN_OBJECT:
        raise JsonEditError("body is not a JSON object")
    obj = _scan_object(raw, start, key)
    if _skip_whitespace(raw, obj.close + 1) != len(raw):
        raise JsonEditError(f"unexpected data after the JSON object at byte {obj.close + 1}")
    return obj


def _scan_object(raw: bytes, start: int, key: str) -> _Object:
    """Read the object whose ``{`` is at ``start`` member by member, noting ``key``."""
    wanted = key.encode()
    matches: list[tuple[int, int]] = []
    pos = _skip_whitespace(raw, start + 1)
    if _byte_at(raw, pos) == _CLOSE_OBJECT:
        return _Object(matches, None, pos)
    while True:
        if _byte_at(raw, pos) != _QUOTE:
            raise JsonEditError(f"expected a member name at byte {pos}")
        key_end = _skip_string(raw, pos)
        hit = _key_equals(raw, pos, key_end, wanted, key)
        pos = _skip_whitespace(raw, key_end)
        if _byte_at(raw, pos) != _COLON:
            raise JsonEditError(f"expected ':' at byte {pos}")
        value_start = _skip_whitespace(raw, pos + 1)
        value_end = _skip_value(raw, value_start)
        if hit:
            matches.append((value_start, value_end))
        pos = _skip_whitespace(raw, value_end)
        after = _byte_at(raw, pos)
        if after == _CLOSE_OBJECT:
            return _Object(matches, value_end, pos)
        if after != _COMMA:
            raise JsonEditError(f"expected ',' or '}}' at byte {pos}")
        pos = _skip_whitespace(raw, pos + 1)


def _key_equals(raw: bytes, start: int, end: int, wanted: bytes, key: str) -> bool:
    """Whether the string token raw[start:end] (quotes included) decodes to ``key``."""
    if raw.find(b"\\", start, end) == -1:
        # Unescaped: the bytes are the key's UTF-8 as they stand.
        return end - start - 2 == len(wanted) and raw.startswith(wanted, start + 1)
    try:
        decoded = orjson.loads(raw[start:end])
    except orjson.JSONDecodeError as exc:
        raise JsonEditError(f"bad escape in member name at byte {start}") from exc
    return bool(decoded == key)


def _skip_value(raw: bytes, pos: int) -> int:
    first = _byte_at(raw, pos)
    if first == _QUOTE:
        return _skip_string(raw, pos)
    if first in _CLOSERS:
        return _skip_container(raw, pos)
    scalar = _SCALAR.match(raw, pos)
    if scalar is None:
        raise JsonEditError(f"expected a value at byte {pos}")
    return scalar.end()


def _skip_string(raw: bytes, pos: int) -> int:
    """End of the string whose opening quote is at ``pos``."""
    at = pos + 1  # never inside an escape: parity can be settled from here
    while True:
        quote = raw.find(b'"', at)
        if quote == -1:
            raise JsonEditError(f"unterminated string at byte {pos}")
        if raw[quote - 1] != _BACKSLASH:
            return quote + 1
        if raw[quote - 2] != _BACKSLASH and quote - at >= _SPARSE_QUOTE_GAP:
            # One backslash, preceded by something else, starts an escape (the second
            # byte of one follows a backslash): this quote is content.
            at = quote + 1
            continue
        # A run of backslashes, whose parity decides, or escaped quotes close together.
        walked = _STRING_CONTENT.match(raw, at, quote + 1 + _REGEX_STRETCH)
        assert walked is not None  # the pattern matches the empty string
        at = walked.end()
        if _byte_at(raw, at) == _QUOTE:
            return at + 1


def _skip_container(raw: bytes, pos: int) -> int:
    """End of the array or object opening at ``pos``: brackets matched, strings skipped."""
    # An explicit stack, not recursion: depth costs a list entry, never a Python frame.
    expected = [_CLOSERS[raw[pos]]]
    search = _STRUCTURE.search
    at = pos + 1
    while True:
        token = search(raw, at)
        if token is None:
            raise JsonEditError(f"unterminated array or object at byte {pos}")
        where = token.start()
        first = raw[where]
        if first == _QUOTE:
            at = _skip_string(raw, where)
            continue
        at = where + 1
        if first in _CLOSERS:
            expected.append(_CLOSERS[first])
        elif first != expected.pop():
            raise JsonEditError(f"mismatched bracket at byte {where}")
        elif not expected:
            return at


def _skip_whitespace(raw: bytes, pos: int) -> int:
    match = _WHITESPACE.match(raw, pos)
    assert match is not None  # the pattern also matches the empty string
    return match.end()


def _byte_at(raw: bytes, pos: int) -> int:
    return raw[pos] if pos < len(raw) else _END
