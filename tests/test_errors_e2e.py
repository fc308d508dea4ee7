"""End to end over real loopback sockets: how the sidecar fails.

Client mistakes, oversize bodies, broken HTTP, unreachable, hanging and
refusing providers, and a provider that cuts a stream half way. Every error the
sidecar writes itself is OpenAI-style JSON with a fitting status and an
x-request-id; every one that matched a route leaves exactly one meter row that
bills nothing, and no secret ever shows up in a response or in the meter file.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any

import orjson
import pytest
from e2e_helpers import (
    ClientConn,
    assert_ends_with_stream_error,
    assert_openai_error,
    chat_body,
    chat_text,
    closed_port,
    edit_limits,
    edit_timeouts,
    edit_upstreams,
    only_row,
    read_cut_response,
    request_bytes,
    roundtrip,
    rows_by_id,
)

from sidecar.config import Config
from sidecar.mock_shapes import count_tokens, expected_text

SECRET = "sk-upstream-NEVER-SHOW-ME-0123456789abcdef"


def _keyed(config: Config) -> Config:
    return edit_upstreams(lambda u: dataclasses.replace(u, api_key=SECRET))(config)


def _assert_no_secret_on_disk(tmp_path: pathlib.Path) -> None:
    """The configured key appears nowhere in the meter database (nor WAL, SHM or spill)."""
    files = [p for p in tmp_path.iterdir() if p.is_file() and p.name.startswith("meter.db")]
    assert any(p.name == "meter.db" for p in files), files
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), p
        assert SECRET[-16:].encode() not in p.read_bytes(), p


def _assert_bills_nothing(row: dict[str, Any]) -> None:
    assert row["usage_source"] == "none", row
    for col in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert row[col] in (0, None), (col, row)


# ---------------------------------------------------------------------------- client errors


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b'{"model": "gpt-4o-mini", "messages": [', "json"),
        (b"\xff\xfe not even utf-8", "json"),
        (b"", "json"),
        (b'[{"model": "gpt-4o-mini"}]', "object"),
        (b'"just a string"', "object"),
        (b"42", "object"),
    ],
    ids=["truncated", "binary", "empty", "array", "string", "number"],
)
def test_bad_json_body_is_400_and_metered_as_rejected(
    stack_factory: Any, payload: bytes, needle: str,
) -> None:
    stack = stack_factory()
    with ClientConn(stack.port) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", payload,
                             headers=[(b"x-request-id", b"bad-json-1")]))
        r = c.read_response()
        err = assert_openai_error(r, 400, "invalid_request")
        assert err["type"] == "invalid_request_error"
        assert needle in err["message"].lower()
        assert r.header("x-request-id") == "bad-json-1"
        # A client mistake does not cost the connection: the next request is served.
        c.send(request_bytes("POST", "/v1/chat/completions", chat_body(),
                             headers=[(b"x-request-id", b"good-1")]))
        assert c.read_response().status == 200
    assert stack.mock.requests_total == 1  # the bad one never reached the provider
    stack.stop()
    rows = rows_by_id(stack.rows())
    assert set(rows) == {"bad-json-1", "good-1"}
    bad, good = rows["bad-json-1"], rows["good-1"]
    assert bad["status"] == 400 and bad["outcome"] == "rejected"
    assert bad["route"] == "/v1/chat/completions"
    _assert_bills_nothing(bad)
    assert good["outcome"] == "ok" and good["usage_source"] == "reported"


def test_unknown_path_is_404_without_a_meter_row(stack_factory: Any) -> None:
    stack = stack_factory()
    with ClientConn(stack.port) as c:
        c.send(request_bytes("POST", "/v1/unknown", chat_body()))
        r = c.read_response()
        assert_openai_error(r, 404, "not_found")
        c.send(request_bytes("GET", "/"))
        r2 = c.read_response()
        assert_openai_error(r2, 404, "not_found")
        # prefix of a route is not the route
        c.send(request_bytes("POST", "/v1/chat/completions/extra", chat_body()))
        assert_openai_error(c.read_response(), 404)
    assert stack.mock.requests_total == 0
    stack.stop()
    assert stack.rows() == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_wrong_method_on_api_path_is_405_with_allow(stack_factory: Any, method: str) -> None:
    stack = stack_factory()
    body = chat_body() if method == "PUT" else None
    r = roundtrip(stack.port, request_bytes(method, "/v1/chat/completions", body))
    err = assert_openai_error(r, 405, "method_not_allowed")
    assert method in err["message"]
    assert r.header("allow") == "POST"
    assert stack.mock.requests_total == 0
    row = only_row(stack)
    assert row["status"] == 405 and row["outcome"] == "rejected"
    assert row["route"] == "/v1/chat/completions"
    _assert_bills_nothing(row)


# ---------------------------------------------------------------------------- too large


_small_body_limit = edit_limits(max_body_bytes=2048)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_limit_is_413_connection_closed_and_metered(
    stack_factory: Any, chunked: bool,
) -> None:
    stack = stack_factory(config_edit=_small_body_limit)
    big = chat_body(text="word " * 2000)  # ~10 KB
    assert len(orjson.dumps(big)) > 2048
    with ClientConn(stack.port) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", big, chunked=chunked,
                             headers=[(b"x-request-id", b"too-big-1")]))
        r = c.read_response()
        err = assert_openai_error(r, 413, "request_too_large")
        assert "2048" in err["message"]
        assert (r.header("connection") or "").lower() == "close"
        assert c.closed_by_peer(2.0)
    assert stack.mock.requests_total == 0
    row = only_row(stack)
    assert row["status"] == 413 and row["outcome"] == "rejected"
    assert row["route"] == "/v1/chat/completions"
    _assert_bills_nothing(row)


def test_body_at_limit_is_accepted(stack_factory: Any) -> None:
    stack = stack_factory(config_edit=_small_body_limit)
    body = chat_body(text="")
    pad = 2048 - len(orjson.dumps(body))
    body = chat_body(text="a" * pad)
    assert len(orjson.dumps(body)) == 2048
    r = roundtrip(stack.port, request_bytes("POST", "/v1/chat/completions", body))
    assert r.status == 200
    assert stack.mock.requests[0].body == orjson.dumps(body)


# ---------------------------------------------------------------------------- malformed HTTP


@pytest.mark.parametrize(
    "raw",
    [
        b"THIS IS NOT HTTP\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        b"zz\r\n{}\r\n0\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}",  # no host
    ],
    ids=["garbage", "header-line", "content-length", "chunk-size", "no-host"],
)
def test_malformed_http_is_400_and_connection_closed(stack_factory: Any, raw: bytes) -> None:
    stack = stack_factory()
    with ClientConn(stack.port) as c:
        c.send(raw)
        r = c.read_response()
        assert_openai_error(r, 400)
        assert (r.header("connection") or "").lower() == "close"
        assert c.closed_by_peer(2.0)
    assert stack.mock.requests_total == 0
    # The server is unharmed.
    assert roundtrip(stack.port, request_bytes("GET", "/healthz")).status == 200
    stack.stop()
    rows = stack.rows()
    if b"zz\r\n" in raw:
        # The head named a route before the body broke: that request is metered.
        (row,) = rows
        assert row["status"] == 400 and row["outcome"] == "rejected"
        assert row["route"] == "/v1/chat/completions"
        _assert_bills_nothing(row)
    else:
        assert rows == []


# ---------------------------------------------------------------------------- upstream failures


def _to_closed_port(config: Config) -> Config:
    port = closed_port()
    return edit_upstreams(lambda u: dataclasses.replace(
        u, url=f"http://127.0.0.1:{port}", port=port, api_key=SECRET))(config)


@pytest.mark.parametrize("stream", [False, True])
def test_unreachable_upstream_is_502_with_upstream_error_row(
    stack_factory: Any, tmp_path: pathlib.Path, stream: bool,
) -> None:
    stack = stack_factory(config_edit=_to_closed_port)
    r = roundtrip(stack.port, request_bytes(
        "POST", "/v1/chat/completions", chat_body(stream=stream),
        headers=[(b"x-request-id", b"unreach-1")]))
    err = assert_openai_error(r, 502)
    assert err["type"] == "upstream_error"
    assert r.header("x-request-id") == "unreach-1"
    assert SECRET.encode() not in r.raw_body
    row = only_row(stack)
    assert row["request_id"] == "unreach-1"
    assert row["status"] == 502 and row["outcome"] == "upstream_error"
    assert row["stream"] == int(stream) and row["upstream"] == "mock-openai"
    _assert_bills_nothing(row)
    assert row["ttft_ms"] is None
    _assert_no_secret_on_disk(tmp_path)


def _short_first_byte(config: Config) -> Config:
    return edit_timeouts(first_byte=0.3)(_keyed(config))


@pytest.mark.parametrize("stream", [False, True])
def test_hanging_upstream_is_504_after_first_byte_timeout(
    stack_factory: Any, tmp_path: pathlib.Path, stream: bool,
) -> None:
    stack = stack_factory(config_edit=_short_first_byte)
    t0 = time.monotonic()
    r = roundtrip(stack.port, request_bytes(
        "POST", "/v1/chat/completions", chat_body(stream=stream),
        headers=[(b"x-mock-fault", b"hang")]))
    elapsed = time.monotonic() - t0
    err = assert_openai_error(r, 504, "upstream_timeout")
    assert err["type"] == "upstream_error"
    assert SECRET.encode() not in r.raw_body
    assert 0.25 <= elapsed < 2.0, elapsed
    # The hung provider connection was given up, not returned to the pool.
    sent = stack.mock.requests[0]
    deadline = time.monotonic() + 2
    while sent.connection.closed_at is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent.connection.closed_at is not None
    # The next request works (a fresh upstream connection).
    assert roundtrip(stack.port, request_bytes("POST", "/v1/chat/completions", chat_body(),
                                               headers=[(b"x-request-id", b"ok-1")])).status == 200
    stack.stop()
    hung_id = r.header("x-request-id")
    assert hung_id is not None
    rows = rows_by_id(stack.rows())
    assert set(rows) == {hung_id, "ok-1"}
    hung, ok = rows[hung_id], rows["ok-1"]
    assert hung["status"] == 504 and hung["outcome"] == "upstream_timeout"
    assert hung["ttft_ms"] is None and hung["error"]
    assert ok["outcome"] == "ok"
    _assert_no_secret_on_disk(tmp_path)


def test_malformed_upstream_response_is_502(stack_factory: Any) -> None:
    stack = stack_factory(config_edit=_keyed)
    r = roundtrip(stack.port, request_bytes("POST", "/v1/chat/completions", chat_body(),
                                            headers=[(b"x-mock-fault", b"malformed")]))
    err = assert_openai_error(r, 502)
    assert err["type"] == "upstream_error"
    assert SECRET.encode() not in r.raw_body
    row = only_row(stack)
    assert row["status"] == 502 and row["outcome"] == "upstream_error"
    _assert_bills_nothing(row)


@pytest.mark.parametrize(
    ("status", "stream"),
    [(429, False), (429, True), (500, False), (503, True)],
)
def test_provider_error_status_body_and_retry_after_pass_through(
    stack_factory: Any, tmp_path: pathlib.Path, status: int, stream: bool,
) -> None:
    stack = stack_factory(config_edit=_keyed)
    with ClientConn(stack.port) as c:
        c.send(request_bytes(
            "POST", "/v1/chat/completions", chat_body(stream=stream),
            headers=[(b"x-mock-fault", b"status:%d" % status), (b"x-mock-retry-after", b"7"),
                     (b"x-request-id", b"prov-err-1")]))
        r = c.read_response()
        # A provider's refusal does not cost the client its connection.
        c.send(request_bytes("POST", "/v1/chat/completions", chat_body(),
                             headers=[(b"x-request-id", b"ok-1")]))
        again = c.read_response()
    assert again.status == 200
    sent = stack.mock.requests[0]
    assert sent.status == status
    assert r.status == status and r.complete
    assert r.header("x-request-id") == "prov-err-1"
    # The provider's own body, byte for byte (not re-wrapped, not stream-stripped).
    direct = roundtrip(stack.mock.port, request_bytes(
        "POST", "/v1/chat/completions", chat_body(stream=stream),
        headers=[(b"x-mock-fault", b"status:%d" % status), (b"x-mock-retry-after", b"7")]))
    assert r.body == direct.body
    assert r.json["error"]["message"] == direct.json["error"]["message"]
    if status in (429, 503):
        assert r.header("retry-after") == "7"
    if status == 429:
        assert r.header("x-ratelimit-remaining-requests") == "0"
    assert SECRET.encode() not in r.raw_body
    stack.stop()
    rows = rows_by_id(stack.rows())
    assert set(rows) == {"prov-err-1", "ok-1"}
    row, ok = rows["prov-err-1"], rows["ok-1"]
    assert row["status"] == status and row["stream"] == int(stream)
    _assert_bills_nothing(row)
    assert ok["status"] == 200 and ok["usage_source"] == "reported"
    _assert_no_secret_on_disk(tmp_path)


# ---------------------------------------------------------------------------- mid-stream cut


@pytest.mark.parametrize("client_usage", [False, True], ids=["reframed", "verbatim"])
def test_upstream_cut_mid_stream_ends_with_an_error_event_and_meters_estimate(
    stack_factory: Any, client_usage: bool,
) -> None:
    stack = stack_factory(chunks=10)
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if client_usage else {}
    body = chat_body(stream=True, text="Tell me a story about a lighthouse.", **extra)
    r = read_cut_response(stack.port, "/v1/chat/completions", body, 3)
    assert r.status == 200 and r.framing == "chunked"
    # The client can tell the stream is broken: it ends with an error event, no [DONE].
    assert_ends_with_stream_error(r)
    received = chat_text(r)
    sent = stack.mock.requests[0]
    assert sent.chunks_sent == 3 and not sent.completed
    assert received and expected_text(10).startswith(received)
    assert not any(b'"usage":{' in d for d in r.sse_data())
    row = only_row(stack)
    assert row["outcome"] == "upstream_error"
    assert row["status"] == 200
    assert row["usage_source"] == "estimated"
    truth = count_tokens(received, "o200k_base")
    assert abs(row["completion_tokens"] - truth) <= 2, (row["completion_tokens"], truth)
    assert abs(row["prompt_tokens"] - sent.prompt_tokens) <= 2
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
    assert row["bytes_out"] > 0 and row["error"]


def test_upstream_cut_in_non_streaming_body_is_truncated_and_not_ok(stack_factory: Any) -> None:
    stack = stack_factory(chunks=10)
    r = read_cut_response(stack.port, "/v1/chat/completions", chat_body(), 3)
    assert r.status == 200 and r.framing == "length"
    assert not r.complete  # fewer bytes than content-length announced
    row = only_row(stack)
    assert row["outcome"] == "upstream_error"
    assert row["usage_source"] != "reported"


# ---------------------------------------------------------------------------- secrets


def test_api_key_never_reaches_the_meter_file(stack_factory: Any, tmp_path: pathlib.Path) -> None:
    stack = stack_factory(config_edit=_keyed, chunks=3)
    heads = [
        request_bytes("POST", "/v1/chat/completions", chat_body(stream=True)),
        request_bytes("POST", "/v1/chat/completions", chat_body()),
        request_bytes("POST", "/v1/chat/completions", chat_body(),
                      headers=[(b"x-mock-fault", b"status:401")]),
        request_bytes("POST", "/v1/chat/completions", chat_body(stream=True),
                      headers=[(b"x-mock-fault", b"disconnect-after:1")]),
        request_bytes("POST", "/v1/chat/completions", b"not json"),
        request_bytes("POST", "/v1/messages", {"model": "claude-mock-1", "max_tokens": 9,
                                               "messages": [{"role": "user", "content": "x"}]}),
    ]
    for data in heads:
        r = roundtrip(stack.port, data)
        assert SECRET.encode() not in r.raw_body
        assert all(SECRET.encode() not in v for _, v in r.headers)
    # The provider did get it, on every request that reached it.
    assert all(SECRET in (q.header("authorization") or q.header("x-api-key") or "")
               for q in stack.mock.requests)
    assert len(stack.mock.requests) == 5
    stack.stop()
    assert len(stack.rows()) == 6
    _assert_no_secret_on_disk(tmp_path)



@pytest.mark.parametrize("path", ["/v1/completions", "/v1/responses"])
def test_other_openai_streams_cut_mid_way_meter_estimates(stack_factory: Any, path: str) -> None:
    stack = stack_factory(chunks=10)
    if path == "/v1/completions":
        body: dict[str, Any] = {"model": "gpt-4o-mini", "prompt": "Once upon a time",
                                "stream": True}
    else:
        body = {"model": "gpt-4o-mini", "input": "Once upon a time", "stream": True}
    r = read_cut_response(stack.port, path, body, 3)
    assert r.status == 200
    assert_ends_with_stream_error(r)
    text = ""
    for data in r.sse_data():
        if not data.startswith(b"{"):
            continue
        ev = orjson.loads(data)
        if path == "/v1/completions":
            text += "".join(ch.get("text", "") for ch in ev.get("choices") or ())
        elif ev.get("type") == "response.output_text.delta":
            text += ev["delta"]
    assert text and expected_text(10).startswith(text) and text != expected_text(10)
    sent = stack.mock.requests[0]
    row = only_row(stack)
    assert row["outcome"] == "upstream_error" and row["usage_source"] == "estimated"
    truth = count_tokens(text, "o200k_base")
    assert abs(row["completion_tokens"] - truth) <= 2, (row["completion_tokens"], truth)
    # The sidecar counts a Responses string input as one user message (with OpenAI's
    # per-message framing, as the provider bills it); the mock reports the bare text.
    framing = 6 if path == "/v1/responses" else 0
    assert 0 <= row["prompt_tokens"] - sent.prompt_tokens <= framing + 2, (
        row["prompt_tokens"], sent.prompt_tokens)
