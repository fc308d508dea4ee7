"""End to end over real loopback sockets: the sidecar's HTTP behaviour.

Connection handling (keep-alive both sides, pipelining, HTTP/1.0), request ids,
header hygiene and credential injection, and usage metering on every API path.
Each test asserts on the bytes the client received, on what the mock provider
recorded, and on the meter rows written.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import openai
import orjson
import pytest
from e2e_helpers import (
    ClientConn,
    chat_body,
    chat_text,
    edit_upstreams,
    request_bytes,
    roundtrip,
    rows_by_id,
)

from sidecar.config import UpstreamConfig
from sidecar.mock_shapes import count_tokens, expected_text

MESSAGES_BODY = {"model": "claude-mock-1", "max_tokens": 50,
                 "messages": [{"role": "user", "content": "hi"}]}


def _rid(name: str) -> tuple[bytes, bytes]:
    return (b"x-request-id", name.encode())


# ---------------------------------------------------------------------------- keep-alive


def test_keep_alive_client_connection_serves_sequential_requests(stack_factory: Any) -> None:
    stack = stack_factory(chunks=3)
    with ClientConn(stack.port) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", chat_body("model-one"),
                             headers=[_rid("req-one")]))
        r1 = c.read_response()
        # A stream on the same connection, then a plain one again.
        c.send(request_bytes("POST", "/v1/chat/completions", chat_body("model-two", stream=True),
                             headers=[_rid("req-two")]))
        r2 = c.read_response()
        c.send(request_bytes("POST", "/v1/chat/completions", chat_body("model-three"),
                             headers=[_rid("req-three")]))
        r3 = c.read_response()
        assert not c.eof
    assert [r.status for r in (r1, r2, r3)] == [200, 200, 200]
    assert [r.complete for r in (r1, r2, r3)] == [True, True, True]
    assert r1.json["model"] == "model-one"
    assert r1.json["choices"][0]["message"]["content"] == expected_text(3)
    assert r2.framing == "chunked" and chat_text(r2) == expected_text(3)
    assert r2.sse_data()[-1] == b"[DONE]"
    assert r3.json["model"] == "model-three"
    assert [r.header("x-request-id") for r in (r1, r2, r3)] == ["req-one", "req-two", "req-three"]
    for r in (r1, r2, r3):
        assert (r.header("connection") or "").lower() != "close"
    stack.stop()
    rows = rows_by_id(stack.rows())
    assert {rid: row["model"] for rid, row in rows.items()} == {
        "req-one": "model-one", "req-two": "model-two", "req-three": "model-three"}
    assert all(row["outcome"] == "ok" and row["usage_source"] == "reported"
               for row in rows.values())


def test_upstream_connection_is_reused_across_sequential_requests(stack_factory: Any) -> None:
    stack = stack_factory(chunks=2)
    statuses = []
    # Five requests on five separate client connections, one after the other, streamed and not.
    for i in range(5):
        r = roundtrip(stack.port, request_bytes(
            "POST", "/v1/chat/completions", chat_body(f"m{i}", stream=i % 2 == 1)))
        statuses.append((r.status, r.complete))
    assert statuses == [(200, True)] * 5
    assert stack.mock.requests_total == 5
    assert stack.mock.connections_accepted == 1
    assert {req.connection_id for req in stack.mock.requests} == {1}
    stack.stop()
    assert len(stack.rows()) == 5


# ---------------------------------------------------------------------------- pipelining


def test_pipelined_requests_are_answered_in_order(stack_factory: Any) -> None:
    stack = stack_factory(chunks=3)
    # The first is slow to start and streamed; the second would be ready at once, so an
    # out-of-order (or interleaved) answer would show.
    first = request_bytes("POST", "/v1/chat/completions", chat_body("pipe-first", stream=True),
                          headers=[_rid("pipe-1"), (b"x-mock-first-byte-ms", b"150")])
    second = request_bytes("POST", "/v1/chat/completions", chat_body("pipe-second"),
                           headers=[_rid("pipe-2")])
    third = request_bytes("POST", "/v1/embeddings", {"model": "emb-third", "input": "x y z"},
                          headers=[_rid("pipe-3")])
    with ClientConn(stack.port) as c:
        c.send(first + second + third)
        r1 = c.read_response()
        r2 = c.read_response()
        r3 = c.read_response()
    assert [r.status for r in (r1, r2, r3)] == [200, 200, 200]
    assert [r.header("x-request-id") for r in (r1, r2, r3)] == ["pipe-1", "pipe-2", "pipe-3"]
    assert r1.framing == "chunked" and r1.complete
    assert orjson.loads(r1.sse_data()[0])["model"] == "pipe-first"
    assert chat_text(r1) == expected_text(3)
    assert r2.json["model"] == "pipe-second"
    assert r3.json["model"] == "emb-third" and r3.json["object"] == "list"
    # The provider saw them one at a time, in order.
    assert [q.model for q in stack.mock.requests] == ["pipe-first", "pipe-second", "emb-third"]
    stack.stop()
    rows = rows_by_id(stack.rows())
    assert {rid: row["model"] for rid, row in rows.items()} == {
        "pipe-1": "pipe-first", "pipe-2": "pipe-second", "pipe-3": "emb-third"}


# ---------------------------------------------------------------------------- x-request-id


def test_every_response_carries_a_request_id_and_a_sane_client_id_is_kept(
    stack_factory: Any,
) -> None:
    stack = stack_factory(chunks=2)
    sane = "nginx-4f1c2a.req_01:abc"
    proxied = roundtrip(stack.port, request_bytes(
        "POST", "/v1/chat/completions", chat_body(), headers=[(b"x-request-id", sane.encode())]))
    assert proxied.status == 200 and proxied.header("x-request-id") == sane
    assert proxied.header_all("x-request-id") == [sane]
    # Forwarded to the provider as the same id; the provider's own id is not mixed in.
    assert stack.mock.requests[0].header("x-request-id") == sane

    err = roundtrip(stack.port, request_bytes(
        "POST", "/v1/chat/completions", b"{not json", headers=[(b"x-request-id", b"err-id-1")]))
    assert err.status == 400 and err.header("x-request-id") == "err-id-1"
    nf = roundtrip(stack.port, request_bytes(
        "POST", "/v1/nowhere", chat_body(), headers=[(b"x-request-id", b"nf-id-1")]))
    assert nf.status == 404 and nf.header("x-request-id") == "nf-id-1"
    hz = roundtrip(stack.port, request_bytes(
        "GET", "/healthz", headers=[(b"x-request-id", b"hz-id-1")]))
    assert hz.status == 200 and hz.header("x-request-id") == "hz-id-1"

    # Without a client id, each response gets a fresh one of its own.
    ids = set()
    for _ in range(3):
        r = roundtrip(stack.port, request_bytes("GET", "/readyz"))
        assert r.status == 200
        rid = r.header("x-request-id")
        assert rid and 8 <= len(rid) <= 128 and " " not in rid
        ids.add(rid)
    assert len(ids) == 3
    stack.stop()
    rows = rows_by_id(stack.rows())
    # Only the routed requests are metered, under the id the client saw.
    assert set(rows) == {sane, "err-id-1"}
    assert rows[sane]["status"] == 200 and rows["err-id-1"]["status"] == 400


@pytest.mark.parametrize("bogus", [b"x" * 300, b"has spaces in it", b"semi;colon", b"tab\there"])
def test_bogus_client_request_id_is_replaced(stack_factory: Any, bogus: bytes) -> None:
    stack = stack_factory(chunks=2)
    r = roundtrip(stack.port, request_bytes(
        "POST", "/v1/chat/completions", chat_body(), headers=[(b"x-request-id", bogus)]))
    assert r.status == 200
    rid = r.header("x-request-id")
    assert rid and rid != bogus.decode() and len(rid) <= 128 and " " not in rid
    assert r.header_all("x-request-id") == [rid]
    # The provider got our replacement, not the client's value.
    assert stack.mock.requests[0].header("x-request-id") == rid
    hz = roundtrip(stack.port, request_bytes("GET", "/healthz", headers=[(b"x-request-id", bogus)]))
    assert hz.header("x-request-id") not in (None, bogus.decode())
    stack.stop()
    (row,) = stack.rows()
    assert row["request_id"] == rid


# ---------------------------------------------------------------------------- headers


HOP_BY_HOP_REQUEST = [
    (b"connection", b"keep-alive"),
    (b"keep-alive", b"timeout=5, max=100"),
    (b"te", b"trailers"),
    (b"upgrade", b"websocket"),
    (b"proxy-authorization", b"Basic cHJveHk6c2VjcmV0"),
    (b"proxy-connection", b"keep-alive"),
]


def test_hop_by_hop_headers_dropped_host_rewritten_end_to_end_headers_kept(
    stack_factory: Any,
) -> None:
    stack = stack_factory(chunks=2)
    body = chat_body()
    data = request_bytes("POST", "/v1/chat/completions?trace=1", body, headers=[
        *HOP_BY_HOP_REQUEST,
        (b"authorization", b"Bearer sk-client-own-key"),
        (b"openai-organization", b"org-e2e"),
        (b"x-custom-trace", b"abc123"),
        (b"user-agent", b"e2e-test/1.0"),
    ])
    r = roundtrip(stack.port, data)
    assert r.status == 200 and r.complete
    assert r.json["choices"][0]["message"]["content"] == expected_text(2)
    sent = stack.mock.requests[0]
    names = [n for n, _ in sent.raw_headers]
    for name, _ in HOP_BY_HOP_REQUEST:
        assert name not in names, (name, sent.head)
    # The client's credential is not the provider's: not forwarded by default.
    assert b"authorization" not in names
    # host names the provider, not the client's view of the sidecar.
    assert names.count(b"host") == 1
    assert sent.header("host") == f"127.0.0.1:{stack.mock.port}"
    # End-to-end headers pass; framing is the sidecar's own and matches the body.
    assert sent.header("openai-organization") == "org-e2e"
    assert sent.header("x-custom-trace") == "abc123"
    assert sent.header("user-agent") == "e2e-test/1.0"
    assert names.count(b"content-length") == 1
    assert int(sent.header("content-length") or -1) == len(sent.body)
    assert sent.body == orjson.dumps(body)  # non-streaming body passes byte for byte
    assert sent.method == "POST" and sent.head.split(b"\r\n", 1)[0] == (
        b"POST /v1/chat/completions?trace=1 HTTP/1.1")
    stack.stop()
    (row,) = stack.rows()
    assert row["status"] == 200 and row["usage_source"] == "reported"


def test_client_authorization_forwarded_when_configured(stack_factory: Any) -> None:
    stack = stack_factory(
        config_edit=edit_upstreams(lambda u: dataclasses.replace(u, forward_client_auth=True)),
        chunks=2,
    )
    r = roundtrip(stack.port, request_bytes("POST", "/v1/chat/completions", chat_body(),
                                            headers=[(b"authorization", b"Bearer sk-client-1")]))
    assert r.status == 200
    ra = roundtrip(stack.port, request_bytes(
        "POST", "/v1/messages",
        MESSAGES_BODY,
        headers=[(b"x-api-key", b"sk-ant-client-2")]))
    assert ra.status == 200
    openai_req, anthropic_req = stack.mock.requests
    auth = [v for n, v in openai_req.raw_headers if n == b"authorization"]
    assert auth == [b"Bearer sk-client-1"]
    assert [v for n, v in anthropic_req.raw_headers if n == b"x-api-key"] == [b"sk-ant-client-2"]
    # anthropic-version is still supplied for a client that did not send one.
    assert anthropic_req.header("anthropic-version") == "2023-06-01"


OPENAI_KEY = "sk-upstream-OPENAI-s3cr3t-0123456789"
ANTHROPIC_KEY = "sk-ant-upstream-ANTHROPIC-s3cr3t-9876543210"


def _with_keys(up: UpstreamConfig) -> UpstreamConfig:
    key = ANTHROPIC_KEY if up.format == "anthropic" else OPENAI_KEY
    return dataclasses.replace(up, api_key=key)


def test_configured_api_key_is_injected_per_format_and_client_key_replaced(
    stack_factory: Any,
) -> None:
    stack = stack_factory(config_edit=edit_upstreams(_with_keys), chunks=2)
    r = roundtrip(stack.port, request_bytes(
        "POST", "/v1/chat/completions", chat_body(stream=True),
        headers=[(b"authorization", b"Bearer sk-client-should-not-pass")]))
    assert r.status == 200 and r.complete
    ra = roundtrip(stack.port, request_bytes(
        "POST", "/v1/messages",
        MESSAGES_BODY,
        headers=[(b"x-api-key", b"sk-ant-client-should-not-pass"),
                 (b"authorization", b"Bearer also-not")]))
    assert ra.status == 200
    o, a = stack.mock.requests
    o_hdrs = o.raw_headers
    assert [v for n, v in o_hdrs if n == b"authorization"] == [b"Bearer " + OPENAI_KEY.encode()]
    assert not any(n == b"x-api-key" for n, _ in o_hdrs)
    assert not any(n == b"anthropic-version" for n, _ in o_hdrs)
    a_hdrs = a.raw_headers
    assert [v for n, v in a_hdrs if n == b"x-api-key"] == [ANTHROPIC_KEY.encode()]
    assert not any(n == b"authorization" for n, _ in a_hdrs)
    assert [v for n, v in a_hdrs if n == b"anthropic-version"] == [b"2023-06-01"]
    # The key never comes back to the client.
    for resp in (r, ra):
        assert OPENAI_KEY.encode() not in resp.raw_body + repr(resp.headers).encode()
        assert ANTHROPIC_KEY.encode() not in resp.raw_body + repr(resp.headers).encode()
    stack.stop()
    rows = stack.rows()
    assert len(rows) == 2
    for row in rows:
        assert OPENAI_KEY not in repr(row) and ANTHROPIC_KEY not in repr(row)


def test_client_anthropic_version_is_kept_not_duplicated(stack_factory: Any) -> None:
    stack = stack_factory(config_edit=edit_upstreams(_with_keys), chunks=2)
    r = roundtrip(stack.port, request_bytes(
        "POST", "/v1/messages",
        MESSAGES_BODY,
        headers=[(b"anthropic-version", b"2023-01-01"),
                 (b"anthropic-beta", b"prompt-caching-2024-07-31")]))
    assert r.status == 200
    hdrs = stack.mock.requests[0].raw_headers
    assert [v for n, v in hdrs if n == b"anthropic-version"] == [b"2023-01-01"]
    assert [v for n, v in hdrs if n == b"anthropic-beta"] == [b"prompt-caching-2024-07-31"]


# ---------------------------------------------------------------------------- usage per API


def test_non_streaming_chat_is_metered_with_reported_usage(stack_factory: Any) -> None:
    stack = stack_factory(chunks=5)
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="sk-client", max_retries=0)
    resp = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say something, not streamed."}])
    assert resp.choices[0].message.content == expected_text(5)
    sent = stack.mock.requests[0]
    assert not sent.stream and "stream_options" not in sent.json
    assert resp.usage is not None and resp.usage.completion_tokens == sent.completion_tokens
    stack.stop()
    (row,) = stack.rows()
    assert row["usage_source"] == "reported" and row["outcome"] == "ok" and row["status"] == 200
    assert row["stream"] == 0 and row["route"] == "/v1/chat/completions"
    assert row["prompt_tokens"] == sent.prompt_tokens > 0
    assert row["completion_tokens"] == sent.completion_tokens == count_tokens(
        expected_text(5), "o200k_base")
    assert row["total_tokens"] == sent.prompt_tokens + sent.completion_tokens
    assert row["bytes_out"] > 0 and row["ttft_ms"] is not None


@pytest.mark.parametrize("stream", [False, True])
def test_legacy_completions_metered_with_reported_usage(stack_factory: Any, stream: bool) -> None:
    stack = stack_factory(chunks=4)
    body: dict[str, Any] = {"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon a time",
                            "max_tokens": 50}
    if stream:
        body["stream"] = True
    r = roundtrip(stack.port, request_bytes("POST", "/v1/completions", body))
    assert r.status == 200 and r.complete
    sent = stack.mock.requests[0]
    if stream:
        # Usage requested from the provider on the client's behalf, hidden from the client.
        assert sent.json["stream_options"] == {"include_usage": True}
        datas = r.sse_data()
        assert datas[-1] == b"[DONE]"
        chunks = [orjson.loads(d) for d in datas[:-1]]
        assert all(c.get("usage") is None for c in chunks)
        assert all(c["choices"] for c in chunks)
        text = "".join(c["choices"][0]["text"] for c in chunks)
    else:
        assert "stream_options" not in sent.json
        text = r.json["choices"][0]["text"]
        assert r.json["usage"]["completion_tokens"] == sent.completion_tokens
    assert text == expected_text(4)
    stack.stop()
    (row,) = stack.rows()
    assert row["usage_source"] == "reported" and row["outcome"] == "ok"
    assert row["route"] == "/v1/completions" and row["stream"] == int(stream)
    assert row["prompt_tokens"] == sent.prompt_tokens > 0
    assert row["completion_tokens"] == sent.completion_tokens > 0
    assert row["total_tokens"] == sent.prompt_tokens + sent.completion_tokens


def test_responses_api_stream_via_sdk_is_metered_from_response_completed(
    stack_factory: Any,
) -> None:
    stack = stack_factory(chunks=6)
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="sk-client", max_retries=0)
    stream = client.responses.create(model="gpt-4o-mini", input="Write a short line.", stream=True)
    deltas = []
    completed = None
    for event in stream:
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "response.completed":
            completed = event.response
    assert "".join(deltas) == expected_text(6)
    assert completed is not None and completed.usage is not None
    sent = stack.mock.requests[0]
    # The Responses API always reports usage: nothing is injected into the body.
    assert "stream_options" not in sent.json
    stack.stop()
    (row,) = stack.rows()
    assert row["usage_source"] == "reported" and row["outcome"] == "ok" and row["stream"] == 1
    assert row["route"] == "/v1/responses"
    assert row["prompt_tokens"] == completed.usage.input_tokens == sent.prompt_tokens
    assert row["completion_tokens"] == completed.usage.output_tokens == sent.completion_tokens
    assert row["total_tokens"] == sent.prompt_tokens + sent.completion_tokens


def test_embeddings_via_sdk_metered_with_reported_prompt_tokens(stack_factory: Any) -> None:
    stack = stack_factory()
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="sk-client", max_retries=0)
    res = client.embeddings.create(model="text-embedding-3-small",
                                   input=["first text to embed", "and a second one"])
    assert len(res.data) == 2 and all(len(d.embedding) > 0 for d in res.data)
    sent = stack.mock.requests[0]
    assert res.usage.prompt_tokens == sent.prompt_tokens > 0
    stack.stop()
    (row,) = stack.rows()
    assert row["usage_source"] == "reported" and row["outcome"] == "ok" and row["stream"] == 0
    assert row["route"] == "/v1/embeddings" and row["model"] == "text-embedding-3-small"
    assert row["prompt_tokens"] == sent.prompt_tokens
    assert row["total_tokens"] == sent.prompt_tokens
    assert row["completion_tokens"] in (0, None)


def test_client_that_asked_for_include_usage_gets_the_usage_chunk(stack_factory: Any) -> None:
    stack = stack_factory(chunks=4)
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="sk-client", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "count, with usage"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(4)
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert usage_chunks[0].choices == []
    usage = usage_chunks[0].usage
    assert usage is not None
    sent = stack.mock.requests[0]
    # The client's request was passed as it was (nothing to inject).
    assert sent.json["stream_options"] == {"include_usage": True}
    assert usage.completion_tokens == sent.completion_tokens
    stack.stop()
    (row,) = stack.rows()
    assert row["usage_source"] == "reported"
    assert row["prompt_tokens"] == usage.prompt_tokens == sent.prompt_tokens
    assert row["completion_tokens"] == sent.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_reported_zero_completion_tokens_stored_as_zero_not_null(
    stack_factory: Any, stream: bool,
) -> None:
    stack = stack_factory(chunks=3)
    r = roundtrip(stack.port, request_bytes(
        "POST", "/v1/chat/completions", chat_body(stream=stream),
        headers=[(b"x-mock-chunks", b"0")]))
    assert r.status == 200 and r.complete
    sent = stack.mock.requests[0]
    assert sent.completion_tokens == 0 and sent.usage_sent
    if stream:
        assert chat_text(r) == ""
    else:
        assert r.json["usage"]["completion_tokens"] == 0
    stack.stop()
    (row,) = stack.rows()
    assert row["usage_source"] == "reported"
    assert row["completion_tokens"] == 0  # not NULL
    assert row["prompt_tokens"] == sent.prompt_tokens > 0
    assert row["total_tokens"] == sent.prompt_tokens
    assert orjson.loads(row["usage_raw"])["completion_tokens"] == 0


# ---------------------------------------------------------------------------- HTTP/1.0


def test_http10_client_gets_unframed_stream_then_close(stack_factory: Any) -> None:
    stack = stack_factory(chunks=5)
    with ClientConn(stack.port) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True),
                             version="1.0"))
        r = c.read_response()
        assert c.closed_by_peer(2.0)
    assert r.status == 200
    assert r.header("transfer-encoding") is None
    assert r.framing == "close"
    # No chunk-size lines anywhere: the payload is the event stream itself.
    assert r.body.startswith(b"data: {")
    assert r.body.endswith(b"data: [DONE]\n\n")
    assert chat_text(r) == expected_text(5)
    assert not any(b'"usage"' in d for d in r.sse_data())  # injected usage still hidden
    stack.stop()
    (row,) = stack.rows()
    assert row["outcome"] == "ok" and row["usage_source"] == "reported"
    assert row["completion_tokens"] == stack.mock.requests[0].completion_tokens


def test_http10_non_streaming_answer_then_close(stack_factory: Any) -> None:
    stack = stack_factory(chunks=2)
    with ClientConn(stack.port) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", chat_body(), version="1.0"))
        r = c.read_response()
        assert c.closed_by_peer(2.0)
    assert r.status == 200 and r.complete
    assert r.header("transfer-encoding") is None
    assert r.json["choices"][0]["message"]["content"] == expected_text(2)


# ---------------------------------------------------------------------------- health


def test_healthz_and_readyz(stack_factory: Any) -> None:
    stack = stack_factory()
    with ClientConn(stack.port) as c:
        c.send(request_bytes("GET", "/healthz"))
        h = c.read_response()
        c.send(request_bytes("GET", "/readyz"))
        rd = c.read_response()
        c.send(request_bytes("HEAD", "/healthz"))
        hd = c.read_response(head_request=True)
    assert h.status == 200 and h.json == {"status": "ok"} and h.header("x-request-id")
    assert rd.status == 200 and rd.json["status"] == "ok" and rd.header("x-request-id")
    assert rd.json["routes"]["/v1/chat/completions"] == {
        "ready": True, "upstreams": {"mock-openai": "healthy"}}
    assert hd.status == 200 and hd.header("x-request-id")
    # Local answers never reach the provider nor the meter.
    assert stack.mock.requests_total == 0
    stack.stop()
    assert stack.rows() == []



# ---------------------------------------------------------------------------- more framing


def test_pipelined_error_does_not_derail_the_next_request(stack_factory: Any) -> None:
    stack = stack_factory(chunks=2)
    batch = (
        request_bytes("POST", "/v1/chat/completions", b"{broken", headers=[_rid("p-bad")])
        + request_bytes("POST", "/v1/nope", chat_body(), headers=[_rid("p-404")])
        + request_bytes("GET", "/healthz", headers=[_rid("p-hz")])
        + request_bytes("POST", "/v1/chat/completions", chat_body("p-good"),
                        headers=[_rid("p-good")])
    )
    with ClientConn(stack.port) as c:
        c.send(batch)
        rs = [c.read_response() for _ in range(4)]
    assert [r.status for r in rs] == [400, 404, 200, 200]
    assert [r.header("x-request-id") for r in rs] == ["p-bad", "p-404", "p-hz", "p-good"]
    assert rs[0].json["error"]["code"] == "invalid_request"
    assert rs[3].json["model"] == "p-good"
    assert [q.model for q in stack.mock.requests] == ["p-good"]


def test_connection_close_request_ends_the_connection_after_its_response(
    stack_factory: Any,
) -> None:
    stack = stack_factory(chunks=2)
    first = request_bytes("POST", "/v1/chat/completions", chat_body("closing"),
                          headers=[(b"connection", b"close")])
    second = request_bytes("POST", "/v1/chat/completions", chat_body("never"))
    with ClientConn(stack.port) as c:
        c.send(first + second)
        r = c.read_response()
        assert c.closed_by_peer(2.0)
        assert c.buf == b""  # nothing after the first response
    assert r.status == 200 and r.json["model"] == "closing"
    assert (r.header("connection") or "").lower() == "close"
    assert [q.model for q in stack.mock.requests] == ["closing"]


def test_expect_100_continue_then_body(stack_factory: Any) -> None:
    stack = stack_factory(chunks=2)
    body = orjson.dumps(chat_body("expecting"))
    head = request_bytes("POST", "/v1/chat/completions", headers=[
        (b"content-type", b"application/json"), (b"expect", b"100-continue"),
        (b"content-length", b"%d" % len(body))])
    with ClientConn(stack.port) as c:
        c.send(head)
        line = c._read_line()
        assert line == b"HTTP/1.1 100 Continue"
        assert c._read_line() == b""
        c.send(body)
        r = c.read_response()
    assert r.status == 200 and r.json["model"] == "expecting"
    sent = stack.mock.requests[0]
    assert sent.header("expect") is None and sent.body == body


def test_chunked_request_body_is_forwarded_with_content_length(stack_factory: Any) -> None:
    stack = stack_factory(chunks=2)
    body = chat_body("chunky", text="z " * 5000)
    r = roundtrip(stack.port, request_bytes("POST", "/v1/chat/completions", body, chunked=True))
    assert r.status == 200 and r.json["model"] == "chunky"
    sent = stack.mock.requests[0]
    assert sent.body == orjson.dumps(body)
    assert sent.header("transfer-encoding") is None
    assert sent.header("content-length") == str(len(sent.body))


def test_response_framing_headers_are_single_and_consistent(stack_factory: Any) -> None:
    stack = stack_factory(chunks=3)
    with ClientConn(stack.port) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True)))
        s = c.read_response()
        c.send(request_bytes("POST", "/v1/chat/completions", chat_body()))
        j = c.read_response()
    assert s.header_all("transfer-encoding") == ["chunked"]
    assert s.header_all("content-length") == []
    assert (s.header("content-type") or "").startswith("text/event-stream")
    assert j.header_all("content-length") == [str(len(j.body))]
    assert j.header_all("transfer-encoding") == []
    for r in (s, j):
        assert len(r.header_all("x-request-id")) == 1
        # The provider's hop-by-hop headers are not relayed.
        assert r.header("keep-alive") is None
        assert all(v.lower() != "keep-alive" for v in r.header_all("connection"))


def test_client_gone_before_first_byte_cancels_upstream_and_is_metered(
    stack_factory: Any,
) -> None:
    stack = stack_factory(chunks=3)
    c = ClientConn(stack.port)
    c.send(request_bytes("POST", "/v1/chat/completions", chat_body(stream=True),
                         headers=[(b"x-mock-first-byte-ms", b"2000")]))
    deadline = time.monotonic() + 2
    while not stack.mock.requests and time.monotonic() < deadline:
        time.sleep(0.005)
    assert stack.mock.requests
    t_close = time.monotonic()
    c.close()
    sent = stack.mock.requests[0]
    while sent.connection.closed_at is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sent.connection.closed_at is not None
    assert sent.connection.closed_at - t_close < 0.2
    assert sent.first_byte_at is None and not sent.completed
    stack.stop()
    (row,) = stack.rows()
    assert row["outcome"] == "client_disconnect"
    assert row["bytes_out"] == 0 and row["ttft_ms"] is None and row["status"] == 0
    # The provider had the request and may have billed its prompt: a prompt-only estimate.
    assert row["usage_source"] == "estimated"
    assert row["completion_tokens"] == 0
    assert abs(row["prompt_tokens"] - sent.prompt_tokens) <= 2
    assert row["total_tokens"] == row["prompt_tokens"]


def test_upstream_connection_reused_after_provider_error(stack_factory: Any) -> None:
    stack = stack_factory(chunks=2)
    for fault, status in ((b"status:429", 429), (b"status:500", 500), (b"none", 200),
                          (b"status:400", 400)):
        r = roundtrip(stack.port, request_bytes(
            "POST", "/v1/chat/completions", chat_body(), headers=[(b"x-mock-fault", fault)]))
        assert r.status == status and r.complete
    assert stack.mock.requests_total == 4
    assert stack.mock.connections_accepted == 1
