"""OpenAI <-> Anthropic translation cores (sidecar.translate): requests both ways, whole
bodies and errors, streams event by event, split invariance (hypothesis), bounds."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sse import split

from sidecar.errors import UpstreamProtocolError
from sidecar.translate import (
    DEFAULT_MAX_TOKENS,
    Untranslatable,
    response_filter,
    translate_body,
    translate_request,
    upstream_target,
)

# ---------------------------------------------------------------- requests

TOOLS_OAI = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
TOOLS_ANTH = [{"name": "get_weather", "description": "Weather of a city",
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                "required": ["city"]}}]
PNG = "iVBORw0KGgo="


def _oai_conversation() -> dict[str, Any]:
    return {
        "model": "gpt-4o", "stream": True, "temperature": 0.5, "top_p": 0.9,
        "stop": ["\n\nHuman:"], "max_completion_tokens": 300, "user": "u-1",
        "tools": TOOLS_OAI, "tool_choice": "required", "parallel_tool_calls": False,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather here?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg",
                                                    "detail": "auto"}}]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Bergen"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text",
                                                                    "text": "rain"}]},
            {"role": "user", "content": "Thanks"},
        ],
    }


def test_openai_request_becomes_an_anthropic_request() -> None:
    out = translate_request(_oai_conversation(), "openai", "anthropic")
    assert out == {
        "model": "gpt-4o", "system": "Be brief.\n\nUse tools.", "max_tokens": 300,
        "temperature": 0.5, "top_p": 0.9, "stop_sequences": ["\n\nHuman:"], "stream": True,
        "tools": TOOLS_ANTH,
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "metadata": {"user_id": "u-1"},
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Weather here?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": PNG}},
                {"type": "image", "source": {"type": "url",
                                             "url": "https://example.com/a.jpg"}}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather",
                 "input": {"city": "Oslo"}},
                {"type": "tool_use", "id": "call_2", "name": "get_weather",
                 "input": {"city": "Bergen"}}]},
            # Both tool results and the next user text: one user turn (turns alternate).
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "rain"},
                {"type": "text", "text": "Thanks"}]},
        ],
    }


def test_max_tokens_default_reserve_and_tool_choice_forms() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert translate_request(base, "openai", "anthropic")["max_tokens"] == DEFAULT_MAX_TOKENS
    assert translate_request(base, "openai", "anthropic", 123)["max_tokens"] == 123
    assert translate_request({**base, "max_tokens": 9}, "openai", "anthropic")["max_tokens"] == 9
    for choice, want in (("auto", {"type": "auto"}), ("none", {"type": "none"}),
                         ({"type": "function", "function": {"name": "f"}},
                          {"type": "tool", "name": "f"})):
        got = translate_request({**base, "tools": TOOLS_OAI, "tool_choice": choice},
                                "openai", "anthropic")
        assert got["tool_choice"] == want
    # Neutral values of fields Anthropic lacks are accepted (and sent nowhere).
    ok = {**base, "n": 1, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0,
          "response_format": {"type": "text"}, "stream_options": {"include_usage": True}}
    assert set(translate_request(ok, "openai", "anthropic")) == {"model", "messages",
                                                                 "max_tokens"}


@pytest.mark.parametrize(("edit", "field"), [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"seed": 7}, "seed"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"temperature": 1.5}, "temperature"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     "messages[0].content[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True}}]},
     "tools[0].function.strict"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{nope"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
])
def test_openai_fields_anthropic_lacks_are_refused_by_name(edit: dict[str, Any],
                                                           field: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **edit}
    with pytest.raises(Untranslatable) as err:
        translate_request(body, "openai", "anthropic")
    assert err.value.field == field and err.value.status == 400
    assert str(err.value).startswith(field + ":") and "Anthropic" in str(err.value)


def test_anthropic_request_becomes_an_openai_request() -> None:
    body = {
        "model": "claude-x", "max_tokens": 200, "stream": True, "temperature": 0.2,
        "stop_sequences": ["END"], "metadata": {"user_id": "u-2"},
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "tools": TOOLS_ANTH, "tool_choice": {"type": "tool", "name": "get_weather",
                                             "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": PNG}},
                {"type": "image", "source": {"type": "url", "url": "https://e.com/b.png"}}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {"type": "text", "text": "And tomorrow?"}]},
            {"role": "assistant", "content": "No idea."},
        ],
    }
    assert translate_request(body, "anthropic", "openai") == {
        "model": "claude-x", "max_tokens": 200, "temperature": 0.2, "stop": ["END"],
        "user": "u-2", "stream": True, "stream_options": {"include_usage": True},
        "tools": TOOLS_OAI, "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "image_url", "image_url": {"url": "https://e.com/b.png"}}]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
            # The tool result first, right after the call, then the turn's own text.
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
            {"role": "user", "content": "And tomorrow?"},
            {"role": "assistant", "content": "No idea."},
        ],
    }


@pytest.mark.parametrize(("edit", "field"), [
    ({"top_k": 5}, "top_k"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "messages[0].content[0].type"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
    ({"metadata": {"other": 1}}, "metadata"),
])
def test_anthropic_fields_openai_lacks_are_refused_by_name(edit: dict[str, Any],
                                                           field: str) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
            **edit}
    with pytest.raises(Untranslatable) as err:
        translate_request(body, "anthropic", "openai")
    assert err.value.field == field and "OpenAI" in str(err.value)


def test_thinking_disabled_translates() -> None:
    body = {"model": "m", "max_tokens": 5, "thinking": {"type": "disabled"},
            "messages": [{"role": "user", "content": "hi"}]}
    assert translate_request(body, "anthropic", "openai")["messages"] == [
        {"role": "user", "content": "hi"}]


def test_upstream_target_swaps_the_endpoint_only() -> None:
    assert upstream_target(b"/v1/chat/completions", "openai", "anthropic") == b"/v1/messages"
    assert upstream_target(b"/v1/messages?beta=true", "anthropic", "openai") == \
        b"/v1/chat/completions?beta=true"
    assert upstream_target(b"/team/v1/messages/", "anthropic", "openai") == \
        b"/team/v1/chat/completions"


# ---------------------------------------------------------------- whole bodies

MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
           "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"},
                       {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}],
           "stop_reason": "tool_use", "stop_sequence": None,
           "usage": {"input_tokens": 10, "cache_read_input_tokens": 5,
                     "cache_creation_input_tokens": 2, "output_tokens": 7}}


def test_message_body_becomes_a_chat_completion() -> None:
    out = orjson.loads(translate_body(orjson.dumps(MESSAGE), "openai", 200, 1700000000))
    assert out == {
        "id": "msg_1", "object": "chat.completion", "created": 1700000000, "model": "claude-x",
        "choices": [{"index": 0, "logprobs": None, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Hi there", "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "f", "arguments": '{"a":1}'}}]}}],
        "usage": {"prompt_tokens": 17, "completion_tokens": 7, "total_tokens": 24,
                  "prompt_tokens_details": {"cached_tokens": 5}}}


def test_chat_completion_body_becomes_a_message() -> None:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
            "choices": [{"index": 0, "finish_reason": "length", "message": {
                "role": "assistant", "content": "Hello", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "f", "arguments": '{"a": 1}'}}]}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24,
                      "prompt_tokens_details": {"cached_tokens": 8}}}
    out = orjson.loads(translate_body(orjson.dumps(body), "anthropic", 200, 0))
    assert out == {
        "id": "chatcmpl-1", "type": "message", "role": "assistant", "model": "gpt-4o",
        "content": [{"type": "text", "text": "Hello"},
                    {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}}],
        "stop_reason": "max_tokens", "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 4, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 8}}


def test_errors_are_translated_to_the_clients_format() -> None:
    anth = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    assert orjson.loads(translate_body(orjson.dumps(anth), "openai", 429, 0)) == {
        "error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}
    oai = {"error": {"message": "bad model", "type": "invalid_request_error", "code": None}}
    assert orjson.loads(translate_body(orjson.dumps(oai), "anthropic", 404, 0)) == {
        "type": "error", "error": {"type": "not_found_error", "message": "bad model"}}
    garbage = orjson.loads(translate_body(b"<html>", "openai", 502, 0))
    assert garbage["error"]["message"] == "upstream answer not JSON"


def test_body_translator_keeps_at_most_its_cap() -> None:
    f = response_filter("openai", False, 200, False, 64, 0)
    assert f.feed(b"x" * 100) == b""
    assert "too large" in orjson.loads(f.flush())["error"]["message"]
    g = response_filter("openai", False, 200, False, 1 << 20, 5)
    raw = orjson.dumps(MESSAGE)
    assert g.feed(raw[:10]) == b"" and g.feed(raw[10:]) == b""
    assert orjson.loads(g.flush())["choices"][0]["message"]["content"] == "Hi there"


# ---------------------------------------------------------------- streams

def _ev(name: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def anthropic_stream(texts: list[str], args: list[str] | None = None,
                     stop: str = "end_turn") -> bytes:
    parts = [_ev("message_start", {"type": "message_start", "message": {
        "id": "msg_9", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 11, "cache_read_input_tokens": 3,
                  "cache_creation_input_tokens": 1, "output_tokens": 1}}}),
        _ev("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "text", "text": ""}}),
        _ev("ping", {"type": "ping"})]
    parts += [_ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": t}})
              for t in texts]
    parts.append(_ev("content_block_stop", {"type": "content_block_stop", "index": 0}))
    if args is not None:
        parts.append(_ev("content_block_start", {"type": "content_block_start", "index": 1,
                                                 "content_block": {"type": "tool_use",
                                                                   "id": "toolu_9",
                                                                   "name": "get_weather",
                                                                   "input": {}}}))
        parts += [_ev("content_block_delta", {"type": "content_block_delta", "index": 1,
                                              "delta": {"type": "input_json_delta",
                                                        "partial_json": a}}) for a in args]
        parts.append(_ev("content_block_stop", {"type": "content_block_stop", "index": 1}))
    parts.append(_ev("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": stop, "stop_sequence": None},
                                       "usage": {"output_tokens": 42}}))
    parts.append(_ev("message_stop", {"type": "message_stop"}))
    return b"".join(parts)


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({
        "id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 5, "model": "gpt-4o",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": None}) + b"\n\n"


def openai_stream(texts: list[str], args: list[str] | None = None,
                  finish: str = "stop") -> bytes:
    parts = [_chunk({"role": "assistant", "content": ""})]
    parts += [_chunk({"content": t}) for t in texts]
    if args is not None:
        parts.append(_chunk({"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                                             "function": {"name": "get_weather",
                                                          "arguments": ""}}]}))
        parts += [_chunk({"tool_calls": [{"index": 0, "function": {"arguments": a}}]})
                  for a in args]
    parts.append(_chunk({}, finish))
    parts.append(b"data: " + orjson.dumps({
        "id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 5, "model": "gpt-4o",
        "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 12,
                                 "total_tokens": 42,
                                 "prompt_tokens_details": {"cached_tokens": 10},
                                 "completion_tokens_details": {"reasoning_tokens": 4}}})
                 + b"\n\n")
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def _data(out: bytes) -> list[Any]:
    """The data of each client event ([DONE] as the string)."""
    events = []
    for block in out.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                raw = line[6:]
                events.append(raw.decode() if raw == b"[DONE]" else orjson.loads(raw))
    return events


def test_anthropic_stream_to_openai_chunks_with_tool_call_and_usage() -> None:
    f = response_filter("openai", True, 200, True, 1 << 20, 77)
    events = _data(f.feed(anthropic_stream(["Hel", "lo"], ['{"city"', ': "Oslo"}'],
                                           "tool_use")) + f.flush())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["id"] == "msg_9" and c["object"] == "chat.completion.chunk"
               and c["created"] == 77 and c["model"] == "claude-x" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas == [
        {"role": "assistant", "content": ""}, {"content": "Hel"}, {"content": "lo"},
        {"tool_calls": [{"index": 0, "id": "toolu_9", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city"'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": ': "Oslo"}'}}]},
        {}]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 15, "completion_tokens": 42, "total_tokens": 57,
        "prompt_tokens_details": {"cached_tokens": 3}}


@pytest.mark.parametrize(("stop", "finish"), [("end_turn", "stop"), ("max_tokens", "length"),
                                              ("stop_sequence", "stop"),
                                              ("tool_use", "tool_calls")])
def test_finish_reasons_to_openai_and_no_usage_chunk_unless_asked(stop: str,
                                                                  finish: str) -> None:
    f = response_filter("openai", True, 200, False, 1 << 20, 0)
    events = _data(f.feed(anthropic_stream(["a"], stop=stop)) + f.flush())
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == finish
    assert not any("usage" in e for e in events[:-1])


def test_openai_stream_to_anthropic_events_with_tool_call_and_usage() -> None:
    f = response_filter("anthropic", True, 200, False, 1 << 20, 0)
    out = f.feed(openai_stream(["Hel", "lo"], ['{"city"', ': "Oslo"}'], "tool_calls")) \
        + f.flush()
    names = [line[7:].decode() for line in out.split(b"\n") if line.startswith(b"event: ")]
    assert names == ["message_start", "content_block_start", "content_block_delta",
                     "content_block_delta", "content_block_stop", "content_block_start",
                     "content_block_delta", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]
    events = _data(out)
    assert [e["type"] for e in events] == names  # each event's type matches its name
    assert events[0]["message"]["id"] == "chatcmpl-9"
    assert events[1]["content_block"] == {"type": "text", "text": ""}
    assert [e["delta"]["text"] for e in events[2:4]] == ["Hel", "lo"]
    assert events[5] == {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "call_9", "name": "get_weather", "input": {}}}
    assert "".join(e["delta"]["partial_json"] for e in events[6:8]) == '{"city": "Oslo"}'
    assert all(e["index"] == 1 for e in events[6:9])
    assert events[9] == {"type": "message_delta",
                         "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                         "usage": {"input_tokens": 20, "output_tokens": 12,
                                   "cache_creation_input_tokens": 0,
                                   "cache_read_input_tokens": 10,
                                   "output_tokens_details": {"thinking_tokens": 4}}}


def test_error_events_cross_over() -> None:
    f = response_filter("openai", True, 200, True, 1 << 20, 0)
    err = _ev("error", {"type": "error", "error": {"type": "overloaded_error",
                                                   "message": "Overloaded"}})
    head = b"\n\n".join(anthropic_stream(["a"]).split(b"\n\n")[:4]) + b"\n\n"
    out = _data(f.feed(head + err))
    assert out[1] == {**out[1], "choices": [{"index": 0, "delta": {"content": "a"},
                                             "logprobs": None, "finish_reason": None}]}
    assert out[-1] == {"error": {"message": "Overloaded", "type": "server_error",
                                 "code": "service_unavailable"}}
    g = response_filter("anthropic", True, 200, False, 1 << 20, 0)
    out = _data(g.feed(_chunk({"content": "x"}) + b'data: {"error":{"message":"boom"}}\n\n'))
    assert out[-1] == {"type": "error", "error": {"type": "api_error", "message": "boom"}}


def test_an_openai_stream_without_done_is_still_closed_once_finished() -> None:
    f = response_filter("anthropic", True, 200, False, 1 << 20, 0)
    raw = openai_stream(["a"]).replace(b"data: [DONE]\n\n", b"")
    events = _data(f.feed(raw) + f.flush())
    assert events[-1] == {"type": "message_stop"}
    cut = response_filter("anthropic", True, 200, False, 1 << 20, 0)
    events = _data(cut.feed(_chunk({"content": "a"})) + cut.flush())
    assert events[-1]["type"] == "content_block_delta"  # cut mid-answer: no invented end


def test_oversized_or_garbled_events_are_protocol_errors() -> None:
    f = response_filter("openai", True, 200, True, 1000, 0)
    with pytest.raises(UpstreamProtocolError, match="too large"):
        f.feed(b"data: " + b"x" * 2000)
    g = response_filter("openai", True, 200, True, 1000, 0)
    with pytest.raises(UpstreamProtocolError, match="not JSON"):
        g.feed(b"data: {nope\n\n")


STREAMS = [
    ("openai", anthropic_stream(["Hé", "llo ", "wörld"], ['{"a":', ' "é"}'], "tool_use")),
    ("openai", anthropic_stream(["x"]).replace(b"\n", b"\r\n")),
    ("anthropic", openai_stream(["Hé", "llo"], ['{"a":', " 1}"], "tool_calls")),
    ("anthropic", openai_stream(["y"]).replace(b"\n", b"\r")),
]


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, len(STREAMS) - 1),
       cuts=st.lists(st.integers(0, 1 << 16), max_size=40))
def test_any_chunking_of_the_upstream_gives_the_same_translated_events(
        which: int, cuts: list[int]) -> None:
    client, raw = STREAMS[which]
    whole = response_filter(client, True, 200, True, 1 << 20, 1)
    expected = whole.feed(raw) + whole.flush()
    f = response_filter(client, True, 200, True, 1 << 20, 1)
    got = b"".join(f.feed(piece) for piece in split(raw, cuts)) + f.flush()
    assert got == expected
    assert expected.endswith(b"data: [DONE]\n\n" if client == "openai"
                             else b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=6),
       cuts=st.lists(st.integers(0, 1 << 16), max_size=20))
def test_round_trip_keeps_every_text_delta(texts: list[str], cuts: list[int]) -> None:
    """Anthropic -> OpenAI -> Anthropic, fed in arbitrary pieces: the same text deltas."""
    a2o = response_filter("openai", True, 200, True, 1 << 20, 1)
    raw = anthropic_stream(texts)
    oai = b"".join(a2o.feed(p) for p in split(raw, cuts)) + a2o.flush()
    o2a = response_filter("anthropic", True, 200, False, 1 << 20, 1)
    back = _data(b"".join(o2a.feed(p) for p in split(oai, cuts)) + o2a.flush())
    assert [e["delta"]["text"] for e in back if e["type"] == "content_block_delta"] == \
        [t for t in texts if t]
    assert back[-2]["usage"]["output_tokens"] == 42
    # OpenAI has no cache-write count: the write folds into the uncached input (11 + 1).
    assert back[-2]["usage"]["input_tokens"] == 12 and \
        back[-2]["usage"]["cache_read_input_tokens"] == 3


def test_a_field_without_counterpart_is_refused_whatever_else_the_body_has() -> None:
    for body in ({"messages": [], "n": 2}, {"n": 3}, {"model": "m", "logprobs": True}):
        with pytest.raises(Untranslatable):
            translate_request(body, "openai", "anthropic")


def test_a_translated_request_body_is_right_sized_in_memory() -> None:
    """The body stays with the flight for the whole stream (a failover may resend it):
    orjson's own result would keep its 4 KiB output buffer for each one."""
    import tracemalloc

    from sidecar.translate import request_bytes

    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 10}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [request_bytes(body, "openai", "anthropic", 4096, None) for _ in range(200)]
        per_body = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    assert per_body < 1024, per_body
