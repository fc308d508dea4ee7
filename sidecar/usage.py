"""Usage normalisation across API formats (pure, no I/O).

Every provider reports token usage in its own shape; the meter, the token
buckets and the price table want one. ``Usage`` is that one shape, and the
``usage_from_*`` functions below turn a *decoded* provider usage object into it.

Semantics shared by every format (so one formula prices any row):

* ``prompt_tokens`` is every token of the prompt the model read, cached or not.
  ``cache_read_tokens`` and ``cache_write_tokens`` are *subsets* of it, so the
  uncached, full-price part is ``prompt - (cache_read or 0) - (cache_write or 0)``.
* ``total_tokens`` is ``prompt_tokens + completion_tokens`` unless the provider
  reported its own total, which is then kept as reported.
* A field the provider did not report is ``None``; a reported ``0`` stays ``0``.
  Values that are not non-negative integers (``null``, strings, floats, bools)
  count as not reported rather than being guessed at.
* ``raw`` is the provider's own usage JSON: its keys, values and key order as
  received, re-serialised compactly by orjson (whitespace is not preserved).

Anthropic differs: its ``input_tokens`` counts only the uncached part of the
prompt, with ``cache_read_input_tokens`` and ``cache_creation_input_tokens``
reported beside it. We add the three into ``prompt_tokens`` so that the rule
above holds for Anthropic rows too, and so ``total_tokens`` (which Anthropic
does not report) is input + cache read + cache write + output: the number of
tokens the model actually processed, and what a token limit should charge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.endpoints import EndpointKind, endpoint_kind

__all__ = ["EndpointKind", "Usage", "endpoint_kind"]


@dataclass(slots=True)  # not frozen: built per request, and a frozen init is slow
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    raw: str | None = None  # the provider's own usage JSON, verbatim where possible
    # Reasoning/thinking tokens, a subset of completion_tokens (OpenAI o-series, gpt-5).
    reasoning_tokens: int | None = None

    @property
    def complete(self) -> bool:
        """Both halves are known: nothing needs estimating.

        False e.g. for an Anthropic stream cut after ``message_start``: the
        prompt side is exact but the final output count never arrived.
        """
        return self.prompt_tokens is not None and self.completion_tokens is not None


def _int(obj: Mapping[str, Any] | None, key: str) -> int | None:
    """A reported non-negative integer, or None when absent or malformed.

    ``bool`` is a subclass of ``int`` in Python, so it is excluded explicitly:
    ``true`` is not a token count.
    """
    if obj is None:
        return None
    value = obj.get(key)
    if type(value) is int and value >= 0:
        return value
    return None


def _sub(obj: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = obj.get(key)
    if value is None or type(value) is dict:  # what orjson gives: skip the ABC check
        return value
    return value if isinstance(value, Mapping) else None


def _add(*parts: int | None) -> int | None:
    """Sum of the known parts; None only when no part is known at all."""
    known = [p for p in parts if p is not None]
    return sum(known) if known else None


def _sum_if_known(a: int | None, b: int | None) -> int | None:
    return a + b if a is not None and b is not None else None


def _raw(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def usage_from_openai_chat(usage: Mapping[str, Any]) -> Usage:
    """OpenAI Chat Completions, legacy Completions and Embeddings ``usage``.

    ``prompt_tokens_details.cached_tokens`` is a subset of ``prompt_tokens``
    already. DeepSeek reports its cache hits as ``prompt_cache_hit_tokens``
    instead; that is used when the OpenAI field is missing.
    """
    prompt = _int(usage, "prompt_tokens")
    completion = _int(usage, "completion_tokens")
    total = _int(usage, "total_tokens")
    cache_read = _int(_sub(usage, "prompt_tokens_details"), "cached_tokens")
    if cache_read is None:
        cache_read = _int(usage, "prompt_cache_hit_tokens")
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total if total is not None else _sum_if_known(prompt, completion),
        cache_read_tokens=cache_read,
        cache_write_tokens=None,  # OpenAI caches implicitly and does not report writes
        raw=_raw(usage),
        reasoning_tokens=_int(_sub(usage, "completion_tokens_details"), "reasoning_tokens"),
    )


def usage_from_openai_responses(usage: Mapping[str, Any]) -> Usage:
    """OpenAI Responses API ``response.usage`` (input/output naming)."""
    prompt = _int(usage, "input_tokens")
    completion = _int(usage, "output_tokens")
    total = _int(usage, "total_tokens")
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total if total is not None else _sum_if_known(prompt, completion),
        cache_read_tokens=_int(_sub(usage, "input_tokens_details"), "cached_tokens"),
        cache_write_tokens=None,
        raw=_raw(usage),
        reasoning_tokens=_int(_sub(usage, "output_tokens_details"), "reasoning_tokens"),
    )


def _anthropic(usage: Mapping[str, Any], *, final_output: bool, raw: str) -> Usage:
    uncached = _int(usage, "input_tokens")
    cache_read = _int(usage, "cache_read_input_tokens")
    cache_write = _int(usage, "cache_creation_input_tokens")
    # See the module docstring: Anthropic's input_tokens excludes the cached parts.
    prompt = _add(uncached, cache_read, cache_write) if uncached is not None else None
    completion = _int(usage, "output_tokens") if final_output else None
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=_sum_if_known(prompt, completion),
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        raw=raw,
    )


def usage_from_anthropic(usage: Mapping[str, Any]) -> Usage:
    """Anthropic Messages ``usage`` from a non-streaming response (final counts)."""
    return _anthropic(usage, final_output=True, raw=_raw(usage))


def usage_from_anthropic_stream(
    start: Mapping[str, Any] | None, delta: Mapping[str, Any] | None
) -> Usage:
    """Anthropic stream: ``message_start`` ``message.usage`` + ``message_delta`` ``usage``.

    ``message_start`` carries the prompt side (input and cache tokens) and a
    placeholder ``output_tokens`` (typically 1); ``message_delta`` carries the
    final, cumulative ``output_tokens`` and, in newer API versions, cumulative
    input/cache counts as well. Non-null delta fields therefore override start
    fields. Without a ``message_delta`` the output count is unknown and
    ``completion_tokens`` is None (the placeholder is never reported).

    ``raw`` keeps both objects as received, as one JSON object
    ``{"message_start": {...}, "message_delta": {...}}`` (a key is absent when
    that event was not seen).
    """
    merged: dict[str, Any] = dict(start) if start is not None else {}
    if delta is not None:
        merged.update((k, v) for k, v in delta.items() if v is not None)
    raw: dict[str, Any] = {}
    if start is not None:
        raw["message_start"] = start
    if delta is not None:
        raw["message_delta"] = delta
    return _anthropic(merged, final_output=delta is not None, raw=_raw(raw))


def usage_from_openai_embeddings(usage: Mapping[str, Any]) -> Usage:
    """OpenAI Embeddings ``usage`` (``prompt_tokens``, ``total_tokens``).

    Embeddings generate nothing, so a missing ``completion_tokens`` is a known
    0 here rather than an unreported value.
    """
    u = usage_from_openai_chat(usage)
    if u.completion_tokens is not None:
        return u
    return Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=0,
        total_tokens=u.total_tokens if u.total_tokens is not None else u.prompt_tokens,
        cache_read_tokens=u.cache_read_tokens,
        cache_write_tokens=None,
        raw=u.raw,
        reasoning_tokens=None,
    )


def usage_from_openai(usage: Mapping[str, Any]) -> Usage:
    """Either OpenAI shape, told apart by its keys (Responses uses input/output)."""
    if "input_tokens" in usage or "output_tokens" in usage:
        return usage_from_openai_responses(usage)
    return usage_from_openai_chat(usage)


def usage_from_body(
    api_format: str, body: Mapping[str, Any], *, embeddings: bool = False
) -> Usage | None:
    """Usage of a decoded non-streaming response body, or None when it has none.

    OpenAI-format bodies (chat, completions, embeddings, responses) and Anthropic
    Messages bodies all keep it under a top-level ``usage`` key. Groq's
    OpenAI-compatible API nests it under ``x_groq.usage`` instead.
    """
    usage = _sub(body, "usage")
    if usage is None and api_format != "anthropic":
        x_groq = _sub(body, "x_groq")
        usage = _sub(x_groq, "usage") if x_groq is not None else None
    if usage is None:
        return None
    if api_format == "anthropic":
        return usage_from_anthropic(usage)
    if embeddings:
        return usage_from_openai_embeddings(usage)
    return usage_from_openai(usage)
