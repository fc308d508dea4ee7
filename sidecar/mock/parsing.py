"""Reading requests off the wire: the request line and the few headers the mock acts on
(length, chunked, connection, expect, x-mock-*), and chunked request bodies."""

from __future__ import annotations

from typing import Final

MAX_HEAD: Final = 64 * 1024
MAX_BODY: Final = 64 * 1024 * 1024

Head = tuple[bytes, bytes, int, bool, bool, bool, tuple[tuple[bytes, bytes], ...]]


def _header_value(low: bytes, name: bytes) -> bytes | None:
    """Value of header `name` (given as b"\\r\\nname:") in a lower-cased head, or None."""
    i = low.find(name)
    if i < 0:
        return None
    start = i + len(name)
    j = low.find(b"\r\n", start)
    return low[start : j if j >= 0 else len(low)].strip()


def parse_head(head: bytes) -> Head:
    """Request line and the few headers the mock acts on. The full header list is parsed
    later, and only if a test asks for it (MockRequest.raw_headers)."""
    eol = head.find(b"\r\n")
    parts = (head if eol < 0 else head[:eol]).split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise ValueError("bad request line")
    method, target, version = parts
    close = version == b"HTTP/1.0"
    length = 0
    chunked = expect = False
    mock: tuple[tuple[bytes, bytes], ...] = ()
    if eol >= 0:
        # Header names are case-insensitive: search a lower-cased copy, anchored at line starts.
        low = head.lower()
        value = _header_value(low, b"\r\ncontent-length:")
        if value is not None:
            length = int(value)
            if length < 0:
                raise ValueError("negative content-length")
        value = _header_value(low, b"\r\ntransfer-encoding:")
        chunked = value is not None and b"chunked" in value
        value = _header_value(low, b"\r\nconnection:")
        if value is not None:
            if b"close" in value:
                close = True
            elif b"keep-alive" in value:
                close = False
        expect = _header_value(low, b"\r\nexpect:") == b"100-continue"
        if b"\r\nx-mock-" in low:
            items: list[tuple[bytes, bytes]] = []
            for line in low[eol + 2 :].split(b"\r\n"):
                if line.startswith(b"x-mock-"):
                    name, _, val = line.partition(b":")
                    items.append((name.strip(), val.strip()))
            mock = tuple(items)
    return method, target, length, chunked, close, expect, mock


def dechunk(buf: bytes | bytearray, start: int) -> tuple[bytes, int] | None:
    """A chunked request body starting at `start`: (body, end offset), or None if incomplete.
    Trailers are skipped. Raises ValueError on a bad size line or an oversized body."""
    out = bytearray()
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)
            if end < 0:
                return None
            return bytes(out), end + 4
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2
        if len(out) > MAX_BODY:
            raise ValueError("chunked body too large")
