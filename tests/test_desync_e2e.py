"""End to end: a provider that breaks HTTP framing (issue 14, items 1 and 4).

A hand-written provider on loopback (tests/fake_provider.py) sends a second
response right behind the real one, or ends its body by closing. The client must
get exactly the real response, well framed; the meter must hold the usage the real
response reported; a provider connection that went out of step is never reused.
"""

from __future__ import annotations

import dataclasses
import gzip
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from e2e_helpers import ClientConn, chat_body, edit_upstreams, request_bytes
from fake_provider import FakeProvider, Script, Seen, chunk

DELTA = b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
USAGE = (b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":7,'
         b'"total_tokens":18}}\n\n')
DONE = b"data: [DONE]\n\n"
SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
SMUGGLED = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n")
JSON_BODY = (b'{"id":"c1","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}],'
             b'"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}')


@pytest.fixture
def fake_stack(stack_factory: Any) -> Iterator[Callable[[Callable[[Seen], Script]], Any]]:
    fakes: list[FakeProvider] = []

    def make(respond: Callable[[Seen], Script]) -> Any:
        fake = FakeProvider(respond)
        fakes.append(fake)
        stack = stack_factory(edit_upstreams(lambda u: dataclasses.replace(
            u, port=fake.port, url=f"http://127.0.0.1:{fake.port}")))
        stack.fake = fake
        return stack

    yield make
    for f in fakes:
        f.stop()


def _assert_reported(row: dict[str, Any]) -> None:
    assert row["outcome"] == "ok", row
    assert row["status"] == 200, row
    assert row["usage_source"] == "reported", row
    assert (row["prompt_tokens"], row["completion_tokens"]) == (11, 7), row


def _assert_two_connections_both_reported(stack: Any) -> None:
    """After two requests: the out-of-step provider connection was closed, not reused for
    the second request, and both rows hold the usage the real responses reported."""
    assert stack.fake.connections == 2
    stack.stop()
    rows = stack.rows()
    assert len(rows) == 2
    for row in rows:
        _assert_reported(row)


# Where the second response starts: in the read that carries the provider's head
# (the whole response and the extra in one write), or in a later body read (the
# verbatim relay's per-read path).
_SPLITS = {
    "head-read": lambda: [SSE_HEAD + chunk(DELTA) + chunk(USAGE) + chunk(DONE) + b"0\r\n\r\n"
                          + SMUGGLED],
    "later-read": lambda: [SSE_HEAD + chunk(DELTA), 0.05,
                           chunk(USAGE) + chunk(DONE) + b"0\r\n\r\n" + SMUGGLED],
}


@pytest.mark.parametrize("split", sorted(_SPLITS))
@pytest.mark.parametrize("client_asks_usage", [True, False], ids=["verbatim", "stripped"])
def test_a_second_response_behind_the_real_one_never_reaches_the_client(
        fake_stack: Any, split: str, client_asks_usage: bool) -> None:
    stack = fake_stack(lambda seen: (_SPLITS[split](), False))
    # A client that asked for usage itself gets the stream verbatim (the fast path);
    # one that did not gets it re-framed with the usage chunk hidden.
    extra = {"stream_options": {"include_usage": True}} if client_asks_usage else {}
    body = chat_body(stream=True, **extra)
    for _ in range(2):
        with ClientConn(stack.port, timeout=5) as c:
            c.send(request_bytes("POST", "/v1/chat/completions", body))
            r = c.read_response()
            assert r.status == 200 and r.framing == "chunked" and r.complete, r
            assert b"SMUGGLED" not in r.raw_body and b"HTTP/1.1" not in r.raw_body, r.raw_body
            want = DELTA + (USAGE if client_asks_usage else b"") + DONE
            assert r.body == want, r.body
            # Nothing follows on the connection (it ends, as a precaution): no second response.
            assert c.closed_by_peer(2.0) and not c.buf, bytes(c.buf)
    _assert_two_connections_both_reported(stack)


def test_a_second_response_behind_a_content_length_body_is_dropped(fake_stack: Any) -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    stack = fake_stack(lambda seen: ([head % len(JSON_BODY) + JSON_BODY + SMUGGLED], False))
    for _ in range(2):
        with ClientConn(stack.port, timeout=5) as c:
            c.send(request_bytes("POST", "/v1/chat/completions", chat_body()))
            r = c.read_response()
            assert (r.status, r.framing, r.complete) == (200, "length", True), r
            assert r.body == JSON_BODY, r.body
            assert c.closed_by_peer(2.0) and not c.buf, bytes(c.buf)
    _assert_two_connections_both_reported(stack)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
def test_a_close_delimited_response_reaches_the_client_whole_and_is_metered_ok(
        fake_stack: Any, stream: bool, version: bytes) -> None:
    """No content-length and not chunked: the provider's close ends the body. An
    HTTP/1.1 client gets it re-chunked with a last chunk; the row is 'ok' with the
    usage the body carried (406477c cut it and metered upstream_error)."""
    ctype = b"text/event-stream" if stream else b"application/json"
    payload = DELTA + USAGE + DONE if stream else JSON_BODY
    head = b"HTTP/%b 200 OK\r\ncontent-type: %b\r\n\r\n" % (version, ctype)
    half = len(payload) // 2
    stack = fake_stack(lambda seen: ([head + payload[:half], 0.05, payload[half:]], True))
    body = chat_body(stream=stream, **({"stream_options": {"include_usage": True}}
                                      if stream else {}))
    with ClientConn(stack.port, timeout=5) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", body))
        r = c.read_response()
        assert (r.status, r.framing, r.complete) == (200, "chunked", True), r
        assert r.body == payload
        assert r.raw_body.endswith(b"0\r\n\r\n")
        if not stream:
            assert orjson.loads(r.body)["usage"]["completion_tokens"] == 7
    stack.stop()
    rows = stack.rows()
    assert len(rows) == 1
    _assert_reported(rows[0])


# ---------------------------------------------------------------- estimates that say so


def _gzip_sse() -> bytes:
    return gzip.compress(DELTA * 2000)


def _garbage() -> bytes:
    # 10 MB that is neither text nor SSE: no blank line (so no event ends), no "data:".
    block = bytes(range(256)).replace(b"\n", b"").replace(b"\r", b"")
    return (block * (10 * 1024 * 1024 // len(block) + 1))[: 10 * 1024 * 1024]


@pytest.mark.parametrize("kind", ["gzip", "garbage"])
def test_an_unreadable_body_is_estimated_approximate_with_its_byte_count(
        fake_stack: Any, kind: str) -> None:
    """No usage frame and a body that is no text: the row is 'estimated', approximate,
    with the bytes it could not read (406477c: completion 0 and usage_approx 0)."""
    payload = _gzip_sse() if kind == "gzip" else _garbage()
    coding = b"content-encoding: gzip\r\n" if kind == "gzip" else b""
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n" + coding
            + b"content-length: %d\r\n\r\n" % len(payload))
    stack = fake_stack(lambda seen: ([head, payload], False))
    with ClientConn(stack.port, timeout=10) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True)))
        r = c.read_response()
        assert (r.status, r.complete, len(r.body)) == (200, True, len(payload))
    stack.stop()
    rows = stack.rows()
    assert len(rows) == 1
    row = rows[0]
    assert row["outcome"] == "ok" and row["usage_source"] == "estimated", row
    assert row["usage_approx"] == 1, row
    assert row["unread_bytes"] == len(payload), row
    assert row["completion_tokens"] == 0 and row["prompt_tokens"] > 0, row


def test_a_readable_stream_without_usage_is_estimated_with_nothing_unread(
        fake_stack: Any) -> None:
    """The flag is not set on an estimate that read the text (tiktoken files present)."""
    body = chunk(DELTA * 3) + chunk(DONE) + b"0\r\n\r\n"
    stack = fake_stack(lambda seen: ([SSE_HEAD + body], False))
    with ClientConn(stack.port, timeout=10) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True)))
        assert c.read_response().complete
    stack.stop()
    row = stack.rows()[0]
    assert row["usage_source"] == "estimated" and row["unread_bytes"] is None, row
    assert row["completion_tokens"] == 3 and row["usage_approx"] == 0, row
