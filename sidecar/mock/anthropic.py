"""Anthropic's Messages API as the mock speaks it: the whole body and the event stream."""

from __future__ import annotations

from typing import Any, Final

import orjson

from sidecar.mock.shapes import Builder, Shape
from sidecar.mock.wire import ID_PH_S, named_event, to_json


class _Messages(Builder):
    """Anthropic Messages API: input usage in message_start, output_tokens in message_delta."""

    def _start_usage(self, shape: Shape, output: int) -> dict[str, Any]:
        # Anthropic's input_tokens excludes the cached part; the three add up to the prompt.
        uncached = max(0, shape.prompt_tokens - shape.cache_read - shape.cache_write)
        return {
            "input_tokens": uncached,
            "cache_creation_input_tokens": shape.cache_write,
            "cache_read_input_tokens": shape.cache_read,
            "output_tokens": output,
        }

    def _message(self, shape: Shape, content: list[Any], stop: str | None) -> dict[str, Any]:
        return {
            "id": "msg_" + ID_PH_S,
            "type": "message",
            "role": "assistant",
            "model": shape.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
        }

    def whole(self, shape: Shape, text: str, completion: int) -> bytes:
        if shape.tool is not None:
            block = {"type": "tool_use", "id": "toolu_" + ID_PH_S, "name": shape.tool,
                     "input": orjson.loads(text)}
            msg = self._message(shape, [block], "tool_use")
        else:
            msg = self._message(shape, [{"type": "text", "text": text}], "end_turn")
        if shape.usage:
            msg["usage"] = self._start_usage(shape, completion)
        return to_json(msg)

    def stream(
        self, shape: Shape, texts: list[str], text: str, completion: int
    ) -> tuple[bytes, list[bytes], bytes]:
        msg = self._message(shape, [], None)
        if shape.usage:
            msg["usage"] = self._start_usage(shape, 1)
        pre = named_event("message_start", {"type": "message_start", "message": msg})
        tool = shape.tool
        block: dict[str, Any] = {"type": "text", "text": ""} if tool is None else {
            "type": "tool_use", "id": "toolu_" + ID_PH_S, "name": tool, "input": {}}
        pre += named_event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        )
        pre += named_event("ping", {"type": "ping"})
        deltas = [
            named_event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": t} if tool is None
                    else {"type": "input_json_delta", "partial_json": t},
                },
            )
            for t in texts
        ]
        post = named_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn" if tool is None else "tool_use",
                      "stop_sequence": None},
        }
        if shape.usage:
            delta["usage"] = {"output_tokens": completion}
        post += named_event("message_delta", delta)
        post += named_event("message_stop", {"type": "message_stop"})
        return pre, deltas, post


BUILDERS: Final[dict[str, Builder]] = {"messages": _Messages()}
