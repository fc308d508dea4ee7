"""Sans-IO tests for upstream response framing: bytes in, results out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.errors import UpstreamProtocolError
from sidecar.http1 import LAST_CHUNK, ChunkedDecoder, frame_chunk, parse_response_head


def test_head_parsed_with_lowercased_names_and_framing() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\nX-Thing:  v \r\n\r\nbody"
    )
    got = parse_response_head(raw, 65536)
    assert got is not None
    head, n = got
    assert raw[n:] == b"body"
    assert head.status == 200 and head.reason == b"OK" and head.http11
    assert head.chunked and head.content_length is None and head.keep_alive
    assert head.get(b"x-thing") == b"v"


def test_head_incomplete_returns_none_until_blank_line() -> None:
    assert parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", 65536) is None


def test_content_length_and_connection_close() -> None:
    got = parse_response_head(b"HTTP/1.1 429 Too Many\r\nContent-Length: 12\r\n"
                              b"Connection: close\r\n\r\n", 65536)
    assert got is not None
    head = got[0]
    assert head.status == 429 and head.content_length == 12 and not head.keep_alive


def test_read_until_close_body_is_not_reusable() -> None:
    got = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\n", 65536)
    assert got is not None and not got[0].keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno-colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"garbage\r\n\r\n",
    ],
)
def test_malformed_heads_raise_protocol_error(raw: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        parse_response_head(raw, 65536)


def test_oversized_head_raises() -> None:
    with pytest.raises(UpstreamProtocolError):
        parse_response_head(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200, 100)


def _decode_all(pieces: list[bytes]) -> tuple[bytes, int, bool]:
    dec = ChunkedDecoder()
    payload = bytearray()
    consumed = 0
    for p in pieces:
        out, used = dec.feed(p)
        for mv in out:
            payload += mv
        consumed += used
        if dec.done:
            break
    return bytes(payload), consumed, dec.done


def test_chunked_decoder_whole_message() -> None:
    body = frame_chunk(b"hello ") + frame_chunk(b"world") + LAST_CHUNK
    payload, consumed, done = _decode_all([body])
    assert payload == b"hello world" and consumed == len(body) and done


def test_chunked_decoder_stops_at_terminator_and_reports_consumed() -> None:
    body = frame_chunk(b"x") + LAST_CHUNK
    payload, consumed, done = _decode_all([body + b"EXTRA"])
    assert done and consumed == len(body) and payload == b"x"


def test_chunked_decoder_extensions_and_trailers() -> None:
    body = b"5;name=v\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"
    payload, consumed, done = _decode_all([body])
    assert payload == b"hello" and done and consumed == len(body)


@pytest.mark.parametrize(
    "raw",
    [b"zz\r\nab\r\n", b"2\r\nabXY", b"-2\r\nab\r\n", b"+2\r\nab\r\n", b"1_0\r\n",
     b"F" * 40 + b"\r\n", b"a" * 2000],
)
def test_chunked_decoder_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        ChunkedDecoder().feed(raw)


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=300), min_size=0, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=30),
)
def test_chunked_decoder_any_split_gives_same_payload(chunks: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(frame_chunk(c) for c in chunks) + LAST_CHUNK
    points = sorted({c % (len(wire) + 1) for c in cuts})
    pieces = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    payload, consumed, done = _decode_all([p for p in pieces if p])
    assert payload == b"".join(chunks)
    assert done and consumed == len(wire)
