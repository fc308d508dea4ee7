"""Tokenizer: offline loading, the model map, the approximation fallback, prompt estimates."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Any

import pytest

from sidecar.tokenizer import (
    ENCODING_FOR_MODEL,
    IMAGE_PART_TOKENS,
    REPLY_PRIMING_TOKENS,
    TOKENIZER_DIR_ENV,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_NAME,
    Tokenizer,
    approx_count,
    encoding_for_model,
)

SHARED = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "tiktoken"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """The offline tokenizer the test run is configured with (conftest sets the env)."""
    assert os.environ.get(TOKENIZER_DIR_ENV), "conftest should point at ../shared/tiktoken"
    t = Tokenizer.load(None)
    assert t.preload(), "both encodings must load from SIDECAR_TOKENIZER_DIR"
    return t


@pytest.fixture
def offline_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """An empty tiktoken cache: nothing may come from a previous download."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


def test_hello_world_counts_with_each_models_encoding(tok: Tokenizer) -> None:
    # o200k_base: [24912, 2375]; cl100k_base: [15339, 1917]
    assert tok.count_text("hello world", "gpt-4o") == (2, False)
    assert tok.count_text("hello world", "gpt-4") == (2, False)


def test_the_model_picks_the_encoding(tok: Tokenizer) -> None:
    # Japanese is where the two vocabularies differ most: 2 tokens vs 4.
    text = "こんにちは世界"
    assert tok.count_text(text, "gpt-4o-mini") == (2, False)
    assert tok.count_text(text, "gpt-3.5-turbo") == (4, False)
    assert tok.count_text("Hello, world!", "gpt-4.1") == (4, False)
    assert tok.count_text("", "gpt-4o") == (0, False)


def test_other_vendors_use_o200k_flagged_approximate(tok: Tokenizer) -> None:
    assert tok.count_text("こんにちは世界", "claude-sonnet-4-5") == (2, True)
    assert tok.count_text("hello world", None) == (2, True)


def test_special_token_text_is_counted_as_text(tok: Tokenizer) -> None:
    n, _ = tok.count_text("<|endoftext|>", "gpt-4o")
    assert n > 1  # encoded as ordinary text, never rejected or merged into one id


@pytest.mark.parametrize(
    ("model", "encoding", "approx"),
    [
        ("gpt-4o", "o200k_base", False),
        ("gpt-4o-mini-2024-07-18", "o200k_base", False),
        ("chatgpt-4o-latest", "o200k_base", False),
        ("gpt-4.1-nano", "o200k_base", False),
        ("o1-preview", "o200k_base", False),
        ("o3-mini", "o200k_base", False),
        ("o4-mini", "o200k_base", False),
        ("gpt-5", "o200k_base", False),
        ("gpt-5.1-codex", "o200k_base", False),
        ("gpt-4", "cl100k_base", False),
        ("gpt-4-turbo-2024-04-09", "cl100k_base", False),
        ("gpt-3.5-turbo-0125", "cl100k_base", False),
        ("gpt-35-turbo", "cl100k_base", False),
        ("text-embedding-3-small", "cl100k_base", False),
        ("text-embedding-ada-002", "cl100k_base", False),
        ("openai/gpt-4o", "o200k_base", False),
        ("ft:gpt-3.5-turbo-0613:acme::8abc", "cl100k_base", False),
        ("GPT-4O", "o200k_base", False),
        ("claude-3-5-sonnet-20241022", "o200k_base", True),
        ("meta-llama/Llama-3.1-8B-Instruct", "o200k_base", True),
        ("deepseek-chat", "o200k_base", True),
        ("", "o200k_base", True),
        (None, "o200k_base", True),
        ("gpt-4o" + "x" * 300, "o200k_base", True),  # absurd names are not looked up
    ],
)
def test_model_map(model: str | None, encoding: str, approx: bool) -> None:
    assert encoding_for_model(model) == (encoding, approx)


def test_model_map_is_the_single_source() -> None:
    assert set(ENCODING_FOR_MODEL.values()) == {"o200k_base", "cl100k_base"}
    assert ENCODING_FOR_MODEL["gpt-4"] == "cl100k_base"
    assert ENCODING_FOR_MODEL["gpt-4o"] == "o200k_base"


def test_missing_dir_falls_back_to_approximation_and_warns_once(
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    offline_cache: pathlib.Path,
) -> None:
    monkeypatch.setenv(TOKENIZER_DIR_ENV, str(tmp_path / "does-not-exist"))
    t = Tokenizer.load(str(tmp_path / "also-missing"))
    with caplog.at_level(logging.WARNING, logger="sidecar.tokenizer"):
        assert t.count_text("hello world", "gpt-4o") == (3, True)  # ceil(11 / 4)
        assert t.count_text("hello world", "gpt-4") == (3, True)
        assert t.count_text("x" * 40, "claude-3") == (10, True)
        assert not t.preload()
    warnings = [r for r in caplog.records if r.name == "sidecar.tokenizer"
                and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "approximate" in warnings[0].getMessage()


def test_empty_dir_falls_back_to_approximation(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, offline_cache: pathlib.Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(TOKENIZER_DIR_ENV, str(empty))
    t = Tokenizer.load(None)
    assert t.count_text("héllo", "gpt-4o") == (2, True)  # 6 UTF-8 bytes -> ceil(6 / 4)
    n, approx = t.count_prompt({"messages": [{"role": "user", "content": "hi"}]}, "openai",
                               "/v1/chat/completions", "gpt-4o")
    assert approx and n == REPLY_PRIMING_TOKENS + TOKENS_PER_MESSAGE + 1 + 1


def test_corrupt_file_is_rejected_by_hash_and_degrades(
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    offline_cache: pathlib.Path,
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "o200k_base.tiktoken").write_bytes(b"aGVsbG8= 0\n")
    monkeypatch.setenv(TOKENIZER_DIR_ENV, str(bad))
    t = Tokenizer.load(None)
    with caplog.at_level(logging.WARNING, logger="sidecar.tokenizer"):
        assert t.count_text("hello world", "gpt-4o") == (3, True)
    assert "o200k_base" in caplog.text


def test_config_dir_is_searched_after_the_env_dir(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, offline_cache: pathlib.Path
) -> None:
    only_cl100k = tmp_path / "cfg"
    only_cl100k.mkdir()
    shutil.copy(SHARED / "cl100k_base.tiktoken", only_cl100k)
    monkeypatch.setenv(TOKENIZER_DIR_ENV, str(tmp_path / "missing"))
    t = Tokenizer.load(str(only_cl100k))
    assert t.count_text("こんにちは世界", "gpt-4") == (4, False)
    # o200k_base is missing: the other real vocabulary still beats bytes/4, flagged.
    assert t.count_text("こんにちは世界", "gpt-4o") == (4, True)


def test_tiktoken_cache_is_not_asked_to_download_by_default(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, offline_cache: pathlib.Path
) -> None:
    import tiktoken

    def no_network(name: str) -> Any:
        raise AssertionError(f"get_encoding({name!r}) would download")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    monkeypatch.delenv(TOKENIZER_DIR_ENV)
    t = Tokenizer.load(None)
    assert t.count_text("hello world", "gpt-4o") == (3, True)


def test_encodings_are_loaded_once_per_process(tok: Tokenizer) -> None:
    again = Tokenizer.load(None)
    assert again._encoding("o200k_base") is tok._encoding("o200k_base")


def test_import_does_no_work() -> None:
    code = "import sys, sidecar.tokenizer; print('tiktoken' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=pathlib.Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False"


def test_approx_count() -> None:
    assert approx_count("") == 0
    assert approx_count("abcd") == 1
    assert approx_count("abcde") == 2
    assert approx_count("€") == 1  # 3 bytes


# -- prompt estimates -------------------------------------------------------------


def _t(tok: Tokenizer, text: str, model: str = "gpt-4o") -> int:
    return tok.count_text(text, model)[0]


def test_count_prompt_chat_uses_openai_message_overhead(tok: Tokenizer) -> None:
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "name": "bob", "content": "hello world"},
            {"role": "user", "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ]},
        ],
    }
    expected = (
        REPLY_PRIMING_TOKENS
        + TOKENS_PER_MESSAGE + _t(tok, "system") + _t(tok, "You are a helpful assistant.")
        + TOKENS_PER_MESSAGE + _t(tok, "user") + _t(tok, "bob") + TOKENS_PER_NAME
        + _t(tok, "hello world")
        + TOKENS_PER_MESSAGE + _t(tok, "user") + _t(tok, "What is in this image?")
        + IMAGE_PART_TOKENS
    )
    assert tok.count_prompt(body, "openai", "/v1/chat/completions") == (expected, False)


def test_count_prompt_chat_tool_calls(tok: Tokenizer) -> None:
    body = {
        "messages": [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
    }
    expected = (
        REPLY_PRIMING_TOKENS
        + TOKENS_PER_MESSAGE + _t(tok, "assistant") + _t(tok, "get_weather")
        + _t(tok, '{"city":"Paris"}')
        + TOKENS_PER_MESSAGE + _t(tok, "tool") + _t(tok, "call_1") + _t(tok, "sunny")
    )
    assert tok.count_prompt(body, "openai", "/v1/chat/completions", "gpt-4o") == (expected, False)


def test_count_prompt_model_argument_overrides_body(tok: Tokenizer) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "こんにちは世界"}]}
    n4o, _ = tok.count_prompt(body, "openai", "/v1/chat/completions")
    n4, approx = tok.count_prompt(body, "openai", "/v1/chat/completions", "gpt-4")
    assert n4 - n4o == 2 and not approx


def test_count_prompt_anthropic_system_blocks_and_tools(tok: Tokenizer) -> None:
    body = {
        "model": "claude-sonnet-4-5",
        "system": [{"type": "text", "text": "Be terse.",
                    "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "found it"},
            ]},
        ],
    }
    expected = (
        _t(tok, "Be terse.")
        + REPLY_PRIMING_TOKENS
        + TOKENS_PER_MESSAGE + _t(tok, "user") + _t(tok, "hello world")
        + TOKENS_PER_MESSAGE + _t(tok, "assistant") + _t(tok, "Checking.")
        + _t(tok, "lookup") + _t(tok, '{"q":"x"}')
        + TOKENS_PER_MESSAGE + _t(tok, "user") + _t(tok, "found it")
    )
    assert tok.count_prompt(body, "anthropic", "/v1/messages") == (expected, True)
    with_tools = {**body, "tools": [{"name": "lookup", "input_schema": {"type": "object"}}]}
    n, _ = tok.count_prompt(with_tools, "anthropic", "/v1/messages")
    assert n == expected + _t(tok, '[{"name":"lookup","input_schema":{"type":"object"}}]')


def test_count_prompt_responses_string_and_items(tok: Tokenizer) -> None:
    body = {"model": "gpt-4.1", "instructions": "Talk like a pirate.", "input": "hello world"}
    expected = (_t(tok, "Talk like a pirate.") + REPLY_PRIMING_TOKENS + TOKENS_PER_MESSAGE
                + _t(tok, "hello world"))
    assert tok.count_prompt(body, "openai", "/v1/responses") == (expected, False)
    items = {
        "model": "gpt-4.1",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hello world"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
        ],
    }
    expected_items = (
        REPLY_PRIMING_TOKENS
        + TOKENS_PER_MESSAGE + _t(tok, "user") + _t(tok, "hello world")
        + _t(tok, "f") + _t(tok, "{}")
        + _t(tok, "42")
    )
    assert tok.count_prompt(items, "openai", "/v1/responses") == (expected_items, False)


def test_count_prompt_legacy_and_embeddings_count_token_ids_exactly(tok: Tokenizer) -> None:
    assert tok.count_prompt({"model": "gpt-3.5-turbo-instruct", "prompt": "hello world"},
                            "openai", "/v1/completions") == (2, False)
    assert tok.count_prompt({"prompt": ["hello world", "hello world"]}, "openai",
                            "/v1/completions", "gpt-4") == (4, False)
    assert tok.count_prompt({"model": "text-embedding-3-small", "input": [[1, 2, 3], [4]]},
                            "openai", "/v1/embeddings") == (4, False)
    assert tok.count_prompt({"model": "text-embedding-3-small", "input": [5, 6, 7]},
                            "openai", "/v1/embeddings") == (3, False)


def test_count_prompt_tolerates_garbage(tok: Tokenizer) -> None:
    body: dict[str, Any] = {"messages": [None, 3, {"role": 5, "content": {"odd": True}}]}
    n, _ = tok.count_prompt(body, "openai", "/v1/chat/completions", "gpt-4o")
    assert n == REPLY_PRIMING_TOKENS + TOKENS_PER_MESSAGE
    assert tok.count_prompt({}, "openai", "/v1/responses", "gpt-4o") == (0, False)
