"""Sans-IO tests for the client-side request reader: bytes in, requests (or an error) out.

The reader wraps one httptools parser per connection; these tests never open a socket.
The differential tests at the end hold it to what the h11-based reader it replaced did,
and pin the few places where the two differ on purpose.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.downstream import ParsedRequest, RequestReader
from sidecar.errors import BodyTooLarge, RequestError

MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024

Fields = tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes, bool, bool]


def read(*chunks: bytes, max_head: int = MAX_HEAD, max_body: int = MAX_BODY) -> RequestReader:
    reader = RequestReader(max_head, max_body)
    for chunk in chunks:
        reader.feed(chunk)
    return reader


def fields(r: ParsedRequest) -> Fields:
    return (r.method, r.target, r.headers, r.body, r.http11, r.keep_alive)


def request(method: bytes, target: bytes, body: bytes | None = None, *,
            headers: list[tuple[bytes, bytes]] | None = None, chunked: bool = False,
            version: bytes = b"1.1", host: bytes | None = b"client.example") -> bytes:
    lines = [b"%b %b HTTP/%b" % (method, target, version)]
    if host is not None:
        lines.append(b"Host: " + host)
    lines += [n + b": " + v for n, v in headers or []]
    framed = b""
    if body is not None:
        if chunked:
            lines.append(b"Transfer-Encoding: chunked")
            step = max(1, len(body) // 3)
            for i in range(0, len(body), step):
                part = body[i:i + step]
                framed += b"%x\r\n%b\r\n" % (len(part), part)
            framed += b"0\r\n\r\n"
        else:
            lines.append(b"Content-Length: %d" % len(body))
            framed = body
    return b"\r\n".join(lines) + b"\r\n\r\n" + framed


# ---------------------------------------------------------------------------- plain requests


def test_head_fields_names_lower_cased_values_trimmed() -> None:
    r = read(b"GET /v1/models?x=1 HTTP/1.1\r\nHost: a\r\nX-Request-ID:  abc \t\r\n"
             b"X-Empty:\r\n\r\n")
    (req,) = r.ready
    assert fields(req) == (b"GET", b"/v1/models?x=1",
                           [(b"host", b"a"), (b"x-request-id", b"abc"), (b"x-empty", b"")],
                           b"", True, True)
    assert r.error is None and r.current is None and not r.done


def test_content_length_body() -> None:
    body = b'{"model":"m","messages":[]}'
    (req,) = read(request(b"POST", b"/v1/chat/completions", body)).ready
    assert req.body == body and req.method == b"POST"
    assert (b"content-length", b"%d" % len(body)) in req.headers


def test_chunked_body_with_extensions_and_trailers() -> None:
    raw = (b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n"
           b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    (req,) = read(raw).ready
    assert req.body == b"hello world"
    # Trailers are read past, never mixed into the head.
    assert [n for n, _ in req.headers] == [b"host", b"transfer-encoding"]


def test_request_waits_for_its_whole_body() -> None:
    raw = request(b"POST", b"/p", b"x" * 100)
    r = read(raw[:-1])
    assert not r.ready and r.current is not None and r.current.target == b"/p"
    r.feed(raw[-1:])
    assert r.current is None and r.ready[0].body == b"x" * 100


def test_http10_and_connection_close_end_reading() -> None:
    after = request(b"GET", b"/after")
    r = read(b"GET /a HTTP/1.0\r\n\r\n" + after)
    assert [fields(q)[4:] for q in r.ready] == [(False, False)]
    assert r.done and r.error is None
    r.feed(after)  # nothing after the last request is read, not even as an error
    assert len(r.ready) == 1 and r.error is None

    r = read(request(b"GET", b"/a", headers=[(b"Connection", b"Close")]) + b"garbage\r\n\r\n")
    assert [q.keep_alive for q in r.ready] == [False] and r.error is None


def test_http10_needs_no_host_and_keep_alive_is_not_offered() -> None:
    r = read(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + request(b"GET", b"/b"))
    assert [(q.target, q.http11, q.keep_alive) for q in r.ready] == [(b"/a", False, False)]


def test_expect_100_continue_is_flagged_on_the_head() -> None:
    raw = request(b"POST", b"/p", b"{}", headers=[(b"Expect", b"100-Continue")])
    head, body = raw[:-2], raw[-2:]
    r = read(head)
    assert r.current is not None and r.current.expect_continue
    r.feed(body)
    assert r.ready[0].expect_continue and r.ready[0].body == b"{}"
    # HTTP/1.0 clients cannot wait for it; other expectations are not 100-continue.
    assert not read(request(b"POST", b"/p", b"{}", version=b"1.0",
                            headers=[(b"Expect", b"100-continue")])).ready[0].expect_continue
    assert not read(request(b"POST", b"/p", b"{}",
                            headers=[(b"Expect", b"something")])).ready[0].expect_continue


def test_leading_blank_lines_are_skipped() -> None:
    r = read(b"\r\n" + request(b"GET", b"/a") + b"\r\n" + request(b"GET", b"/b"))
    assert [q.target for q in r.ready] == [b"/a", b"/b"] and r.error is None


# ---------------------------------------------------------------------------- pipelining


def test_pipelined_requests_queue_in_order_and_pending_bytes_shrinks() -> None:
    raws = [request(b"POST", b"/%d" % i, b"b%d" % i * 50) for i in range(4)]
    r = read(b"".join(raws))
    assert [q.target for q in r.ready] == [b"/0", b"/1", b"/2", b"/3"]
    held = r.pending_bytes
    assert sum(map(len, raws)) - 20 <= held <= sum(map(len, raws)) + 20
    r.ready.pop(0)
    assert r.pending_bytes < held


def test_partial_request_counts_towards_pending_bytes() -> None:
    raw = request(b"POST", b"/p", b"z" * 5000)
    r = read(raw[:3000])
    assert 2900 <= r.pending_bytes <= 3100


def test_garbage_after_good_requests_keeps_them_and_queues_the_error_last() -> None:
    good = request(b"GET", b"/1") + request(b"POST", b"/2", b"{}")
    r = read(good + b"NOT HTTP AT ALL\r\n\r\n" + request(b"GET", b"/never"))
    assert [q.target for q in r.ready] == [b"/1", b"/2"]
    assert isinstance(r.error, RequestError) and r.error.status == 400
    assert r.error_head is None and r.done


def test_error_in_a_body_names_its_request() -> None:
    bad = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nX-Request-Id: rid-7\r\n"
           b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")
    r = read(request(b"GET", b"/ok") + bad)
    assert [q.target for q in r.ready] == [b"/ok"]
    assert r.error is not None and r.error.status == 400
    assert r.error_head is not None and r.error_head.target == b"/v1/chat/completions"
    assert (b"x-request-id", b"rid-7") in r.error_head.headers


# Requests as the sidecar sees them: methods, targets and headers drawn at random, bodies
# framed by content-length or chunked, and HTTP/1.0 or "connection: close" only last.
_token = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
_value = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E or c in (0x20, 0x09)).strip(b" \t"))


@st.composite
def _requests(draw: Any) -> tuple[bytes, list[Fields]]:
    n = draw(st.integers(1, 5))
    raw, want = b"", []
    for i in range(n):
        method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD"]))
        target = b"/" + draw(_token).encode() + draw(st.sampled_from([b"", b"?a=1&b=%20"]))
        extra = [(b"x-" + draw(_token).encode(), draw(_value))
                 for _ in range(draw(st.integers(0, 4)))]
        body = draw(st.one_of(st.none(), st.binary(max_size=300)))
        chunked = body is not None and len(body) > 0 and draw(st.booleans())
        last = i == n - 1
        close = last and draw(st.booleans())
        version = b"1.0" if close and draw(st.booleans()) else b"1.1"
        if close and version == b"1.1":
            extra.append((b"connection", b"close"))
        raw += request(method, target, body, headers=extra, chunked=chunked, version=version)
        headers = [(b"host", b"client.example"), *extra]
        if body is not None:
            headers.append((b"transfer-encoding", b"chunked") if chunked
                           else (b"content-length", b"%d" % len(body)))
        want.append((method, target, headers, body or b"", version == b"1.1", not close))
    return raw, want


@settings(max_examples=300, deadline=None)
@given(_requests(), st.data())
def test_any_split_of_a_pipelined_stream_reads_the_same_requests(
    case: tuple[bytes, list[Fields]], data: Any,
) -> None:
    raw, want = case
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    r = read(*pieces)
    assert r.error is None
    assert [fields(q) for q in r.ready] == want


@settings(max_examples=100, deadline=None)
@given(_requests(), st.integers(1, 7))
def test_byte_at_a_time_is_the_same_as_all_at_once(
    case: tuple[bytes, list[Fields]], step: int,
) -> None:
    raw, want = case
    r = read(*(raw[i:i + step] for i in range(0, len(raw), step)))
    assert [fields(q) for q in r.ready] == [fields(q) for q in read(raw).ready] == want


# ---------------------------------------------------------------------------- limits


def test_announced_body_over_the_cap_is_refused_before_it_arrives() -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 2049\r\n\r\n"
    r = read(head, max_body=2048)
    assert isinstance(r.error, BodyTooLarge) and r.error.status == 413
    assert "2048" in str(r.error)
    assert r.error_head is not None and r.error_head.target == b"/v1/chat/completions"
    assert not r.error_head.expect_continue  # its body is never invited


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_at_the_cap_is_read_and_one_more_byte_is_refused(chunked: bool) -> None:
    ok = read(request(b"POST", b"/p", b"a" * 2048, chunked=chunked), max_body=2048)
    assert ok.ready[0].body == b"a" * 2048 and ok.error is None
    big = read(request(b"POST", b"/p", b"a" * 2049, chunked=chunked), max_body=2048)
    assert not big.ready and isinstance(big.error, BodyTooLarge)
    assert big.error_head is not None and big.error_head.target == b"/p"


def test_chunked_body_over_the_cap_is_refused_while_it_streams_in() -> None:
    r = read(b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", max_body=100)
    for _ in range(20):
        r.feed(b"10\r\n" + b"x" * 16 + b"\r\n")
    assert isinstance(r.error, BodyTooLarge) and r.pending_bytes == 0


def test_head_over_the_cap_is_refused_whole() -> None:
    big = request(b"GET", b"/", headers=[(b"X-Big", b"a" * 5000)])
    r = read(big, max_head=4096)
    assert r.error is not None and r.error.status == 400 and "4096" in str(r.error)
    assert r.error_head is None and not r.ready


@pytest.mark.parametrize("step", [1, 100, 4096, 8000])
def test_unfinished_head_over_the_cap_is_refused_without_waiting_for_its_end(step: int) -> None:
    # One endless header value: the reader must not hold it (or wait for its end).
    r = read(b"GET / HTTP/1.1\r\nHost: a\r\nX-Endless: ", max_head=4096)
    sent = 0
    while r.error is None and sent < 100_000:
        r.feed(b"v" * step)
        sent += step
    assert r.error is not None and r.error.status == 400
    assert sent <= 4096 + step


def test_head_under_the_cap_passes_in_any_split() -> None:
    raw = request(b"GET", b"/", headers=[(b"X-Big", b"a" * 3900)])
    assert len(raw) < 4096
    for step in (1, 7, 100, 1000, len(raw)):
        r = read(*(raw[i:i + step] for i in range(0, len(raw), step)), max_head=4096)
        assert r.error is None and len(r.ready) == 1, step


def test_many_small_headers_count_towards_the_cap() -> None:
    r = read(request(b"GET", b"/", headers=[(b"x", b"y")] * 2000), max_head=4096)
    assert r.error is not None and r.error.status == 400


# ---------------------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    "raw",
    [
        b"THIS IS NOT HTTP\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}x",
        b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}",
        b"GET / HTTP/1.1\r\nhost: x\r\nhost: y\r\n\r\n",
        b"GET / HTTP/1.0\r\nhost: x\r\nhost: y\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
        b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost : x\r\n\r\n",
        b"GET /\xc3\xa9 HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\nx: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1 \r\nhost: x\r\n\r\n",
    ],
    ids=["garbage", "header-line", "content-length", "negative-length", "conflicting-lengths",
         "no-host", "two-hosts", "two-hosts-http10", "te-gzip", "te-gzip-chunked", "te-twice",
         "space-before-colon", "non-ascii-target", "space-in-target", "nul-in-value",
         "space-after-version"],
)
def test_malformed_head_is_a_400_with_no_head(raw: bytes) -> None:
    for pieces in ([raw], [raw[i:i + 1] for i in range(len(raw))]):
        r = read(*pieces)
        assert not r.ready
        assert type(r.error) is RequestError and r.error.status == 400, r.error
        assert str(r.error).startswith("malformed HTTP request")
        assert r.error_head is None and r.done


@pytest.mark.parametrize(
    "body",
    [b"zz\r\n{}\r\n0\r\n\r\n", b"2 ;a\r\n{}\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n"],
    ids=["chunk-size", "space-before-extension", "missing-crlf-after-data"],
)
def test_malformed_chunked_body_is_a_400_for_that_request(body: bytes) -> None:
    r = read(b"POST /p HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n" + body)
    assert r.error is not None and r.error.status == 400 and not r.ready
    assert r.error_head is not None and r.error_head.target == b"/p"


def test_feeding_after_an_error_changes_nothing() -> None:
    r = read(b"NOT HTTP\r\n\r\n")
    err = r.error
    r.feed(request(b"GET", b"/a"))
    assert r.error is err and not r.ready


# ---------------------------------------------------------------------------- upgrades


def test_upgrade_without_body_is_a_plain_request_and_reading_goes_on() -> None:
    up = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    for pieces in ([up + request(b"GET", b"/next")], [up, request(b"GET", b"/next")]):
        r = read(*pieces)
        assert [q.target for q in r.ready] == [b"/ws", b"/next"] and r.error is None


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_upgrade_with_a_body_reads_the_body_then_the_next_request(chunked: bool) -> None:
    up = request(b"POST", b"/ws", b'{"a":1}', chunked=chunked,
                 headers=[(b"Connection", b"upgrade"), (b"Upgrade", b"h2c")])
    raw = up + request(b"POST", b"/next", b"{}")
    for step in (len(raw), 5, 1):
        r = read(*(raw[i:i + step] for i in range(0, len(raw), step)))
        assert [(q.target, q.body) for q in r.ready] == [(b"/ws", b'{"a":1}'),
                                                          (b"/next", b"{}")], step
        assert r.ready[0].headers[0] == (b"host", b"client.example")
        assert r.error is None


def test_connect_is_read_as_a_request() -> None:
    r = read(b"CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n" + request(b"GET", b"/n"))
    assert [q.target for q in r.ready] == [b"h:443", b"/n"]


@pytest.mark.parametrize("after", [b"post / HTTP/1.1\r\nHost: h\r\n\r\n", b"\x16\x03\x01garbage"],
                         ids=["bad-method", "tls-bytes"])
@pytest.mark.parametrize("same_read", [True, False], ids=["same-read", "next-read"])
def test_garbage_after_an_upgrade_is_a_400_not_an_exception(after: bytes, same_read: bool) -> None:
    # Found by tests/test_fuzz.py: a parse error in the bytes after a CONNECT (or any
    # upgrade) was raised out of feed() as httptools.HttpParserUpgrade, the upgrade
    # being the error's context, instead of becoming the RequestError a 400 is made of.
    up = b"CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n"
    r = read(up + after) if same_read else read(up, after)
    assert [q.target for q in r.ready] == [b"h:443"]
    assert type(r.error) is RequestError and r.error.status == 400 and r.done


def test_upgrade_body_is_capped_too() -> None:
    up = request(b"POST", b"/ws", b"x" * 300, chunked=True,
                 headers=[(b"Connection", b"upgrade"), (b"Upgrade", b"h2c")])
    r = read(up, max_body=100)
    assert isinstance(r.error, BodyTooLarge) and not r.ready


# ---------------------------------------------------------------------------- against h11
# The reader it replaced: a fresh h11.Connection per request cycle fed the previous one's
# trailing data, stopping after a request that ends the connection.

h11 = pytest.importorskip("h11")


def _h11_read(raw: bytes) -> tuple[list[Fields], bool]:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(raw)
    out: list[Fields] = []
    req: Any = None
    body = b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return out, True
        if event is h11.NEED_DATA:
            return out, False
        if event is h11.PAUSED:
            leftover = conn.trailing_data[0]
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
            conn.receive_data(leftover)
        elif isinstance(event, h11.Request):
            req, body = event, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            http11 = req.http_version == b"1.1"
            keep = http11 and not any(n == b"connection" and b"close" in v.lower()
                                      for n, v in req.headers)
            out.append((req.method, req.target, list(req.headers), body, http11, keep))
            if not keep:
                return out, False


def _new_read(raw: bytes) -> tuple[list[Fields], bool]:
    r = read(raw)
    return [fields(q) for q in r.ready], r.error is not None


def _comparable(result: tuple[list[Fields], bool]) -> tuple[list[Fields], bool]:
    # h11 lower-cases a transfer-encoding value; the proxy drops that header either way.
    out, err = result
    return [(m, t, [(n, v.lower() if n == b"transfer-encoding" else v) for n, v in h], b, v11, k)
            for m, t, h, b, v11, k in out], err


AGREED = [
    b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A:  v  \r\n\r\n",
    request(b"POST", b"/p", b"hello"),
    request(b"POST", b"/p", b"hello world", chunked=True),
    request(b"GET", b"/1") + request(b"POST", b"/2", b"{}")
    + request(b"GET", b"/3", headers=[(b"Connection", b"close")]) + request(b"GET", b"/4"),
    b"GET /a HTTP/1.0\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
    request(b"GET", b"/a", headers=[(b"Connection", b"xclosex")]) + request(b"GET", b"/b"),
    b"GET http://x/a HTTP/1.1\r\nHost: x\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: caf\xc3\xa9\r\nY: a\tb\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    + request(b"GET", b"/n"),
    request(b"POST", b"/ws", b"{}", headers=[(b"Connection", b"upgrade"),
                                             (b"Upgrade", b"x")]) + request(b"GET", b"/n"),
    b"CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n" + request(b"GET", b"/n"),
    b"GET /healthz\r\n\r\n",  # no version (HTTP/0.9-style): refused by both
    b"THIS IS NOT HTTP\r\n\r\n",
    b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}",
    b"GET / HTTP/1.1\r\nhost: x\r\nhost: y\r\n\r\n",
    b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}x",
    b"GET / HTTP/1.1\r\nhost : x\r\n\r\n",
    b"GET /\xc3\xa9 HTTP/1.1\r\nhost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: x\r\nx: a\x00b\r\n\r\n",
]


@pytest.mark.parametrize("raw", AGREED)
def test_reads_what_the_h11_reader_read(raw: bytes) -> None:
    assert _comparable(_new_read(raw)) == _comparable(_h11_read(raw))


# Where llhttp and h11 part ways, on inputs no HTTP/1.1 client should send: these pin
# the new behaviour (True: refused with a 400; False: read as requests).
DIFFERENT = {
    "bare-lf": (b"GET / HTTP/1.1\nhost: x\n\n", True),
    "obs-fold": (b"GET / HTTP/1.1\r\nhost: x\r\nx: a\r\n b\r\n\r\n", True),
    "control-char-in-value": (b"GET / HTTP/1.1\r\nhost: x\r\nx: a\x01b\r\n\r\n", True),
    "same-length-twice": (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n"
                          b"content-length: 2\r\n\r\n{}", True),
    "length-list": (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2, 2\r\n\r\n{}", True),
    "length-and-chunked": (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n"
                           b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n", True),
    "unknown-method": (b"FOO / HTTP/1.1\r\nhost: x\r\n\r\n", True),
    "lower-case-method": (b"get / HTTP/1.1\r\nhost: x\r\n\r\n", True),
    "http-1.2": (b"GET / HTTP/1.2\r\nhost: x\r\n\r\n", True),
    # h11 reads these as not-1.1 requests; an HTTP/1.x reader that serves only 1.0 and
    # 1.1 refuses them (issue 14: no HTTP/0.9-style request lines).
    "http-0.9": (b"GET / HTTP/0.9\r\n\r\n", True),
    "http-2.0": (b"GET / HTTP/2.0\r\nhost: x\r\n\r\n" + request(b"GET", b"/after"), True),
    "leading-crlf": (b"\r\nGET / HTTP/1.1\r\nhost: x\r\n\r\n", False),
    "crlf-between-requests": (request(b"GET", b"/1") + b"\r\n" + request(b"GET", b"/2"), False),
    "double-space-in-request-line": (b"GET  / HTTP/1.1\r\nhost: x\r\n\r\n", False),
}


@pytest.mark.parametrize("raw, refused", DIFFERENT.values(), ids=list(DIFFERENT))
def test_known_differences_from_h11(raw: bytes, refused: bool) -> None:
    assert _comparable(_new_read(raw)) != _comparable(_h11_read(raw))
    reqs, err = _new_read(raw)
    assert err is refused
    assert bool(reqs) is (not refused)


def test_generated_request_ids_are_unique_plain_and_differ_after_fork() -> None:
    import os

    from sidecar.downstream import _ID_CHARS, _new_id

    ids = [_new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 24 and _ID_CHARS.issuperset(i) for i in ids)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids must not repeat the parent's prefix
        os.write(w, _new_id())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(r, 64)
    os.close(r)
    os.close(w)
    assert child[:16] != ids[0][:16] and child not in ids


def test_idle_only_when_the_reader_holds_nothing_and_may_read_more() -> None:
    whole = request(b"POST", b"/v1/x", b"{}")
    r = read(whole)
    assert not r.idle  # a request waits to be taken
    r.ready.pop(0)
    assert r.idle
    assert not read(whole[:10]).idle  # half a head
    assert not read(whole[:-1]).idle  # the body is still arriving
    closing = read(request(b"GET", b"/", headers=[(b"Connection", b"close")]))
    closing.ready.pop(0)
    assert not closing.idle  # nothing more may be read on this connection
    assert not read(b"NOT HTTP\r\n\r\n").idle  # an error still to answer
