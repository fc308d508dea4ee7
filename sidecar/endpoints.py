"""The one table of API endpoints: which kind a path is, which format it speaks.

Every module that needs to know "is this chat, completions, messages…" asks here:
the tap (which frames carry usage), the tokenizer (how to count a prompt), the
mock provider (what to answer), config (a route's default format) and the
runtime (whether usage must be asked for). A path matches by suffix so that an
upstream base prefix (``/openai/v1/chat/completions``) or a route mounted under a
prefix still resolves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

EndpointKind = Literal["chat", "completions", "responses", "embeddings", "messages", "unknown"]
ApiFormat = Literal["openai", "anthropic"]

# Longest first: "/chat/completions" must win over "/completions".
PATH_KINDS: tuple[tuple[str, EndpointKind], ...] = (
    ("/chat/completions", "chat"),
    ("/completions", "completions"),
    ("/responses", "responses"),
    ("/embeddings", "embeddings"),
    ("/messages", "messages"),
)

# The API format each kind belongs to (Messages is Anthropic's; the rest OpenAI's).
KIND_FORMAT: Mapping[EndpointKind, ApiFormat] = {
    "chat": "openai",
    "completions": "openai",
    "responses": "openai",
    "embeddings": "openai",
    "messages": "anthropic",
    "unknown": "openai",
}

# OpenAI kinds whose streams report usage only when asked
# (``stream_options.include_usage``); the Responses API always reports it.
USAGE_OPT_IN: frozenset[EndpointKind] = frozenset({"chat", "completions"})

# The kinds whose routes may have an upstream of the other format: requests and
# answers are translated between them (sidecar.translate).
TRANSLATABLE_KINDS: frozenset[EndpointKind] = frozenset({"chat", "messages"})


def kind_for_path(path: str) -> EndpointKind:
    """The kind a path names by its suffix (a query string or trailing slash ignored)."""
    q = path.find("?")
    p = (path if q < 0 else path[:q]).rstrip("/")
    for suffix, kind in PATH_KINDS:
        if p.endswith(suffix):
            return kind
    return "unknown"


def path_format(path: str) -> ApiFormat:
    """The API format a route path speaks when nothing says otherwise."""
    return KIND_FORMAT[kind_for_path(path)]


def endpoint_kind(
    api_format: str, path: str, body: Mapping[str, Any] | None = None
) -> EndpointKind:
    """Which API a request/response belongs to: by format, then path, then body keys.

    Anthropic-format traffic is always Messages; an unrecognised OpenAI path is
    guessed from the request body's keys when one is given.
    """
    if api_format == "anthropic":
        return "messages"
    kind = kind_for_path(path)
    if kind != "unknown" or body is None:
        return kind
    if "messages" in body:
        return "chat"
    if "prompt" in body:
        return "completions"
    if "input" in body:
        return "responses"
    return "unknown"
