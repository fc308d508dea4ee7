"""OpenAI Chat Completions <-> Anthropic Messages translation (pure, sans-IO).

A route whose client format (its path: ``/v1/chat/completions`` or ``/v1/messages``)
differs from an upstream's ``format`` sends that upstream a translated request
and relays its answer translated back. The parts:

* ``request``: the request body both ways (:class:`Untranslatable` names a field
  the other side cannot express: the client gets 400, never a silently different
  request);
* ``response``: whole JSON bodies, errors, finish reasons and usage both ways;
* ``stream``: the event-by-event stream translators and the byte-level shells the
  relay feeds (``feed``/``flush``, like the include_usage stripper).

Only chat completions and messages translate: other OpenAI endpoints have no
Anthropic counterpart (config validation refuses such routes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

from sidecar.endpoints import ApiFormat
from sidecar.translate.request import Untranslatable, anthropic_to_openai, openai_to_anthropic
from sidecar.translate.stream import (
    AnthropicToOpenAI,
    BodyTranslator,
    OpenAIToAnthropic,
    SseTranslator,
    translate_body,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "UPSTREAM_PATH",
    "AnthropicToOpenAI",
    "BodyTranslator",
    "OpenAIToAnthropic",
    "SseTranslator",
    "Untranslatable",
    "client_headers",
    "request_bytes",
    "response_filter",
    "translate_body",
    "translate_request",
    "upstream_target",
]

# max_tokens an Anthropic upstream is sent when the OpenAI client gave none (the
# Messages API requires one); config: the upstream's default_max_tokens.
DEFAULT_MAX_TOKENS: Final = 4096

# The endpoint each format's upstream is sent to, in place of the client's; also the
# path its tap and token estimate read the answer by.
UPSTREAM_PATH: Final[Mapping[str, str]] = {"openai": "/chat/completions",
                                           "anthropic": "/messages"}
_SUFFIX: Final[Mapping[str, bytes]] = {k: v.encode() for k, v in UPSTREAM_PATH.items()}


def upstream_target(target: bytes, client_format: str, to_format: str) -> bytes:
    """The client's request target with its endpoint swapped for the upstream's:
    ``/v1/chat/completions?x=1`` -> ``/v1/messages?x=1`` (the upstream's base path is
    prepended later, as for any request)."""
    q = target.find(b"?")
    path, query = (target, b"") if q < 0 else (target[:q], target[q:])
    path = path.rstrip(b"/")
    old = _SUFFIX[client_format]
    if path.endswith(old):
        path = path[: -len(old)]
    return path + _SUFFIX[to_format] + query


def translate_request(body: Mapping[str, Any], client_format: str, to_format: ApiFormat,
                      default_max_tokens: int = DEFAULT_MAX_TOKENS) -> dict[str, Any]:
    """The client's decoded body for an upstream of ``to_format`` (raises Untranslatable)."""
    if to_format == "anthropic":
        return openai_to_anthropic(body, default_max_tokens)
    return anthropic_to_openai(body)


def request_bytes(body: Mapping[str, Any], client_format: str, to_format: ApiFormat,
                  default_max_tokens: int, model: str | None) -> bytes:
    """The body an upstream of ``to_format`` is sent (``model``: the route's rename)."""
    out = translate_request(body, client_format, to_format, default_max_tokens)
    if model is not None:
        out["model"] = model
    # A right-sized copy: the bytes orjson returns keep its whole 4 KiB output buffer
    # allocated, and this body stays with the flight (for a failover) all stream long.
    return bytes(memoryview(orjson.dumps(out)))


def client_headers(headers: list[tuple[bytes, bytes]], to_format: str
                   ) -> list[tuple[bytes, bytes]]:
    """The client's headers without the other provider's own (``anthropic-version``
    and ``anthropic-beta`` mean nothing to an OpenAI upstream, ``openai-*`` nothing
    to Anthropic); the upstream's own are added by its head template."""
    drop = _OTHER_PREFIX[to_format]
    return [h for h in headers if not h[0].startswith(drop)]


_OTHER_PREFIX: Final[Mapping[str, bytes]] = {"openai": b"anthropic-", "anthropic": b"openai-"}


def response_filter(client_format: str, sse: bool, status: int, include_usage: bool,
                    max_bytes: int, created: int) -> SseTranslator | BodyTranslator:
    """What the relay runs the upstream's body through for a client of ``client_format``."""
    if not sse:
        return BodyTranslator(client_format, status, max_bytes, created)
    if client_format == "openai":
        return SseTranslator(AnthropicToOpenAI(created, include_usage), max_bytes)
    return SseTranslator(OpenAIToAnthropic(), max_bytes)
