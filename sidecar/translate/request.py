"""Request translation between OpenAI Chat Completions and Anthropic Messages (pure).

Both functions take the client's decoded JSON body and return the body the other
format's upstream gets, as a new dict (the input is never mutated). A field the
target cannot express raises :class:`Untranslatable` naming it (the proxy answers
400 with that message): a translated request is never a silently different
request. Fields that are hints with no counterpart and no effect on the answer's
content are dropped and listed in the README (``image_url.detail``,
``cache_control``, ``strict: false``).

What maps to what (Chat Completions -> Messages; the reverse is symmetric):

* ``system``/``developer`` messages -> ``system`` (in order, joined by a blank line);
* ``user``/``assistant`` messages -> messages of the same role, text and image parts
  as content blocks (an image is a ``data:`` URL <-> ``base64`` source, an http(s)
  URL <-> ``url`` source); consecutive messages of one role are merged, as the
  Messages API wants turns to alternate;
* assistant ``tool_calls`` <-> ``tool_use`` blocks (arguments JSON <-> input
  object); ``tool`` messages <-> ``tool_result`` blocks in a user turn;
* ``max_tokens``/``max_completion_tokens`` <-> ``max_tokens`` (Anthropic requires it:
  ``default_max_tokens`` of the upstream when the client sent none);
* ``temperature``, ``top_p``; ``stop`` <-> ``stop_sequences``; ``user`` <->
  ``metadata.user_id``; ``tools`` and ``tool_choice``; ``parallel_tool_calls:
  false`` <-> ``disable_parallel_tool_use``;
* ``stream``; a streamed OpenAI upstream is always asked for usage
  (``stream_options.include_usage``): the Anthropic client gets it in
  ``message_delta`` and the meter needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

from sidecar.errors import RequestError

# The most stop sequences an OpenAI Chat Completions request may carry.
OPENAI_MAX_STOP: Final = 4
# Anthropic's temperature range is 0..1 (OpenAI's 0..2): a value above it is refused
# rather than clamped.
ANTHROPIC_MAX_TEMPERATURE: Final = 1.0


class Untranslatable(RequestError):
    """A request field the other format cannot express (answered 400)."""

    code = "unsupported_field"

    def __init__(self, field: str, problem: str, target: str) -> None:
        self.field = field
        super().__init__(f"{field}: {problem} (not supported when this request is "
                         f"translated for an {target}-format upstream)")


def _bad_anth(field: str, problem: str) -> Untranslatable:
    return Untranslatable(field, problem, "Anthropic")


def _bad_oai(field: str, problem: str) -> Untranslatable:
    return Untranslatable(field, problem, "OpenAI")


# ---------------------------------------------------------------- OpenAI -> Anthropic

# Request fields accepted from an OpenAI client bound for Anthropic; each is handled
# below. Any other field is refused by name.
_OAI_FIELDS: Final = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "stop", "stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls",
    "user", "n", "logprobs", "presence_penalty", "frequency_penalty", "response_format",
    "modalities", "store", "logit_bias",
})


def openai_to_anthropic(body: Mapping[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """An OpenAI Chat Completions request as an Anthropic Messages request."""
    for key in body:
        if key not in _OAI_FIELDS:
            raise _bad_anth(key, "this field has no Anthropic counterpart")
    _neutral_only(body)

    out: dict[str, Any] = {}
    if "model" in body:
        out["model"] = body["model"]
    system, messages = _oai_messages(body.get("messages"))
    if system:
        out["system"] = system
    out["messages"] = messages
    mt = body.get("max_completion_tokens")
    field = "max_completion_tokens"
    if mt is None:
        mt, field = body.get("max_tokens"), "max_tokens"
    if mt is None:
        mt = default_max_tokens
    elif type(mt) is not int or mt < 1:
        raise _bad_anth(field, "must be a positive integer")
    out["max_tokens"] = mt
    temp = body.get("temperature")
    if temp is not None:
        if not _number(temp) or not 0 <= temp <= ANTHROPIC_MAX_TEMPERATURE:
            raise _bad_anth("temperature", f"must be between 0 and {ANTHROPIC_MAX_TEMPERATURE:g}"
                                           " for Anthropic")
        out["temperature"] = temp
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        if not all(isinstance(s, str) for s in stop):
            raise _bad_anth("stop", "must be a string or a list of strings")
        out["stop_sequences"] = list(stop)
    elif stop is not None and stop != []:
        raise _bad_anth("stop", "must be a string or a list of strings")
    if body.get("stream") is True:
        out["stream"] = True
    tools = body.get("tools")
    if tools:
        out["tools"] = [_oai_tool(t, i) for i, t in enumerate(_list(tools, "tools"))]
    choice = _oai_tool_choice(body.get("tool_choice"))
    if body.get("parallel_tool_calls") is False:
        choice = dict(choice) if choice is not None else {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    if choice is not None:
        out["tool_choice"] = choice
    user = body.get("user")
    if isinstance(user, str):
        out["metadata"] = {"user_id": user}
    return out


def _neutral_only(body: Mapping[str, Any]) -> None:
    """OpenAI fields Anthropic lacks are accepted only with their neutral value."""
    n = body.get("n")
    if n is not None and not (type(n) is int and n == 1):
        raise _bad_anth("n", "only n=1 can be translated")
    if body.get("logprobs") not in (None, False):
        raise _bad_anth("logprobs", "logprobs cannot be translated")
    for key in ("presence_penalty", "frequency_penalty"):
        v = body.get(key)
        if v is not None and not (_number(v) and v == 0):
            raise _bad_anth(key, "must be 0 or absent")
    if body.get("store") not in (None, False):
        raise _bad_anth("store", "stored completions cannot be translated")
    if body.get("logit_bias") not in (None, {}):
        raise _bad_anth("logit_bias", "must be empty or absent")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad_anth("response_format", "only {\"type\": \"text\"} can be translated")
    mods = body.get("modalities")
    if mods is not None and mods != ["text"]:
        raise _bad_anth("modalities", "only [\"text\"] can be translated")


def _number(v: Any) -> bool:
    return type(v) is int or type(v) is float


def _list(v: Any, field: str, bad: Any = _bad_anth) -> list[Any]:
    if not isinstance(v, list):
        raise bad(field, "must be a list")
    return v


def _oai_messages(raw: Any) -> tuple[str, list[dict[str, Any]]]:
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(_list(raw, "messages")):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _bad_anth(where, "must be an object")
        role = msg.get("role")
        for key in msg:
            if key not in ("role", "content", "tool_calls", "tool_call_id", "refusal"):
                raise _bad_anth(f"{where}.{key}", "this message field has no Anthropic "
                                                  "counterpart")
        if role in ("system", "developer"):
            system.append(_oai_text_only(msg.get("content"), f"{where}.content"))
            continue
        if role == "user":
            blocks = _oai_user_content(msg.get("content"), f"{where}.content")
            _append(out, "user", blocks)
        elif role == "assistant":
            _append(out, "assistant", _oai_assistant(msg, where))
        elif role == "tool":
            call = msg.get("tool_call_id")
            if not isinstance(call, str):
                raise _bad_anth(f"{where}.tool_call_id", "must be a string")
            result = {"type": "tool_result", "tool_use_id": call,
                      "content": _oai_text_only(msg.get("content"), f"{where}.content")}
            _append(out, "user", [result])
        else:
            raise _bad_anth(f"{where}.role", f"role {role!r} cannot be translated")
    return "\n\n".join(system), out


def _append(out: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Add a turn, merged into the previous one of the same role (turns must alternate)."""
    if out and out[-1]["role"] == role:
        out[-1]["content"].extend(blocks)
    else:
        out.append({"role": role, "content": blocks})


def _oai_text_only(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise _bad_anth(f"{where}[{j}]", "only text parts can be translated here")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad_anth(where, "must be a string or a list of text parts")


def _oai_user_content(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _bad_anth(where, "must be a string or a list of parts")
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_oai_image(part.get("image_url"), at))
        else:
            raise _bad_anth(f"{at}.type", f"part type {kind!r} cannot be translated")
    return blocks


def _oai_image(spec: Any, where: str) -> dict[str, Any]:
    url = spec.get("url") if isinstance(spec, dict) else None
    if not isinstance(url, str):
        raise _bad_anth(f"{where}.image_url.url", "must be a string")
    if url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        media, _, enc = head.partition(";")
        if not sep or enc != "base64" or not media:
            raise _bad_anth(f"{where}.image_url.url", "a data: URL must be base64 with a type")
        return {"type": "image", "source": {"type": "base64", "media_type": media,
                                            "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise _bad_anth(f"{where}.image_url.url", "must be a data: or http(s) URL")


def _oai_assistant(msg: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    content = msg.get("content")
    if content is not None and content != "":
        text = _oai_text_only(content, f"{where}.content")
        if text:
            blocks.append({"type": "text", "text": text})
    if msg.get("refusal") is not None:
        raise _bad_anth(f"{where}.refusal", "cannot be translated")
    calls = msg.get("tool_calls")
    for k, call in enumerate(_list(calls, f"{where}.tool_calls") if calls is not None else ()):
        at = f"{where}.tool_calls[{k}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function":
            raise _bad_anth(at, "only function tool calls can be translated")
        args = fn.get("arguments") or "{}"
        try:
            parsed = orjson.loads(args)
        except (orjson.JSONDecodeError, TypeError):
            raise _bad_anth(f"{at}.function.arguments", "must be a JSON object") from None
        if not isinstance(parsed, dict):
            raise _bad_anth(f"{at}.function.arguments", "must be a JSON object")
        blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                       "input": parsed})
    if not blocks:
        raise _bad_anth(f"{where}.content", "an assistant message needs content or tool_calls")
    return blocks


def _oai_tool(tool: Any, i: int) -> dict[str, Any]:
    at = f"tools[{i}]"
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or tool.get("type") != "function":
        raise _bad_anth(f"{at}.type", "only function tools can be translated")
    if fn.get("strict") is True:
        raise _bad_anth(f"{at}.function.strict", "strict schemas cannot be translated")
    out: dict[str, Any] = {"name": fn.get("name")}
    if fn.get("description") is not None:
        out["description"] = fn["description"]
    params = fn.get("parameters")
    out["input_schema"] = params if isinstance(params, dict) else {"type": "object",
                                                                   "properties": {}}
    return out


def _oai_tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice == "auto":
        return {"type": "auto"}
    if choice == "none":
        return {"type": "none"}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return {"type": "tool", "name": fn["name"]}
    raise _bad_anth("tool_choice", "must be auto, none, required or a function")


# ---------------------------------------------------------------- Anthropic -> OpenAI

_ANTH_FIELDS: Final = frozenset({
    "model", "messages", "system", "max_tokens", "temperature", "top_p", "stop_sequences",
    "stream", "tools", "tool_choice", "metadata", "thinking",
})


def anthropic_to_openai(body: Mapping[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages request as an OpenAI Chat Completions request."""
    for key in body:
        if key not in _ANTH_FIELDS:
            raise _bad_oai(key, "this field has no OpenAI counterpart")
    thinking = body.get("thinking")
    if thinking is not None and not (isinstance(thinking, dict)
                                     and thinking.get("type") == "disabled"):
        raise _bad_oai("thinking", "extended thinking cannot be translated")
    out: dict[str, Any] = {}
    if "model" in body:
        out["model"] = body["model"]
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        text = _anth_text_only(system, "system")
        if text:
            messages.append({"role": "system", "content": text})
    for i, msg in enumerate(_list(body.get("messages"), "messages", _bad_oai)):
        messages.extend(_anth_message(msg, f"messages[{i}]"))
    out["messages"] = messages
    mt = body.get("max_tokens")
    if mt is not None:
        if type(mt) is not int or mt < 1:
            raise _bad_oai("max_tokens", "must be a positive integer")
        out["max_tokens"] = mt
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    stops = body.get("stop_sequences")
    if stops:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad_oai("stop_sequences", "must be a list of strings")
        if len(stops) > OPENAI_MAX_STOP:
            raise _bad_oai("stop_sequences", f"OpenAI takes at most {OPENAI_MAX_STOP}")
        out["stop"] = list(stops)
    if body.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    tools = body.get("tools")
    if tools:
        out["tools"] = [_anth_tool(t, i) for i, t in enumerate(_list(tools, "tools", _bad_oai))]
    choice = body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind == "auto":
            out["tool_choice"] = "auto"
        elif kind == "any":
            out["tool_choice"] = "required"
        elif kind == "none":
            out["tool_choice"] = "none"
        elif kind == "tool" and isinstance(choice.get("name"), str):
            out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        else:
            raise _bad_oai("tool_choice", "must be auto, any, none or tool")
        if choice.get("disable_parallel_tool_use") is True and tools:
            out["parallel_tool_calls"] = False
    meta = body.get("metadata")
    if meta is not None:
        if not isinstance(meta, dict) or any(k != "user_id" for k in meta):
            raise _bad_oai("metadata", "only metadata.user_id can be translated")
        if isinstance(meta.get("user_id"), str):
            out["user"] = meta["user_id"]
    return out


def _anth_text_only(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, block in enumerate(content):
            if not isinstance(block, dict) or block.get("type") != "text" \
                    or not isinstance(block.get("text"), str):
                raise _bad_oai(f"{where}[{j}]", "only text blocks can be translated here")
            parts.append(block["text"])
        return "\n\n".join(parts) if where == "system" else "".join(parts)
    raise _bad_oai(where, "must be a string or a list of text blocks")


def _anth_message(msg: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(msg, dict):
        raise _bad_oai(where, "must be an object")
    for key in msg:
        if key not in ("role", "content"):
            raise _bad_oai(f"{where}.{key}", "this message field has no OpenAI counterpart")
    role = msg.get("role")
    content = msg.get("content")
    if role not in ("user", "assistant"):
        raise _bad_oai(f"{where}.role", f"role {role!r} cannot be translated")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    blocks = _list(content, f"{where}.content", _bad_oai)
    if role == "assistant":
        return [_anth_assistant(blocks, where)]
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_result":
            # OpenAI wants each tool result as a message of its own, right after the
            # assistant turn that called it: before this turn's own text.
            tool_id = block.get("tool_use_id")
            if not isinstance(tool_id, str):
                raise _bad_oai(f"{at}.tool_use_id", "must be a string")
            text = _anth_text_only(block.get("content", ""), f"{at}.content")
            if block.get("is_error") is True:
                text = "Error: " + text  # OpenAI has no error flag; kept in the text
            out.append({"role": "tool", "tool_call_id": tool_id, "content": text})
        elif kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append(_anth_image(block.get("source"), at))
        else:
            raise _bad_oai(f"{at}.type", f"block type {kind!r} cannot be translated")
    if parts:
        if all(p["type"] == "text" for p in parts):
            out.append({"role": "user", "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": "user", "content": parts})
    return out


def _anth_image(source: Any, where: str) -> dict[str, Any]:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source.get("data"), str) \
            and isinstance(source.get("media_type"), str):
        url = f"data:{source['media_type']};base64,{source['data']}"
    elif kind == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise _bad_oai(f"{where}.source", "only base64 and url images can be translated")
    return {"type": "image_url", "image_url": {"url": url}}


def _anth_assistant(blocks: list[Any], where: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"),
                                       "arguments": orjson.dumps(block.get("input", {})
                                                                 ).decode()}})
        else:
            raise _bad_oai(f"{at}.type", f"block type {kind!r} cannot be translated")
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _anth_tool(tool: Any, i: int) -> dict[str, Any]:
    at = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "custom") != "custom" \
            or not isinstance(tool.get("name"), str):
        raise _bad_oai(at, "only custom (client) tools can be translated")
    fn: dict[str, Any] = {"name": tool["name"]}
    if tool.get("description") is not None:
        fn["description"] = tool["description"]
    schema = tool.get("input_schema")
    fn["parameters"] = schema if isinstance(schema, dict) else {"type": "object",
                                                                "properties": {}}
    return {"type": "function", "function": fn}
