"""End to end over real loopback sockets: openai SDK -> sidecar -> mock provider -> meter."""

from __future__ import annotations

import itertools
import re
import socket
import time
from typing import Any

import openai
import orjson
import pytest
from e2e_helpers import ClientConn, request_bytes

from sidecar.http1 import ResponseParser
from sidecar.mock_shapes import count_tokens, expected_text


def _post(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request_bytes("POST", path, body))
    return sock


class RawStream:
    """Reads a chunked SSE response event by event, noting when each arrived."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = ResponseParser(65536)
        self.sse = bytearray()
        self.events: list[tuple[float, bytes]] = []
        self.eof = False

    @property
    def head(self) -> Any:
        return self.parser.head

    def read_head(self) -> Any:
        while self.parser.head is None:
            data = self.sock.recv(65536)
            assert data, "connection closed before the response head"
            self._body(data)
        return self.parser.head

    def _body(self, data: bytes) -> None:
        now = time.monotonic()
        self.parser.feed(data)
        for p in self.parser.take():
            self.sse += p
        while (end := self.sse.find(b"\n\n")) >= 0:
            self.events.append((now, bytes(self.sse[:end])))
            del self.sse[: end + 2]

    def read_events(self, n: int) -> None:
        self.read_head()
        while len(self.events) < n and not self.parser.done:
            data = self.sock.recv(65536)
            if not data:
                self.eof = True
                return
            self._body(data)

    def read_all(self) -> None:
        self.read_events(10**9)


def _norm(ev: bytes) -> bytes:
    return re.sub(rb'"created":\d+', b'"created":0', re.sub(rb"chatcmpl-\w+", b"ID", ev))


def _content(events: list[tuple[float, bytes]]) -> str:
    out = []
    for _, ev in events:
        if not ev.startswith(b"data: {"):
            continue
        obj = orjson.loads(ev[6:])
        for ch in obj.get("choices") or ():
            out.append((ch.get("delta") or {}).get("content") or "")
    return "".join(out)


def test_openai_sdk_streams_through_sidecar_and_meter_row_is_reported(stack_factory: Any) -> None:
    stack = stack_factory(chunks=20)
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="sk-client-test", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini", stream=True,
        messages=[{"role": "user", "content": "Say something streamed."}],
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == expected_text(20)
    sent = stack.mock.requests[0]
    stack.stop()
    rows = stack.rows()
    assert len(rows) == 1
    row = rows[0]
    assert row["usage_source"] == "reported" and row["outcome"] == "ok" and row["status"] == 200
    assert row["prompt_tokens"] == sent.prompt_tokens
    assert row["completion_tokens"] == sent.completion_tokens == count_tokens(text, "o200k_base")
    assert row["total_tokens"] == sent.prompt_tokens + sent.completion_tokens
    assert row["stream"] == 1 and row["model"] == "gpt-4o-mini"
    assert orjson.loads(row["usage_raw"])["completion_tokens"] == sent.completion_tokens


def test_injected_usage_chunk_is_hidden_from_a_client_that_did_not_ask(stack_factory: Any) -> None:
    stack = stack_factory(chunks=5)
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    via = RawStream(_post(stack.port, "/v1/chat/completions", body))
    via.read_all()
    direct = RawStream(_post(stack.mock.port, "/v1/chat/completions", body))
    direct.read_all()
    # The provider saw include_usage from the sidecar, not from the client.
    upstream_body = orjson.loads(stack.mock.requests[0].body)
    assert upstream_body["stream_options"] == {"include_usage": True}
    got = [ev for _, ev in via.events]
    want = [ev for _, ev in direct.events]
    assert not any(b'"usage"' in ev for ev in got)
    # Identical but for the per-response id and timestamp.
    assert [_norm(ev) for ev in got] == [_norm(ev) for ev in want]
    stack.stop()
    row = stack.rows()[0]
    assert row["usage_source"] == "reported" and row["completion_tokens"] > 0


def test_each_event_reaches_the_client_before_the_next_is_generated(stack_factory: Any) -> None:
    stack = stack_factory(chunks=4, delay_ms=200)
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    rs = RawStream(_post(stack.port, "/v1/chat/completions", body))
    rs.read_all()
    content_times = [t for t, ev in rs.events if b'"content":"' in ev and b'"content":""' not in ev]
    assert len(content_times) >= 3
    gaps = [b - a for a, b in itertools.pairwise(content_times)]
    # Each event arrived on its own, about one provider delay after the previous one:
    # a buffering proxy would deliver several together (gap ~0).
    assert min(gaps) > 0.12, gaps


def test_client_disconnect_cancels_upstream_and_meters_estimate(stack_factory: Any) -> None:
    stack = stack_factory(chunks=40, delay_ms=100)
    body = {"model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}
    sock = _post(stack.port, "/v1/chat/completions", body)
    rs = RawStream(sock)
    rs.read_events(8)
    received = _content(rs.events)
    t_close = time.monotonic()
    sock.close()
    deadline = time.monotonic() + 2
    conn = None
    while time.monotonic() < deadline:
        conn = stack.mock.requests[0].connection
        if conn.closed_at is not None:
            break
        time.sleep(0.005)
    assert conn is not None and conn.closed_at is not None, "upstream connection never closed"
    assert conn.closed_at - t_close < 0.1
    assert not stack.mock.requests[0].completed
    stack.stop()
    (row,) = stack.rows()
    assert row["outcome"] == "client_disconnect" and row["usage_source"] == "estimated"
    truth = count_tokens(received, "o200k_base")
    assert abs(row["completion_tokens"] - truth) <= 2, (row["completion_tokens"], truth)
    assert abs(row["prompt_tokens"] - stack.mock.requests[0].prompt_tokens) <= 2


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_sdk_through_sidecar_meters_merged_usage(
        stack_factory: Any, stream: bool) -> None:
    import anthropic

    stack = stack_factory(chunks=6, cache_read_tokens=2, cache_write_tokens=1)
    client = anthropic.Anthropic(base_url=stack.url, api_key="sk-ant-client", max_retries=0)
    text_in = "hello there, please tell me about the weather in the hills"
    msgs = [{"role": "user", "content": text_in}]
    if stream:
        with client.messages.stream(model="claude-mock-1", max_tokens=100,
                                    messages=msgs) as s:  # type: ignore[arg-type]
            text = "".join(s.text_stream)
            final = s.get_final_message()
    else:
        final = client.messages.create(model="claude-mock-1", max_tokens=100,
                                       messages=msgs)  # type: ignore[arg-type]
        text = final.content[0].text  # type: ignore[union-attr]
    assert text == expected_text(6)
    sent = stack.mock.requests[0]
    headers = dict(sent.raw_headers)
    # The client's own key is not forwarded: no key is configured, so none is sent.
    assert b"x-api-key" not in headers and b"authorization" not in headers
    assert headers[b"anthropic-version"]
    stack.stop()
    (row,) = stack.rows()
    assert row["usage_source"] == "reported"
    u = final.usage
    assert u.input_tokens > 0
    # prompt_tokens counts every input token billed: fresh + cache reads + cache writes.
    assert row["prompt_tokens"] == u.input_tokens + 2 + 1 == sent.prompt_tokens
    assert row["completion_tokens"] == u.output_tokens == sent.completion_tokens
    assert row["cache_read_tokens"] == 2 and row["cache_write_tokens"] == 1


def test_shutdown_cuts_a_live_stream_meters_it_and_closes_every_provider_connection(
    stack_factory: Any,
) -> None:
    import asyncio

    from e2e_helpers import edit_timeouts

    stack = stack_factory(edit_timeouts(shutdown_grace=0.3), chunks=40, delay_ms=100)
    body = {"model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}
    live = RawStream(_post(stack.port, "/v1/chat/completions", body))
    live.read_events(3)
    # One finished meanwhile leaves an idle kept-alive provider connection in the pool.
    quick = socket.create_connection(("127.0.0.1", stack.port), timeout=10)
    quick.sendall(request_bytes("POST", "/v1/chat/completions", body,
                                headers=[(b"x-mock-delay-ms", b"0")]))
    RawStream(quick).read_all()
    assert len(stack.mock.connections) == 2  # the idle one and the streaming one
    assert stack.loop is not None
    asyncio.run_coroutine_threadsafe(stack.server.stop(), stack.loop).result(10)
    live.read_all()  # the sidecar cut it: EOF before the last chunk
    assert live.eof and not live.parser.done
    for conn in stack.mock.connections:
        assert conn.closed_at is not None and conn.closed_by_peer, conn
    quick.close()
    stack.stop()
    rows = stack.rows()
    assert sorted(r["outcome"] for r in rows) == ["ok", "shutdown"]
    (cut,) = (r for r in rows if r["outcome"] == "shutdown")
    assert cut["usage_source"] == "estimated" and cut["completion_tokens"] > 0


def test_meter_timings_have_sub_millisecond_resolution(stack_factory: Any) -> None:
    # loop.time() is libuv's cached millisecond clock: with it every sub-millisecond
    # time to first byte was metered as 0.0 or 1.0.
    stack = stack_factory(chunks=3, delay_ms=2)
    body = {"model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(5):
        rs = RawStream(_post(stack.port, "/v1/chat/completions", body))
        rs.read_all()
        assert rs.parser.done
        rs.sock.close()
    stack.stop()
    rows = stack.rows()
    assert len(rows) == 5
    for r in rows:
        assert 0 < r["ttft_ms"] < r["duration_ms"]
    assert any(r["ttft_ms"] != round(r["ttft_ms"]) for r in rows), rows
    assert any(r["duration_ms"] != round(r["duration_ms"]) for r in rows), rows


def test_include_usage_is_injected_without_reserialising_the_body(stack_factory: Any) -> None:
    """Numbers, key order and escapes reach the provider as the client sent them."""
    stack = stack_factory()
    raw = (b'{"model":"gpt-4o-mini","seed":123456789012345678901234567890,'
           b'"temperature":1E0,"messages":[{"role":"user","content":"caf\\u00e9 \\"q\\""}],'
           b'"stream":true}')
    with ClientConn(stack.port) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", raw))
        resp = c.read_response()
    assert resp.status == 200
    sent = stack.mock.requests[0].body
    assert sent == raw[:-1] + b',"stream_options":{"include_usage":true}}'
