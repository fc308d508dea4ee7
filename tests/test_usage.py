"""Usage normalisation: every provider shape into one Usage, zeros kept, raw verbatim."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sidecar.usage import (
    Usage,
    endpoint_kind,
    usage_from_anthropic,
    usage_from_anthropic_stream,
    usage_from_body,
    usage_from_openai,
    usage_from_openai_chat,
    usage_from_openai_embeddings,
    usage_from_openai_responses,
)

OPENAI_CHAT_USAGE: dict[str, Any] = {
    "prompt_tokens": 1117,
    "completion_tokens": 46,
    "total_tokens": 1163,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}

RESPONSES_USAGE: dict[str, Any] = {
    "input_tokens": 328,
    "input_tokens_details": {"cached_tokens": 128},
    "output_tokens": 52,
    "output_tokens_details": {"reasoning_tokens": 32},
    "total_tokens": 380,
}

ANTHROPIC_USAGE: dict[str, Any] = {
    "input_tokens": 21,
    "cache_creation_input_tokens": 188086,
    "cache_read_input_tokens": 0,
    "cache_creation": {"ephemeral_5m_input_tokens": 188086, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 393,
    "service_tier": "standard",
}


def test_openai_chat_usage_with_cached_prompt_tokens() -> None:
    u = usage_from_openai_chat(OPENAI_CHAT_USAGE)
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (1117, 46, 1163)
    assert u.cache_read_tokens == 1024
    assert u.cache_write_tokens is None
    assert u.reasoning_tokens == 0
    assert u.complete


def test_raw_keeps_provider_json_keys_values_and_order() -> None:
    u = usage_from_openai_chat(OPENAI_CHAT_USAGE)
    assert u.raw is not None
    assert orjson.loads(u.raw) == OPENAI_CHAT_USAGE
    assert list(orjson.loads(u.raw)) == list(OPENAI_CHAT_USAGE)


def test_explicit_zero_is_reported_zero_not_none() -> None:
    u = usage_from_openai_chat({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (0, 0, 0)
    r = usage_from_openai_responses({"input_tokens": 0, "output_tokens": 0, "total_tokens": 0})
    assert (r.prompt_tokens, r.completion_tokens, r.total_tokens) == (0, 0, 0)
    a = usage_from_anthropic(
        {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0,
         "cache_creation_input_tokens": 0}
    )
    assert (a.prompt_tokens, a.completion_tokens, a.total_tokens) == (0, 0, 0)
    assert (a.cache_read_tokens, a.cache_write_tokens) == (0, 0)


def test_missing_null_and_malformed_counts_are_not_reported() -> None:
    u = usage_from_openai_chat(
        {"prompt_tokens": None, "completion_tokens": True, "total_tokens": "12",
         "prompt_tokens_details": None}
    )
    assert u == Usage(raw=u.raw)
    assert not u.complete
    neg = usage_from_openai_chat({"prompt_tokens": -1, "completion_tokens": 2.0})
    assert neg.prompt_tokens is None and neg.completion_tokens is None


def test_total_is_computed_when_provider_omits_it() -> None:
    u = usage_from_openai_chat({"prompt_tokens": 7, "completion_tokens": 5})
    assert u.total_tokens == 12
    only_prompt = usage_from_openai_chat({"prompt_tokens": 7})
    assert only_prompt.total_tokens is None


def test_reported_total_wins_over_sum() -> None:
    # Some providers count extra (e.g. tool framing) into the total; we keep theirs.
    u = usage_from_openai_chat({"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 13})
    assert u.total_tokens == 13


def test_deepseek_cache_hits_are_cache_reads() -> None:
    u = usage_from_openai_chat(
        {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110,
         "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 36}
    )
    assert u.cache_read_tokens == 64


def test_responses_usage() -> None:
    u = usage_from_openai_responses(RESPONSES_USAGE)
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (328, 52, 380)
    assert u.cache_read_tokens == 128
    assert u.reasoning_tokens == 32
    assert usage_from_openai(RESPONSES_USAGE) == u
    assert usage_from_openai(OPENAI_CHAT_USAGE) == usage_from_openai_chat(OPENAI_CHAT_USAGE)


def test_anthropic_prompt_includes_cache_reads_and_writes() -> None:
    u = usage_from_anthropic(ANTHROPIC_USAGE)
    assert u.prompt_tokens == 21 + 188086 + 0
    assert u.cache_write_tokens == 188086
    assert u.cache_read_tokens == 0
    assert u.completion_tokens == 393
    assert u.total_tokens == 21 + 188086 + 393
    assert u.raw is not None and orjson.loads(u.raw) == ANTHROPIC_USAGE


def test_anthropic_stream_merges_start_and_delta_and_keeps_both_raw() -> None:
    start = {"input_tokens": 12, "cache_creation_input_tokens": 0,
             "cache_read_input_tokens": 3000, "output_tokens": 1}
    delta = {"output_tokens": 15}
    u = usage_from_anthropic_stream(start, delta)
    assert u.prompt_tokens == 3012
    assert u.cache_read_tokens == 3000
    assert u.cache_write_tokens == 0
    assert u.completion_tokens == 15
    assert u.total_tokens == 3027
    assert u.raw is not None
    assert orjson.loads(u.raw) == {"message_start": start, "message_delta": delta}


def test_anthropic_stream_cumulative_delta_overrides_start() -> None:
    start = {"input_tokens": 10, "cache_read_input_tokens": 0, "output_tokens": 1}
    delta = {"input_tokens": 25, "cache_read_input_tokens": 5, "output_tokens": 40,
             "cache_creation_input_tokens": None}
    u = usage_from_anthropic_stream(start, delta)
    assert (u.prompt_tokens, u.completion_tokens, u.cache_read_tokens) == (30, 40, 5)


def test_anthropic_stream_without_message_delta_has_no_completion_count() -> None:
    u = usage_from_anthropic_stream({"input_tokens": 12, "output_tokens": 1}, None)
    assert u.prompt_tokens == 12
    assert u.completion_tokens is None  # the placeholder 1 is never reported
    assert u.total_tokens is None
    assert not u.complete
    assert u.raw is not None and list(orjson.loads(u.raw)) == ["message_start"]


def test_embeddings_have_a_known_zero_completion() -> None:
    u = usage_from_openai_embeddings({"prompt_tokens": 8, "total_tokens": 8})
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (8, 0, 8)


@pytest.mark.parametrize(
    ("api_format", "body", "embeddings", "expected"),
    [
        ("openai", {"object": "chat.completion", "usage": OPENAI_CHAT_USAGE}, False,
         (1117, 46, 1163)),
        ("openai", {"object": "response", "usage": RESPONSES_USAGE}, False, (328, 52, 380)),
        ("openai", {"object": "list", "usage": {"prompt_tokens": 8, "total_tokens": 8}}, True,
         (8, 0, 8)),
        ("anthropic", {"type": "message", "usage": ANTHROPIC_USAGE}, False,
         (188107, 393, 188500)),
        ("openai", {"x_groq": {"usage": {"prompt_tokens": 3, "completion_tokens": 4,
                                         "total_tokens": 7}}}, False, (3, 4, 7)),
    ],
)
def test_usage_from_body(
    api_format: str, body: dict[str, Any], embeddings: bool, expected: tuple[int, int, int]
) -> None:
    u = usage_from_body(api_format, body, embeddings=embeddings)
    assert u is not None
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == expected


def test_body_without_usage_or_with_null_usage_has_none() -> None:
    assert usage_from_body("openai", {"choices": []}) is None
    assert usage_from_body("openai", {"usage": None}) is None
    assert usage_from_body("anthropic", {"usage": "n/a"}) is None


@pytest.mark.parametrize(
    ("api_format", "path", "body", "kind"),
    [
        ("openai", "/v1/chat/completions", None, "chat"),
        ("openai", "/openai/v1/chat/completions?api-version=2024", None, "chat"),
        ("openai", "/v1/completions", None, "completions"),
        ("openai", "/v1/responses/", None, "responses"),
        ("openai", "/v1/embeddings", None, "embeddings"),
        ("anthropic", "/v1/messages", None, "messages"),
        ("anthropic", "/anything", None, "messages"),
        ("openai", "/custom", {"messages": []}, "chat"),
        ("openai", "/custom", {"prompt": "x"}, "completions"),
        ("openai", "/custom", {"input": "x"}, "responses"),
        ("openai", "/custom", None, "unknown"),
    ],
)
def test_endpoint_kind(
    api_format: str, path: str, body: dict[str, Any] | None, kind: str
) -> None:
    assert endpoint_kind(api_format, path, body) == kind
