"""Reasoning tokens as the provider reports them reach the meter row's own column."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
from e2e_helpers import ClientConn, chat_body, edit_upstreams, request_bytes
from fake_provider import FakeProvider, Script, Seen, chunk

USAGE = {"prompt_tokens": 12, "completion_tokens": 50, "total_tokens": 62,
         "completion_tokens_details": {"reasoning_tokens": 42}}


def _reasoning_stream(seen: Seen) -> Script:
    events = [
        {"id": "c1", "object": "chat.completion.chunk", "model": "o4-mini",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"},
                      "finish_reason": None}]},
        {"id": "c1", "object": "chat.completion.chunk", "model": "o4-mini",
         "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"id": "c1", "object": "chat.completion.chunk", "model": "o4-mini", "choices": [],
         "usage": USAGE},
    ]
    body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    return [head + chunk(body) + b"0\r\n\r\n"], False


def test_reported_reasoning_tokens_land_in_their_column(stack_factory: Any) -> None:
    fake = FakeProvider(_reasoning_stream)
    try:
        stack = stack_factory(edit_upstreams(lambda u: dataclasses.replace(
            u, port=fake.port, url=f"http://127.0.0.1:{fake.port}")))
        with ClientConn(stack.port, timeout=5) as c:
            c.send(request_bytes("POST", "/v1/chat/completions",
                                 chat_body(model="o4-mini", stream=True)))
            assert c.read_response().status == 200
        stack.stop()
        (row,) = stack.rows()
    finally:
        fake.stop()
    assert (row["prompt_tokens"], row["completion_tokens"], row["reasoning_tokens"]) == (
        12, 50, 42)
    assert row["usage_source"] == "reported"


def test_a_provider_that_reports_no_reasoning_leaves_the_column_null(
        stack_factory: Any) -> None:
    stack = stack_factory()  # the mock in Anthropic format: no reasoning count in usage
    with ClientConn(stack.port, timeout=5) as c:
        c.send(request_bytes("POST", "/v1/messages", {
            "model": "claude-sonnet-4-5", "max_tokens": 20, "stream": True,
            "messages": [{"role": "user", "content": "hello"}]}))
        assert c.read_response().status == 200
    stack.stop()
    (row,) = stack.rows()
    assert row["completion_tokens"] and row["reasoning_tokens"] is None
