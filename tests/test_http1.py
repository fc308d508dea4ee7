"""Sans-IO tests for upstream response framing: bytes in, results out."""

from __future__ import annotations

import gc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.errors import UpstreamProtocolError
from sidecar.http1 import LAST_CHUNK, MAX_TRAILER_BYTES, ResponseParser, frame_chunk
from sidecar.upstream import UpstreamConnection


def _parse(*reads: bytes, max_head: int = 65536) -> tuple[ResponseParser, bytes]:
    """Feed the reads in order; return the parser and all payload it found."""
    p = ResponseParser(max_head)
    payload = bytearray()
    for r in reads:
        p.feed(r)
        for piece in p.take():
            payload += piece
    return p, bytes(payload)


def test_head_parsed_with_lowercased_names_and_framing() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\nX-Thing:  v \r\n\r\n5\r\nhello\r\n"
    )
    p, payload = _parse(raw)
    head = p.head
    assert head is not None
    assert raw[p.body_start:] == b"5\r\nhello\r\n" and payload == b"hello"
    assert head.status == 200 and head.reason == b"OK" and head.http11
    assert head.chunked and head.content_length is None and head.keep_alive
    assert head.get(b"x-thing") == b"v" and head.get(b"content-type") == b"text/event-stream"
    assert not p.done


def test_head_split_across_reads_gives_body_start_in_the_last_read() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
    for cut in range(1, len(raw) - 3):
        p = ResponseParser(65536)
        p.feed(raw[:cut])
        assert p.head is None and p.seen
        p.feed(raw[cut:])
        assert p.head is not None
        assert raw[cut:][p.body_start:] == b"abc"
        assert p.done and p.take() == [b"abc"]


def test_head_incomplete_leaves_head_none() -> None:
    p, _ = _parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n")
    assert p.head is None and not p.done


def test_content_length_and_connection_close() -> None:
    p, payload = _parse(b"HTTP/1.1 429 Too Many\r\nContent-Length: 12\r\n"
                        b"Connection: close\r\n\r\n{\"e\":\"slow\"}")
    assert p.head is not None
    assert p.head.status == 429 and p.head.content_length == 12 and not p.head.keep_alive
    assert payload == b'{"e":"slow"}' and p.done


def test_read_until_close_body_is_not_reusable_and_never_done() -> None:
    p, payload = _parse(b"HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\nsome", b" more")
    assert p.head is not None and not p.head.keep_alive
    assert payload == b"some more" and not p.done  # the close is its end


def test_interim_responses_are_skipped() -> None:
    raw = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
           b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    p, payload = _parse(raw)
    assert p.head is not None and p.head.status == 200 and p.head.get(b"link") is None
    assert raw[p.body_start:] == b"ok" and payload == b"ok" and p.done


def test_http10_response_without_keep_alive() -> None:
    p, _ = _parse(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert p.head is not None and not p.head.http11 and not p.head.keep_alive and p.done


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno-colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        b"garbage\r\n\r\n",
    ],
)
def test_malformed_heads_raise_protocol_error(raw: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        _parse(raw)


@pytest.mark.parametrize("before", [b"\r\n\r\n", b"\n\r\n\r\n\r", b"\r\n"])
def test_blank_lines_before_a_head_are_not_its_end(before: bytes) -> None:
    # Found by tests/test_fuzz.py: llhttp skips CR/LF bytes before a status line, but a
    # CRLF CRLF among them was taken for the end of the head, so body_start pointed at
    # the provider's head (relayed to the client as body) or, split, before the read.
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    for raw in (before + head + b"ab", interim + before + head + b"ab"):
        for cut in range(len(raw) - 2):  # every split with the head's end in the 2nd read
            p = ResponseParser(65536)
            p.feed(raw[:cut])
            p.feed(raw[cut:])
            assert p.head is not None and p.head.content_length == 2
            assert raw[cut:][p.body_start:] == b"ab", (raw, cut)


@pytest.mark.parametrize("value", [b"chunked\t", b"chunked \t", b"CHUNKED\t ", b"chunked\t\t"])
def test_chunked_followed_by_a_tab_is_refused_not_framed_two_ways(value: bytes) -> None:
    # Found by tests/test_fuzz.py: llhttp reads a body whose transfer-encoding is
    # "chunked" plus a trailing tab until the close (not chunked), while the head,
    # stripped of the tab, said chunked: the relay forwarded the chunk frames verbatim,
    # its parser never saw the end (the stream stayed open until the provider closed),
    # and a payload-mode client got the frames framed again.
    raw = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: " + value + b"\r\n\r\n"
           b"2\r\nab\r\n0\r\n\r\n")
    for pieces in ([raw], [raw[:30], raw[30:]]):
        p = ResponseParser(65536)
        with pytest.raises(UpstreamProtocolError, match="transfer-encoding"):
            for piece in pieces:
                p.feed(piece)
    # Trailing spaces are plain whitespace to llhttp too: still chunked, and it ends.
    p = ResponseParser(65536)
    p.feed(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked  \r\n\r\n2\r\nab\r\n0\r\n\r\n")
    assert p.head is not None and p.head.chunked and p.take() == [b"ab"] and p.done


def test_oversized_head_raises_even_when_it_never_ends() -> None:
    with pytest.raises(UpstreamProtocolError, match="exceeds 100"):
        _parse(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200, max_head=100)
    with pytest.raises(UpstreamProtocolError, match="exceeds 100"):
        _parse(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200 + b"\r\n\r\n", max_head=100)


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_chunked_whole_message() -> None:
    p, payload = _parse(CHUNKED_HEAD + frame_chunk(b"hello ") + frame_chunk(b"world") + LAST_CHUNK)
    assert payload == b"hello world" and p.done and not p.extra


def test_bytes_after_the_last_chunk_are_flagged_not_parsed() -> None:
    for junk in (b"EXTRA", b"HTTP/1.1 200 OK\r\n"):
        p, payload = _parse(CHUNKED_HEAD + frame_chunk(b"x") + LAST_CHUNK + junk)
        assert p.done and p.extra and payload == b"x"
        p2, _ = _parse(CHUNKED_HEAD + frame_chunk(b"x") + LAST_CHUNK, junk)
        assert p2.done and p2.extra


def test_a_whole_second_response_after_ours_is_not_parsed() -> None:
    """A desynced provider: our response and another one in the same read. The head,
    body start and payload stay ours; the second's never reach the pieces."""
    second = (b"HTTP/1.1 201 Created\r\ncontent-length: 8\r\nx-evil: 1\r\n\r\nSMUGGLED")
    for ours, payload_want in ((CHUNKED_HEAD + frame_chunk(b"x") + LAST_CHUNK, b"x"),
                               (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", b"ok")):
        p, payload = _parse(ours + second)
        assert p.head is not None and p.head.status == 200, p.head
        assert p.head.get(b"x-evil") is None
        assert p.done and p.extra
        assert p.body_start == ours.index(b"\r\n\r\n") + 4
        if p.head.chunked:
            assert payload == payload_want


def test_chunk_extensions_and_trailers() -> None:
    p, payload = _parse(CHUNKED_HEAD + b"5;name=v\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n")
    assert payload == b"hello" and p.done and not p.extra
    assert p.head is not None and p.head.get(b"x-trailer") is None


def test_oversized_trailers_raise() -> None:
    trailers = b"".join(b"X-T%d: %b\r\n" % (i, b"v" * 100) for i in range(MAX_TRAILER_BYTES // 100))
    with pytest.raises(UpstreamProtocolError, match="trailer"):
        _parse(CHUNKED_HEAD + b"0\r\n" + trailers + b"\r\n")


@pytest.mark.parametrize(
    "raw",
    [b"zz\r\nab\r\n", b"2\r\nabXY", b"-2\r\nab\r\n", b"+2\r\nab\r\n", b"1_0\r\n",
     b"F" * 40 + b"\r\n"],
)
def test_malformed_chunks_raise(raw: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        _parse(CHUNKED_HEAD, raw)


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=300), min_size=0, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=30),
)
def test_any_split_gives_same_head_payload_and_end(chunks: list[bytes], cuts: list[int]) -> None:
    wire = CHUNKED_HEAD + b"".join(frame_chunk(c) for c in chunks) + LAST_CHUNK
    points = sorted({c % (len(wire) + 1) for c in cuts})
    pieces = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    p = ResponseParser(65536)
    payload = bytearray()
    raw_body = bytearray()
    for piece in (x for x in pieces if x):
        waiting = p.head is None
        p.feed(piece)
        if waiting and p.head is not None:
            raw_body += piece[p.body_start:]
        elif not waiting:
            raw_body += piece
        for out in p.take():
            payload += out
    assert p.head is not None and p.done and not p.extra
    assert payload == b"".join(chunks)
    assert bytes(raw_body) == wire[len(CHUNKED_HEAD):]  # what the relay forwards verbatim


def test_one_parser_serves_consecutive_responses_on_a_connection() -> None:
    p = ResponseParser(65536)
    p.feed(CHUNKED_HEAD + frame_chunk(b"a") + LAST_CHUNK)
    assert p.done and p.take() == [b"a"]
    p.reset(65536)
    assert p.head is None and not p.done and not p.seen
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert p.head is not None and p.head.content_length == 2
    assert p.done and p.take() == [b"ok"] and not p.extra


def test_a_parser_mid_body_keeps_no_per_response_leftovers() -> None:
    # Every open stream holds its parser: once the head is built, the parser keeps no
    # header list or head buffer of its own, and common reasons are one shared object.
    a, _ = _parse(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n", b"Transfer-Encoding: chunked\r\n\r\n")
    b, _ = _parse(CHUNKED_HEAD + frame_chunk(b"x"))
    assert a.head is not None and b.head is not None
    assert a.head.reason is b.head.reason == b"OK"
    for p in (a, b):
        assert p.seen and not p.done
        with pytest.raises(AttributeError):
            p._headers.append((b"x", b"y"))  # immutable: never shared by accident
    # a trailer after the last chunk is still only counted
    a.feed(frame_chunk(b"y") + b"0\r\nX-T: v\r\n\r\n")
    assert a.done and a.take() == [b"y"]


def test_reset_after_a_body_the_parser_did_not_finish_starts_clean() -> None:
    p = ResponseParser(65536)
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")  # the relay counts the rest
    assert not p.done
    p.reset(65536)
    p.feed(CHUNKED_HEAD + frame_chunk(b"x") + LAST_CHUNK)
    assert p.head is not None and p.head.chunked
    assert p.done and p.take() == [b"x"]


def _parsers_alive() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is ResponseParser)


def test_a_dropped_parser_is_freed_without_the_cyclic_gc() -> None:
    # llhttp keeps the callbacks it was given. Bound methods made each parser and its
    # llhttp a cycle that lingered until the (rarely run) cyclic GC: ~1 KiB per closed
    # provider connection under churn. The shared callbacks hold no parser.
    gc.collect()
    gc.disable()
    try:
        before = _parsers_alive()
        whole = CHUNKED_HEAD + frame_chunk(b"x") + LAST_CHUNK
        for raw in (CHUNKED_HEAD + frame_chunk(b"x"), whole, b"HTTP/1.1 200 OK\r\nContent-"):
            p = ResponseParser(65536)
            p.feed(raw)
            assert _parsers_alive() == before + 1
            del p
            assert _parsers_alive() == before
    finally:
        gc.enable()
        gc.collect()


def test_parsers_on_two_threads_never_see_each_others_callbacks() -> None:
    # The shared callbacks find their parser per thread: the sidecar parses on one
    # thread, but the e2e tests parse client-side on another at the same time.
    import sys
    import threading

    def work(tag: bytes, out: list[bool]) -> None:
        raw = (b"HTTP/1.1 200 " + tag + b"\r\nX-Tag: " + tag + b"\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + frame_chunk(tag) + LAST_CHUNK)
        for _ in range(3000):
            p, payload = _parse(*[raw[i:i + 7] for i in range(0, len(raw), 7)])
            head = p.head
            out.append(head is not None and head.reason == tag and payload == tag
                       and head.get(b"x-tag") == tag and p.done)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        results: dict[bytes, list[bool]] = {b"Alpha": [], b"Omega": []}
        threads = [threading.Thread(target=work, args=(t, r)) for t, r in results.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(old)
    assert all(len(r) == 3000 and all(r) for r in results.values())


def test_callbacks_outside_a_feed_fail_loudly() -> None:
    p = ResponseParser(65536)
    p.feed(CHUNKED_HEAD)
    with pytest.raises(AssertionError):
        ResponseParser.on_message_complete()  # this thread's Feeding is clear between feeds
    with pytest.raises(UpstreamProtocolError):
        p.feed(b"zz\r\n")  # a bad chunk size still raises once Feeding was cleared


def test_a_lost_provider_connection_drops_its_parser() -> None:
    class Pool:
        def forget(self, conn: object, was_idle: bool) -> None:
            pass

    gc.collect()
    gc.disable()
    try:
        before = _parsers_alive()
        conn = UpstreamConnection(Pool())  # type: ignore[arg-type]
        conn.parser = ResponseParser(65536)
        conn.parser.feed(CHUNKED_HEAD)
        conn.connection_lost(None)
        assert conn.parser is None
        assert _parsers_alive() == before
    finally:
        gc.enable()
        gc.collect()
