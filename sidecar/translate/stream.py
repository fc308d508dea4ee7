"""Streamed response translation, event by event (pure, sans-IO).

Two state machines turn one decoded upstream event into zero or more complete
client events (bytes, separator included):

* :class:`AnthropicToOpenAI`: ``message_start`` -> the role chunk; ``text_delta``
  -> ``delta.content``; a ``tool_use`` block -> ``delta.tool_calls[k]`` with id and
  name, its ``input_json_delta`` -> argument fragments; ``message_delta`` -> the
  finish chunk; ``message_stop`` -> the usage chunk (when the client asked with
  ``stream_options.include_usage``) and ``[DONE]``; ``ping`` -> nothing;
  ``error`` -> an OpenAI error chunk.
* :class:`OpenAIToAnthropic`: the first chunk -> ``message_start``;
  ``delta.content`` -> a text block's ``text_delta`` (opened on first use);
  ``delta.tool_calls[k]`` with an id -> a new ``tool_use`` block, argument fragments
  -> ``input_json_delta``; ``finish_reason`` closes the open block; the usage chunk
  (always asked for upstream) and ``[DONE]`` -> ``message_delta`` (stop reason and
  the whole usage) and ``message_stop``.

:class:`SseTranslator` is the byte-level shell the relay feeds: it frames the
upstream stream with the tap's own ``split_events`` (any line endings, any read
boundaries), hands each event's data to the state machine, and returns only
complete client events, so the output is the same for any chunking of the input.
It holds at most one incomplete upstream event (``max_event`` bytes, beyond which
the stream fails as a protocol error) plus a few ids: bounded memory whatever the
stream's length. It has the ``feed``/``flush`` shape of the include_usage
stripper, so the relay (``splice.Exchange``) runs it in the same place, with the
same writes and the same pause/resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Protocol

import orjson

from sidecar.errors import UpstreamProtocolError
from sidecar.sse.framing import _CR, _payload, split_events
from sidecar.translate.response import (
    error_to_anthropic,
    error_to_openai,
    finish_to_anthropic,
    finish_to_openai,
    usage_to_anthropic,
    usage_to_openai,
)

_DONE: Final = b"[DONE]"
_DONE_EVENT: Final = b"data: [DONE]\n\n"


class EventMachine(Protocol):
    def event(self, data: dict[str, Any]) -> list[bytes]: ...

    def done(self) -> list[bytes]:
        """The upstream's ``[DONE]`` (OpenAI streams only)."""
        ...

    def end(self) -> list[bytes]:
        """The upstream body ended cleanly: whatever closes the client's stream."""
        ...


# Called straight (not through a Python wrapper): once or more per event.
_dumps: Final = orjson.dumps


class AnthropicToOpenAI:
    """Anthropic Messages stream events -> OpenAI ``chat.completion.chunk`` events."""

    __slots__ = ("_blocks", "_created", "_finish", "_finished", "_include_usage", "_prefix",
                 "_usage")

    def __init__(self, created: int, include_usage: bool) -> None:
        self._created = created
        self._include_usage = include_usage
        # Every chunk starts with the same bytes (id, object, created, model): encoded
        # once at message_start.
        self._prefix = b""
        self._blocks: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index
        self._usage: dict[str, Any] = {}
        self._finish: str | None = None
        self._finished = False

    def _chunk(self, choice: bytes) -> bytes:
        return self._prefix + b'[' + choice + b']}\n\n'

    def _delta(self, delta: bytes, finish: str | None = None) -> bytes:
        return self._chunk(b'{"index":0,"delta":' + delta + b',"logprobs":null,"finish_reason":'
                           + (_dumps(finish) if finish is not None else b"null") + b'}')

    def event(self, data: dict[str, Any]) -> list[bytes]:
        kind = data.get("type")
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta":
                text = delta.get("text")
                if not text:
                    return []
                # Most events of a stream: built inline, one concatenation.
                return [self._prefix + b'[{"index":0,"delta":{"content":' + _dumps(text)
                        + b'},"logprobs":null,"finish_reason":null}]}\n\n']
            if dtype == "input_json_delta":
                part = delta.get("partial_json")
                k = self._blocks.get(data.get("index", -1))
                if not part or k is None:
                    return []
                return [self._delta(b'{"tool_calls":[{"index":%d,"function":{"arguments":%b}}]}'
                                    % (k, _dumps(part)))]
            return []  # thinking/signature deltas: never asked for (see request.py)
        if kind == "message_start":
            msg = data.get("message") or {}
            self._prefix = (b'data: {"id":' + _dumps(msg.get("id")) + b',"object":'
                            b'"chat.completion.chunk","created":%d,"model":' % self._created
                            + _dumps(msg.get("model")) + b',"choices":')
            usage = msg.get("usage")
            if isinstance(usage, dict):
                self._usage.update(usage)
            return [self._delta(b'{"role":"assistant","content":""}')]
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            btype = block.get("type")
            if btype == "tool_use":
                k = self._blocks[data.get("index", -1)] = len(self._blocks)
                call = {"index": k, "id": block.get("id"), "type": "function",
                        "function": {"name": block.get("name"), "arguments": ""}}
                return [self._delta(b'{"tool_calls":[' + _dumps(call) + b']}')]
            if btype == "text" and block.get("text"):
                return [self._delta(b'{"content":' + _dumps(block["text"]) + b'}')]
            return []
        if kind == "message_delta":
            usage = data.get("usage")
            if isinstance(usage, dict):
                # Cumulative counts: a non-null value overrides message_start's.
                self._usage.update((k, v) for k, v in usage.items() if v is not None)
            stop = (data.get("delta") or {}).get("stop_reason")
            self._finish = finish_to_openai(stop)
            if self._finish is None:
                return []
            return [self._delta(b"{}", self._finish)]
        if kind == "message_stop":
            return self._close()
        if kind == "error":
            self._finished = True
            return [b"data: " + _dumps(error_to_openai(data, 500)) + b"\n\n"]
        return []  # ping, content_block_stop, and event types added later

    def _close(self) -> list[bytes]:
        if self._finished:
            return []
        self._finished = True
        out = []
        if self._include_usage and self._prefix:
            usage = usage_to_openai(self._usage)
            details = self._usage.get("output_tokens_details")
            if isinstance(details, dict) and type(details.get("thinking_tokens")) is int:
                usage["completion_tokens_details"] = {
                    "reasoning_tokens": details["thinking_tokens"]}
            out.append(self._prefix + b'[],"usage":' + _dumps(usage) + b"}\n\n")
        out.append(_DONE_EVENT)
        return out

    def done(self) -> list[bytes]:
        return []  # not an Anthropic event

    def end(self) -> list[bytes]:
        # A stream that ended without message_stop is passed on as it is: no [DONE]
        # is invented for an answer that may be incomplete.
        return []


def _named(name: bytes, payload: bytes) -> bytes:
    return b"event: " + name + b"\ndata: " + payload + b"\n\n"


class OpenAIToAnthropic:
    """OpenAI ``chat.completion.chunk`` events -> Anthropic Messages stream events."""

    __slots__ = ("_finish", "_next", "_open", "_open_text", "_started", "_stopped", "_tools",
                 "_usage")

    def __init__(self) -> None:
        self._started = False
        self._stopped = False
        self._open = -1  # index of the open content block, -1: none
        self._open_text = False  # the open block is a text block
        self._next = 0  # index of the next block
        self._tools: dict[int, int] = {}  # OpenAI tool_calls index -> block index
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None

    def _start(self, chunk: Mapping[str, Any]) -> bytes:
        self._started = True
        msg: dict[str, Any] = {"id": chunk.get("id"), "type": "message", "role": "assistant",
                               "model": chunk.get("model"), "content": [],
                               "stop_reason": None, "stop_sequence": None,
                               # OpenAI reports usage only at the end: message_delta
                               # carries all of it.
                               "usage": {"input_tokens": 0, "output_tokens": 0}}
        return _named(b"message_start", _dumps({"type": "message_start", "message": msg}))

    def _close_block(self, out: list[bytes]) -> None:
        if self._open >= 0:
            out.append(_named(b"content_block_stop",
                              b'{"type":"content_block_stop","index":%d}' % self._open))
            self._open = -1
            self._open_text = False

    def _open_block(self, out: list[bytes], block: dict[str, Any]) -> int:
        self._close_block(out)
        i = self._open = self._next
        self._next += 1
        self._open_text = block["type"] == "text"
        out.append(_named(b"content_block_start", _dumps(
            {"type": "content_block_start", "index": i, "content_block": block})))
        return i

    def event(self, data: dict[str, Any]) -> list[bytes]:
        if self._stopped:
            return []
        if "error" in data and "choices" not in data:
            self._stopped = True
            return [_named(b"error", _dumps(error_to_anthropic(data, 500)))]
        out: list[bytes] = []
        if not self._started:
            out.append(self._start(data))
        usage = data.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        for choice in data.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # n=1 was asked for (request.py refuses n>1)
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if isinstance(text, str) and text:
                if not self._open_text:
                    self._open_block(out, {"type": "text", "text": ""})
                out.append(b'event: content_block_delta\ndata: {"type":"content_block_delta",'
                           b'"index":%d,"delta":{"type":"text_delta","text":%b}}\n\n'
                           % (self._open, _dumps(text)))
            for call in delta.get("tool_calls") or ():
                self._tool_call(out, call)
            finish = choice.get("finish_reason")
            if finish is not None:
                self._finish = finish_to_anthropic(finish)
                self._close_block(out)
        return out

    def _tool_call(self, out: list[bytes], call: Any) -> None:
        if not isinstance(call, dict):
            return
        k = call.get("index", 0)
        fn = call.get("function") or {}
        block = self._tools.get(k)
        if block is None:
            block = self._tools[k] = self._open_block(out, {
                "type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": {}})
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            out.append(_named(b"content_block_delta", b'{"type":"content_block_delta",'
                              b'"index":%d,"delta":{"type":"input_json_delta",'
                              b'"partial_json":%b}}' % (block, _dumps(args))))

    def _close(self) -> list[bytes]:
        if self._stopped:
            return []
        self._stopped = True
        out: list[bytes] = []
        if not self._started:
            out.append(self._start({}))
        self._close_block(out)
        usage = usage_to_anthropic(self._usage)
        details = self._usage.get("completion_tokens_details") if self._usage else None
        if isinstance(details, dict) and type(details.get("reasoning_tokens")) is int:
            usage["output_tokens_details"] = {"thinking_tokens": details["reasoning_tokens"]}
        out.append(_named(b"message_delta", _dumps({
            "type": "message_delta",
            "delta": {"stop_reason": self._finish or "end_turn", "stop_sequence": None},
            "usage": usage})))
        out.append(_named(b"message_stop", b'{"type":"message_stop"}'))
        return out

    def done(self) -> list[bytes]:
        return self._close()

    def end(self) -> list[bytes]:
        # Some OpenAI-compatible servers end the body without [DONE]: a stream that
        # finished a choice is closed properly; one cut mid-answer is left as it is.
        if self._started and self._finish is not None:
            return self._close()
        return []


class SseTranslator:
    """Upstream SSE bytes in, client SSE bytes out: complete events only."""

    __slots__ = ("_bounds", "_cr", "_machine", "_max", "_pending")

    def __init__(self, machine: EventMachine, max_event: int) -> None:
        self._machine = machine
        self._max = max_event
        self._pending = bytearray()  # one incomplete upstream event
        self._bounds: list[int] = []
        self._cr = False

    def feed(self, data: bytes | memoryview) -> bytes:
        if not data:
            return b""
        if type(data) is not bytes:
            data = bytes(data)
        if not self._cr and _CR in data:
            self._cr = True
        pending = self._pending
        if not pending and not self._cr and data.endswith(b"\n\n"):
            # The usual read: whole events, nothing held. split() finds the same
            # separators split_events would (leftmost, non-overlapping), in C.
            return self._events(data[:-2].split(b"\n\n"))
        buf = split_events(pending, data, self._cr, self._bounds)
        out = self._events(self._cut(buf))
        if buf is pending and self._bounds:
            del pending[:self._bounds[-1]]
        if len(pending) > self._max:
            raise UpstreamProtocolError(
                f"upstream stream event over {self._max} bytes: too large to translate")
        return out

    def _cut(self, buf: bytes | bytearray) -> list[bytes]:
        """The events split_events found in ``buf``, without their separators."""
        out = []
        start = 0
        ends = iter(self._bounds)
        for end in ends:
            out.append(bytes(buf[start:end]))
            start = next(ends)
        return out

    def _events(self, events: list[bytes]) -> bytes:
        out: list[bytes] = []
        machine = self._machine
        for ev in events:
            # The two shapes providers send, "data: JSON" and "event: NAME\ndata: JSON",
            # are cut here; anything else (several data lines, comments, ids) is parsed
            # by the SSE field rules.
            if ev.startswith(b"event: "):
                i = ev.find(b"\ndata: ")
                data = ev[i + 7:] if i > 0 and ev.find(b"\n", i + 1) < 0 else _payload(ev)
            elif ev.startswith(b"data: ") and ev.find(b"\n") < 0:
                data = ev[6:]
            else:
                data = _payload(ev)
            if not data:
                continue  # a comment, or an event with no data line
            if data == _DONE:
                out += machine.done()
                continue
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise UpstreamProtocolError("upstream sent a stream event that is not JSON"
                                            ) from None
            if isinstance(obj, dict):
                out += machine.event(obj)
        return b"".join(out)

    def flush(self) -> bytes:
        """The upstream body ended cleanly: the last events, and what closes the stream.

        An event with no separator after it is dropped, as SSE parsers drop an event
        the stream ended in the middle of."""
        pending = self._pending
        out = b""
        if pending:
            split_events(pending, b"", self._cr, self._bounds, at_end=True)
            if self._bounds:
                try:
                    out = self._events(self._cut(pending))
                except UpstreamProtocolError:
                    out = b""  # the relay is ending the stream anyway
            self._pending = bytearray()
        return out + b"".join(self._machine.end())


class BodyTranslator:
    """A whole JSON body (a non-streamed answer or an error), translated at its end.

    Kept up to ``max_body`` bytes (``limits.tap_body_bytes``); a bigger body cannot be
    translated and is answered with an error in the client's format instead.
    """

    __slots__ = ("_buf", "_created", "_max", "_over", "_status", "_to")

    def __init__(self, to_format: str, status: int, max_body: int, created: int) -> None:
        self._to = to_format
        self._status = status
        self._max = max_body
        self._created = created
        self._buf = bytearray()
        self._over = False

    def feed(self, data: bytes | memoryview) -> bytes:
        if not self._over:
            self._buf += data
            if len(self._buf) > self._max:
                self._over = True
                self._buf = bytearray()
        return b""

    def flush(self) -> bytes:
        return translate_body(bytes(self._buf), self._to, self._status, self._created,
                              too_large=self._over)


def translate_body(raw: bytes, to_format: str, status: int, created: int,
                   too_large: bool = False) -> bytes:
    """A whole upstream JSON body in the client's format (never raises)."""
    from sidecar.translate.response import chat_completion_to_message, message_to_chat_completion

    try:
        body: Any = None if too_large else orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if body is None:
        why = "too large to translate" if too_large else "not JSON"
        err = {"error": {"message": f"upstream answer {why}", "type": "upstream_error"}}
        fixed = error_to_anthropic(err, 502) if to_format == "anthropic" else {
            "error": {"message": f"upstream answer {why}", "type": "upstream_error",
                      "code": "bad_upstream_response"}}
        return _dumps(fixed)
    if status >= 300 or not isinstance(body, dict) or "error" in body:
        if to_format == "anthropic":
            return _dumps(error_to_anthropic(body, status))
        return _dumps(error_to_openai(body, status))
    if to_format == "anthropic":
        return _dumps(chat_completion_to_message(body))
    return _dumps(message_to_chat_completion(body, created))
