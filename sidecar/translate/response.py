"""Response translation for whole JSON bodies, and the mappings streams share (pure).

Finish reasons, usage objects and error bodies, each in both directions; a
non-streamed Chat Completion <-> Message. The usage a client receives is the
upstream's, re-expressed: Anthropic's ``input_tokens`` excludes the cached parts,
OpenAI's ``prompt_tokens`` includes them (see ``sidecar.usage``), so the sums
are moved across, never re-counted. The meter reads the upstream's own bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

# Anthropic stop_reason -> OpenAI finish_reason.
FINISH_TO_OPENAI: Final[Mapping[str, str]] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# OpenAI finish_reason -> Anthropic stop_reason. OpenAI does not say whether a
# stop sequence or the model ended the turn: "stop" is end_turn.
FINISH_TO_ANTHROPIC: Final[Mapping[str, str]] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

# HTTP status -> Anthropic error type (what an Anthropic client expects to read).
_ANTHROPIC_ERROR_TYPES: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
# Anthropic error type -> OpenAI (type, code).
_OPENAI_ERROR_TYPES: Final[Mapping[str, tuple[str, str]]] = {
    "invalid_request_error": ("invalid_request_error", "invalid_request"),
    "authentication_error": ("invalid_request_error", "invalid_api_key"),
    "permission_error": ("invalid_request_error", "permission_denied"),
    "not_found_error": ("invalid_request_error", "not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("requests", "rate_limit_exceeded"),
    "api_error": ("server_error", "internal_error"),
    "overloaded_error": ("server_error", "service_unavailable"),
}


def _int(obj: Mapping[str, Any] | None, key: str) -> int:
    v = obj.get(key) if obj is not None else None
    return v if type(v) is int and v >= 0 else 0


def usage_to_openai(u: Mapping[str, Any]) -> dict[str, Any]:
    """Anthropic usage (merged message_start + message_delta) as OpenAI's usage object."""
    cache_read = _int(u, "cache_read_input_tokens")
    prompt = _int(u, "input_tokens") + cache_read + _int(u, "cache_creation_input_tokens")
    completion = _int(u, "output_tokens")
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cache_read}}


def usage_to_anthropic(u: Mapping[str, Any] | None) -> dict[str, Any]:
    """OpenAI usage as Anthropic's: input_tokens without the cached part."""
    details = u.get("prompt_tokens_details") if u is not None else None
    cached = _int(details if isinstance(details, dict) else None, "cached_tokens")
    prompt = _int(u, "prompt_tokens")
    return {"input_tokens": max(0, prompt - cached), "output_tokens": _int(u, "completion_tokens"),
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def finish_to_openai(stop_reason: Any) -> str | None:
    if stop_reason is None:
        return None
    return FINISH_TO_OPENAI.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def finish_to_anthropic(finish: Any) -> str | None:
    if finish is None:
        return None
    return FINISH_TO_ANTHROPIC.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"


# ---------------------------------------------------------------- whole bodies

def message_to_chat_completion(msg: Mapping[str, Any], created: int) -> dict[str, Any]:
    """A non-streamed Anthropic Message as a Chat Completion."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in msg.get("content") or ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"),
                                       "arguments": _dumps(block.get("input", {}))}})
        # thinking blocks are never asked for (the request translation refuses
        # "thinking"), so none is dropped here.
    message: dict[str, Any] = {"role": "assistant",
                               "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    out: dict[str, Any] = {
        "id": msg.get("id"), "object": "chat.completion", "created": created,
        "model": msg.get("model"),
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish_to_openai(msg.get("stop_reason")) or "stop"}],
    }
    usage = msg.get("usage")
    if isinstance(usage, dict):
        out["usage"] = usage_to_openai(usage)
    return out


def chat_completion_to_message(body: Mapping[str, Any]) -> dict[str, Any]:
    """A non-streamed Chat Completion (one choice: the request asked n=1) as a Message."""
    choices = body.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    raw = choice.get("message")
    message: dict[str, Any] = raw if isinstance(raw, dict) else {}
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                        "input": _loads_object(fn.get("arguments"))})
    return {
        "id": body.get("id"), "type": "message", "role": "assistant",
        "model": body.get("model"), "content": content,
        "stop_reason": finish_to_anthropic(choice.get("finish_reason")) or "end_turn",
        "stop_sequence": None,
        "usage": usage_to_anthropic(body.get("usage") if isinstance(body.get("usage"), dict)
                                    else None),
    }


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _loads_object(text: Any) -> Any:
    """Tool-call arguments as the input object; text that is not a JSON object is kept
    whole under "arguments" rather than lost."""
    if not isinstance(text, str) or not text:
        return {}
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"arguments": text}
    return obj if isinstance(obj, dict) else {"arguments": obj}


# ---------------------------------------------------------------- errors

def error_message(body: Any) -> tuple[str, str | None]:
    """(message, provider error type) of either format's error body."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            msg = err.get("message")
            kind = err.get("type")
            return (msg if isinstance(msg, str) else "upstream error",
                    kind if isinstance(kind, str) else None)
        if isinstance(err, str):
            return err, None
    return "upstream error", None


def error_to_openai(body: Any, status: int) -> dict[str, Any]:
    """An upstream error body (Anthropic's, or anything) as OpenAI's error object."""
    message, kind = error_message(body)
    etype, code = _OPENAI_ERROR_TYPES.get(kind or "", ("upstream_error", f"upstream_{status}"))
    return {"error": {"message": message, "type": etype, "code": code}}


def error_to_anthropic(body: Any, status: int) -> dict[str, Any]:
    """An upstream error body (OpenAI's, or anything) as Anthropic's error object."""
    message, _ = error_message(body)
    etype = _ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500
                                       else "invalid_request_error")
    return {"type": "error", "error": {"type": etype, "message": message}}
