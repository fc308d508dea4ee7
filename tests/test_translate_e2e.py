"""Cross-format translation over real loopback sockets: the official openai and anthropic
SDKs stream through the sidecar to a same-format and to an other-format mock provider
(text, tool calls, finish reasons; the meter rows exact), and an Anthropic route whose
primary answers 429 fails over to an OpenAI-format upstream, seen by the anthropic SDK
as one normal stream."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import orjson
import pytest
from conftest import Stack
from e2e_helpers import ClientConn, request_bytes

from sidecar.config import Config, MeterConfig, RouteConfig, RouteUpstream, UpstreamConfig
from sidecar.mock import expected_text, expected_tool_arguments

CHUNKS = 6
TOOLS_OAI = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]
TOOLS_ANTH = [{"name": "get_weather", "description": "Weather of a city",
               "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}]
SYSTEM = "You are terse."
QUESTION = "Say something about foxes."


def _up(name: str, port: int, fmt: str) -> UpstreamConfig:
    return UpstreamConfig(name=name, url=f"http://127.0.0.1:{port}", scheme="http",
                          host="127.0.0.1", port=port, format=fmt,  # type: ignore[arg-type]
                          api_key="sk-" + name)


class Providers(Stack):
    """An OpenAI-format and an Anthropic-format mock, and an Anthropic-format one that
    answers 429. Routes pick the upstream by model: gpt-* -> OpenAI, claude-* ->
    Anthropic, on both paths; claude-failover: the 429 one first, then OpenAI."""

    async def _start_upstreams(self) -> Config:
        from sidecar.mock import MockUpstream

        self.oai = MockUpstream(chunks=CHUNKS)
        self.anth = MockUpstream(api_format="anthropic", chunks=CHUNKS)
        self.busy = MockUpstream(api_format="anthropic", fault="status:429", retry_after=0)
        for m in (self.oai, self.anth, self.busy):
            await m.start()
        oai = _up("oai", self.oai.port, "openai")
        anth = _up("anth", self.anth.port, "anthropic")
        busy = _up("busy", self.busy.port, "anthropic")
        routes = []
        for path in ("/v1/chat/completions", "/v1/messages"):
            routes += [
                RouteConfig(path=path, models=("claude-failover",), strategy="priority",
                            upstreams=(RouteUpstream(busy), RouteUpstream(oai))),
                RouteConfig(path=path, models=("gpt-*",), upstreams=(RouteUpstream(oai),)),
                RouteConfig(path=path, models=("claude-*",), upstreams=(RouteUpstream(anth),)),
            ]
        return Config(listen_host="127.0.0.1", listen_port=0, routes=tuple(routes),
                      meter=MeterConfig(db=self.db), source="<test>")

    async def _stop_upstreams(self) -> None:
        for m in (self.oai, self.anth, self.busy):
            await m.stop()


@pytest.fixture
def providers(tmp_path: pathlib.Path) -> Iterator[Providers]:
    s = Providers(tmp_path, {}, None)
    s.start()
    yield s
    s.stop()


def _openai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="sk-client", max_retries=0)


def _anthropic(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key="sk-client", max_retries=0)


def _oai_stream(stack: Stack, model: str, **extra: Any) -> list[Any]:
    stream = _openai(stack).chat.completions.create(
        model=model, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        **extra)
    return list(stream)


def _check_row(row: dict[str, Any], mock_req: Any, upstream: str, fmt: str) -> None:
    """The row holds exactly what the provider reported, in the same columns whichever
    format it spoke."""
    assert row["upstream"] == upstream and row["api_format"] == fmt
    assert row["usage_source"] == "reported" and row["usage_approx"] == 0
    assert row["outcome"] == "ok" and row["status"] == 200
    assert row["prompt_tokens"] == mock_req.prompt_tokens
    assert row["completion_tokens"] == mock_req.completion_tokens
    assert row["total_tokens"] == mock_req.prompt_tokens + mock_req.completion_tokens


@pytest.mark.parametrize(("model", "upstream", "fmt"), [("gpt-4o-mini", "oai", "openai"),
                                                       ("claude-x-1", "anth", "anthropic")])
def test_openai_sdk_streams_text_and_a_tool_call_through_either_format(
        providers: Providers, model: str, upstream: str, fmt: str) -> None:
    mock = providers.oai if fmt == "openai" else providers.anth
    chunks = _oai_stream(providers, model)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(CHUNKS)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    text_req = mock.requests[-1]
    assert chunks[-1].usage.prompt_tokens == text_req.prompt_tokens
    assert chunks[-1].usage.completion_tokens == text_req.completion_tokens

    tool_chunks = _oai_stream(providers, model, tools=TOOLS_OAI, tool_choice="auto")
    tool_req = mock.requests[-1]
    calls = [tc for c in tool_chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert calls[0].id and calls[0].function is not None
    assert calls[0].function.name == "get_weather"
    assert "".join(tc.function.arguments or "" for tc in calls if tc.function) == \
        expected_tool_arguments(CHUNKS)
    assert {tc.index for tc in calls} == {0}
    finishes = [c.choices[0].finish_reason for c in tool_chunks if c.choices]
    assert finishes[-1] == "tool_calls" and set(finishes[:-1]) == {None}

    if fmt == "anthropic":  # what the Anthropic upstream was actually sent
        sent = tool_req.json
        assert tool_req.path == "/v1/messages" and sent["system"] == SYSTEM
        assert sent["max_tokens"] == 4096 and sent["tools"] == TOOLS_ANTH
        assert sent["tool_choice"] == {"type": "auto"} and "stream_options" not in sent
        assert tool_req.headers["x-api-key"] == "sk-anth"
        assert "authorization" not in tool_req.headers
    providers.stop()
    rows = providers.rows()
    assert len(rows) == 2
    _check_row(rows[0], text_req, upstream, fmt)
    _check_row(rows[1], tool_req, upstream, fmt)
    assert rows[0]["path"] == "/v1/chat/completions"


@pytest.mark.parametrize(("model", "upstream", "fmt"), [("claude-x-1", "anth", "anthropic"),
                                                       ("gpt-4o-mini", "oai", "openai")])
def test_anthropic_sdk_streams_text_and_a_tool_call_through_either_format(
        providers: Providers, model: str, upstream: str, fmt: str) -> None:
    mock = providers.oai if fmt == "openai" else providers.anth
    client = _anthropic(providers)
    body: dict[str, Any] = {"model": model, "max_tokens": 500, "system": SYSTEM,
                            "messages": [{"role": "user", "content": QUESTION}]}
    with client.messages.stream(**body) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    text_req = mock.requests[-1]
    assert text == expected_text(CHUNKS)
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == text_req.completion_tokens
    assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) == \
        text_req.prompt_tokens

    with client.messages.stream(**body, tools=TOOLS_ANTH) as stream:
        events = list(stream)
        final = stream.get_final_message()
    tool_req = mock.requests[-1]
    partial = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta"
                      and e.delta.type == "input_json_delta")
    assert partial == expected_tool_arguments(CHUNKS)
    (block,) = final.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.id
    assert block.input == orjson.loads(expected_tool_arguments(CHUNKS))
    assert final.stop_reason == "tool_use"
    assert final.usage.output_tokens == tool_req.completion_tokens

    if fmt == "openai":  # what the OpenAI upstream was actually sent
        sent = tool_req.json
        assert tool_req.path == "/v1/chat/completions"
        assert sent["messages"][0] == {"role": "system", "content": SYSTEM}
        assert sent["max_tokens"] == 500 and sent["tools"] == TOOLS_OAI
        assert sent["stream_options"] == {"include_usage": True}
        assert tool_req.headers["authorization"] == "Bearer sk-oai"
        assert not any(h.startswith("anthropic-") or h == "x-api-key"
                       for h in tool_req.headers)
    providers.stop()
    rows = providers.rows()
    assert len(rows) == 2
    _check_row(rows[0], text_req, upstream, fmt)
    _check_row(rows[1], tool_req, upstream, fmt)
    assert rows[0]["path"] == "/v1/messages"


def test_claude_429_fails_over_to_an_openai_upstream_as_one_anthropic_stream(
        providers: Providers) -> None:
    client = _anthropic(providers)
    events: list[Any] = []
    with client.messages.stream(model="claude-failover", max_tokens=300, system=SYSTEM,
                                messages=[{"role": "user", "content": QUESTION}]) as stream:
        for event in stream:
            events.append(event)
        final = stream.get_final_message()
    assert len(providers.busy.requests) == 1 and providers.busy.requests[0].status == 429
    served = providers.oai.requests[-1]
    assert served.path == "/v1/chat/completions" and served.json["max_tokens"] == 300
    # One well-formed Messages stream: one message_start, one message_stop, in order.
    kinds = [e.type for e in events]
    assert kinds.count("message_start") == 1 and kinds[-1] == "message_stop"
    assert kinds.count("message_stop") == 1
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta"
                   and e.delta.type == "text_delta")
    assert text == expected_text(CHUNKS)
    assert final.content[0].type == "text" and final.content[0].text == expected_text(CHUNKS)
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == served.completion_tokens
    assert final.usage.input_tokens == served.prompt_tokens
    providers.stop()
    (row,) = providers.rows()
    assert row["attempts"] == 2 and row["upstream"] == "oai"
    assert orjson.loads(row["failed_attempts"]) == [{"upstream": "busy", "reason": "429"}]
    _check_row(row, served, "oai", "openai")


def test_cache_tokens_land_in_the_same_columns_from_either_format(
        providers: Providers) -> None:
    cached = {"x-mock-cache-read-tokens": "5"}
    oai = _openai(providers)
    for model in ("gpt-4o-mini", "claude-x-1"):
        resp = oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], extra_headers=cached)
        assert resp.choices[0].message.content == expected_text(CHUNKS)
        assert resp.choices[0].finish_reason == "stop"
        assert resp.usage is not None and resp.usage.prompt_tokens_details is not None
        assert resp.usage.prompt_tokens_details.cached_tokens == 5
    ant = _anthropic(providers)
    msg = ant.messages.create(model="gpt-4o-mini", max_tokens=50, extra_headers=cached,
                              messages=[{"role": "user", "content": QUESTION}])
    assert msg.content[0].type == "text" and msg.content[0].text == expected_text(CHUNKS)
    assert msg.usage.cache_read_input_tokens == 5 and msg.stop_reason == "end_turn"
    reqs = [providers.oai.requests[0], providers.anth.requests[0], providers.oai.requests[1]]
    providers.stop()
    rows = providers.rows()
    assert [r["api_format"] for r in rows] == ["openai", "anthropic", "openai"]
    for row, req in zip(rows, reqs, strict=True):
        assert row["cache_read_tokens"] == 5 and row["stream"] == 0
        _check_row(row, req, row["upstream"], row["api_format"])


def test_untranslatable_fields_get_400_naming_them_and_nothing_is_sent(
        providers: Providers) -> None:
    with ClientConn(providers.port) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", {
            "model": "claude-x-1", "n": 2, "messages": [{"role": "user", "content": "hi"}]}))
        resp = c.read_response()
        assert resp.status == 400
        err = orjson.loads(resp.body)["error"]
        assert err["message"].startswith("n: only n=1") and err["code"] == "unsupported_field"
        c.send(request_bytes("POST", "/v1/messages", {
            "model": "gpt-4o-mini", "max_tokens": 5, "top_k": 3,
            "messages": [{"role": "user", "content": "hi"}]}))
        resp = c.read_response()
        assert resp.status == 400 and "top_k" in orjson.loads(resp.body)["error"]["message"]
        # Same format: nothing to translate, the request goes as sent.
        c.send(request_bytes("POST", "/v1/chat/completions", {
            "model": "gpt-4o-mini", "n": 1, "seed": 3,
            "messages": [{"role": "user", "content": "hi"}]}))
        assert c.read_response().status == 200
    assert len(providers.anth.requests) == 0 and len(providers.oai.requests) == 1
    providers.stop()
    rows = providers.rows()
    assert [(r["status"], r["outcome"]) for r in rows] == [(400, "rejected"), (400, "rejected"),
                                                           (200, "ok")]


def test_an_upstream_error_is_translated_to_the_clients_format(
        providers: Providers) -> None:
    oai = _openai(providers)
    with pytest.raises(openai.RateLimitError) as err:
        oai.chat.completions.create(model="claude-x-1", extra_headers={
            "x-mock-fault": "status:429"}, messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 429
    assert err.value.body == {"message": "rate_limit_error (mock)", "type": "requests",
                              "code": "rate_limit_exceeded"}
    ant = _anthropic(providers)
    with pytest.raises(anthropic.RateLimitError) as aerr:
        ant.messages.create(model="gpt-4o-mini", max_tokens=5, extra_headers={
            "x-mock-fault": "status:429"}, messages=[{"role": "user", "content": "hi"}])
    assert aerr.value.body == {"type": "error", "error": {
        "type": "rate_limit_error", "message": "Rate limit reached for requests (mock)."}}


def test_a_stream_cut_mid_way_ends_with_an_error_event_in_the_clients_format(
        providers: Providers) -> None:
    with ClientConn(providers.port) as c:
        c.send(request_bytes("POST", "/v1/messages", {
            "model": "gpt-4o-mini", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]},
            headers=[(b"x-mock-fault", b"disconnect-after:2")]))
        resp = c.read_response()
    assert resp.status == 200
    body = resp.body
    assert body.startswith(b"event: message_start\n")
    assert body.rstrip().split(b"\n\n")[-1].startswith(b"event: error\ndata: ")
    assert b"message_stop" not in body and b"[DONE]" not in body
    providers.stop()
    (row,) = providers.rows()
    assert row["outcome"] == "upstream_error" and row["api_format"] == "openai"




def test_usage_chunk_only_when_asked_and_estimates_read_the_translated_request(
        providers: Providers) -> None:
    body = {"model": "claude-x-1", "stream": True,
            "messages": [{"role": "user", "content": QUESTION}]}
    with ClientConn(providers.port) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", body))
        plain = c.read_response()
        c.send(request_bytes("POST", "/v1/chat/completions", body,
                             headers=[(b"x-mock-fault", b"no-usage")]))
        unreported = c.read_response()
    for resp in (plain, unreported):
        assert resp.status == 200
        assert resp.body.endswith(b"data: [DONE]\n\n") and b'"usage"' not in resp.body
        assert b'"finish_reason":"stop"' in resp.body
    served = providers.anth.requests
    providers.stop()
    rows = providers.rows()
    _check_row(rows[0], served[0], "anth", "anthropic")
    # No usage from the provider: estimated from the Messages request it was sent and the
    # Anthropic stream it answered with (the text of its deltas).
    from sidecar.tokenizer import Tokenizer

    assert rows[1]["usage_source"] == "estimated"
    assert rows[1]["prompt_tokens"] == Tokenizer.load().count_prompt(
        served[1].json, "anthropic", "/v1/messages")[0]
    assert rows[1]["completion_tokens"] == served[1].completion_tokens
