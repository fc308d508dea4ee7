"""OpenAI's wire formats as the mock speaks them: chat completions, legacy completions and
the Responses API (whole bodies and streams), and embeddings."""

from __future__ import annotations

import base64
import struct
from typing import Any, Final

from sidecar.mock.shapes import Builder, Shape, Template
from sidecar.mock.wire import (
    CREATED_PH,
    ID_PH_S,
    chunk_frame,
    data_event,
    http_head,
    named_event,
    to_json,
)


def _openai_usage(shape: Shape, completion: int, *, details: bool = True) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": shape.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": shape.prompt_tokens + completion,
    }
    if details:
        usage["prompt_tokens_details"] = {"cached_tokens": shape.cache_read, "audio_tokens": 0}
        usage["completion_tokens_details"] = {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        }
    return usage


class _Chat(Builder):
    prefix = "chatcmpl-"
    obj = "chat.completion"
    chunk_obj = "chat.completion.chunk"
    details = True  # prompt/completion_tokens_details in usage (chat has them, legacy not)

    def _base(self, shape: Shape, obj: str) -> dict[str, Any]:
        return {
            "id": self.prefix + ID_PH_S,
            "object": obj,
            "created": CREATED_PH.decode(),
            "model": shape.model,
            "system_fingerprint": "fp_mock",
        }

    def _choice(
        self, text: str | None, finish: str | None, delta: dict[str, Any]
    ) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def _whole_choice(self, text: str) -> dict[str, Any]:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
            "logprobs": None,
            "finish_reason": "stop",
        }

    def whole(self, shape: Shape, text: str, completion: int) -> bytes:
        body = self._base(shape, self.obj)
        body["choices"] = [self._whole_choice(text) if shape.tool is None
                           else self._whole_tool_choice(shape.tool, text)]
        if shape.usage:
            body["usage"] = _openai_usage(shape, completion, details=self.details)
        return to_json(body)

    def _chunk(self, shape: Shape, choice: dict[str, Any]) -> bytes:
        chunk = self._base(shape, self.chunk_obj)
        chunk["choices"] = [choice]
        if shape.usage_nulls:
            chunk["usage"] = None
        return data_event(chunk)

    def _whole_tool_choice(self, name: str, arguments: str) -> dict[str, Any]:
        call = {"id": "call_" + ID_PH_S, "type": "function",
                "function": {"name": name, "arguments": arguments}}
        return {
            "index": 0,
            "message": {"role": "assistant", "content": None, "tool_calls": [call],
                        "refusal": None, "annotations": []},
            "logprobs": None,
            "finish_reason": "tool_calls",
        }

    def _first(self, shape: Shape) -> bytes:
        if shape.tool is not None:
            # OpenAI's tool-call stream: the first chunk names the call (id, function
            # name, empty arguments); content is null throughout.
            call = {"index": 0, "id": "call_" + ID_PH_S, "type": "function",
                    "function": {"name": shape.tool, "arguments": ""}}
            return self._chunk(shape, self._choice(None, None, {
                "role": "assistant", "content": None, "tool_calls": [call], "refusal": None}))
        return self._chunk(
            shape, self._choice(None, None, {"role": "assistant", "content": "", "refusal": None})
        )

    def _delta(self, shape: Shape, text: str) -> bytes:
        if shape.tool is not None:
            return self._chunk(shape, self._choice(text, None, {
                "tool_calls": [{"index": 0, "function": {"arguments": text}}]}))
        return self._chunk(shape, self._choice(text, None, {"content": text}))

    def _last(self, shape: Shape) -> bytes:
        return self._chunk(shape, self._choice("", "stop" if shape.tool is None
                                               else "tool_calls", {}))

    def stream(
        self, shape: Shape, texts: list[str], text: str, completion: int
    ) -> tuple[bytes, list[bytes], bytes]:
        pre = self._first(shape)
        deltas = [self._delta(shape, t) for t in texts]
        post = self._last(shape)
        if shape.usage and shape.usage_nulls:
            final = self._base(shape, self.chunk_obj)
            final["choices"] = []
            final["usage"] = _openai_usage(shape, completion, details=self.details)
            post += data_event(final)
        post += chunk_frame(b"data: [DONE]\n\n")
        return pre, deltas, post


class _Completions(_Chat):
    """Legacy /v1/completions: same envelope, choices[].text instead of a message/delta."""

    prefix = "cmpl-"
    obj = "text_completion"
    chunk_obj = "text_completion"  # legacy stream chunks have no ".chunk" suffix
    details = False

    def _choice(
        self, text: str | None, finish: str | None, delta: dict[str, Any]
    ) -> dict[str, Any]:
        return {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}

    def _whole_choice(self, text: str) -> dict[str, Any]:
        return self._choice(text, "stop", {})

    def _first(self, shape: Shape) -> bytes:
        return b""  # no role chunk in the legacy API


class _Responses(Builder):
    """OpenAI Responses API: named events with a sequence_number; usage in response.completed."""

    def _response(self, shape: Shape, status: str, output: list[Any], usage: Any) -> dict[str, Any]:
        return {
            "id": "resp_" + ID_PH_S,
            "object": "response",
            "created_at": CREATED_PH.decode(),
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "max_output_tokens": None,
            "model": shape.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": {},
        }

    def _usage(self, shape: Shape, completion: int) -> dict[str, Any] | None:
        if not shape.usage:
            return None
        return {
            "input_tokens": shape.prompt_tokens,
            "input_tokens_details": {"cached_tokens": shape.cache_read},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": shape.prompt_tokens + completion,
        }

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _item(self, text: str, status: str) -> dict[str, Any]:
        content = [self._part(text)] if status == "completed" else []
        return {
            "id": "msg_" + ID_PH_S,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def whole(self, shape: Shape, text: str, completion: int) -> bytes:
        out = [self._item(text, "completed")]
        return to_json(self._response(shape, "completed", out, self._usage(shape, completion)))

    def stream(
        self, shape: Shape, texts: list[str], text: str, completion: int
    ) -> tuple[bytes, list[bytes], bytes]:
        item = "msg_" + ID_PH_S
        loc = {"item_id": item, "output_index": 0, "content_index": 0}
        pending = self._response(shape, "in_progress", [], None)
        pre = named_event(
            "response.created",
            {"type": "response.created", "sequence_number": 0, "response": pending},
        )
        pre += named_event(
            "response.in_progress",
            {"type": "response.in_progress", "sequence_number": 1, "response": pending},
        )
        pre += named_event(
            "response.output_item.added",
            {
                "type": "response.output_item.added",
                "sequence_number": 2,
                "output_index": 0,
                "item": self._item("", "in_progress"),
            },
        )
        pre += named_event(
            "response.content_part.added",
            {
                "type": "response.content_part.added",
                "sequence_number": 3,
                **loc,
                "part": self._part(""),
            },
        )
        # In big mode the one delta frame is repeated, so its sequence_number cannot grow;
        # it stays 4 and the events after it continue from 4 + repeats.
        deltas = [
            named_event(
                "response.output_text.delta",
                {
                    "type": "response.output_text.delta",
                    "sequence_number": 4 + (0 if shape.big else i),
                    **loc,
                    "delta": t,
                    "logprobs": [],
                },
            )
            for i, t in enumerate(texts)
        ]
        seq = 4 + shape.chunks
        post = named_event(
            "response.output_text.done",
            {
                "type": "response.output_text.done",
                "sequence_number": seq,
                **loc,
                "text": text,
                "logprobs": [],
            },
        )
        post += named_event(
            "response.content_part.done",
            {
                "type": "response.content_part.done",
                "sequence_number": seq + 1,
                **loc,
                "part": self._part(text),
            },
        )
        done_item = self._item(text, "completed")
        post += named_event(
            "response.output_item.done",
            {
                "type": "response.output_item.done",
                "sequence_number": seq + 2,
                "output_index": 0,
                "item": done_item,
            },
        )
        final = self._response(shape, "completed", [done_item], self._usage(shape, completion))
        post += named_event(
            "response.completed",
            {"type": "response.completed", "sequence_number": seq + 3, "response": final},
        )
        return pre, deltas, post


def embedding_vector(index: int, dims: int = 8) -> list[float]:
    """Deterministic small vector for input `index`; values are exact in float32 so the
    base64 and float encodings decode to the same numbers."""
    return [((index * 7 + j * 13) % 64 - 32) / 64.0 for j in range(dims)]


def embeddings(shape: Shape) -> Template:
    data: list[dict[str, Any]] = []
    for i in range(shape.inputs):
        vec = embedding_vector(i, shape.dims)
        value: Any = vec
        if shape.base64:
            value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    body: dict[str, Any] = {"object": "list", "data": data, "model": shape.model}
    if shape.usage:
        body["usage"] = {"prompt_tokens": shape.prompt_tokens, "total_tokens": shape.prompt_tokens}
    payload = to_json(body)
    head = http_head(200, [("content-type", "application/json")], len(payload))
    return Template(head, b"", (), b"", head + payload, shape.prompt_tokens, 0)


BUILDERS: Final[dict[str, Builder]] = {
    "chat": _Chat(),
    "completions": _Completions(),
    "responses": _Responses(),
}
