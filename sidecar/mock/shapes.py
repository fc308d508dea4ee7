"""What the mock provider says: deterministic text, exact token counts and pre-encoded responses.

Pure (no sockets). `sidecar.mock.server` serves these bytes; tests use the same functions to know
the truth a client should have received.

Every response is built once per *shape* (endpoint, model, chunk plan, usage mode, prompt
size) and cached as bytes with fixed-width placeholders for the two per-request values, the
response id and the creation time. Because the placeholders have the same width as the real
values, the chunked-encoding frame sizes computed at build time stay right after the
per-request `bytes.replace`, so serving a request is a dict lookup plus two replaces.
"""

from __future__ import annotations

import base64
import functools
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

# --------------------------------------------------------------------------- tokenizer


# A model of each encoding, so the sidecar's tokenizer picks that encoding.
_MODEL_OF_ENCODING: Final = {"o200k_base": "gpt-4o", "cl100k_base": "gpt-4"}


@functools.cache
def _counter(name: str) -> Callable[[str], int]:
    """Token counter for one encoding, loaded the way the sidecar loads it (offline first:
    SIDECAR_TOKENIZER_DIR, then tiktoken's cache, never a download), so the mock also runs
    air-gapped; with no encoding at all it counts with the sidecar's documented approximation."""
    from sidecar.tokenizer import Tokenizer

    count, _approx = Tokenizer.load().counter(_MODEL_OF_ENCODING.get(name, "gpt-4o"))
    return count


def encoding_name_for_model(model: str) -> str:
    """cl100k_base for the gpt-4 / gpt-3.5 / embedding-3 generation, o200k_base otherwise
    (gpt-4o, o-series, gpt-4.1, gpt-5 and every unknown or non-OpenAI model)."""
    m = model.lower()
    if m.startswith(("gpt-4o", "gpt-4.1", "gpt-4.5", "chatgpt-4o")):
        return "o200k_base"
    if m.startswith(("gpt-4", "gpt-3.5", "text-embedding-3", "text-embedding-ada")):
        return "cl100k_base"
    return "o200k_base"


_COUNT_CACHE: dict[tuple[str, str], int] = {}
_COUNT_CACHE_MAX: Final = 8192


def count_tokens(text: str, encoding_name: str) -> int:
    """Exact tiktoken count, memoised: the bench repeats the same prompts thousands of times."""
    key = (encoding_name, text)
    n = _COUNT_CACHE.get(key)
    if n is None:
        # disallowed_special=() so a prompt that happens to contain "<|endoftext|>" is counted
        # as text instead of raising, which is what the providers do with user text.
        n = _counter(encoding_name)(text)
        if len(_COUNT_CACHE) >= _COUNT_CACHE_MAX:
            _COUNT_CACHE.clear()
        _COUNT_CACHE[key] = n
    return n


# --------------------------------------------------------------------------- text

# Every word, with a leading space, is a single token in both cl100k_base and o200k_base, and
# "The" is one token too (tests/test_mock.py checks this). The tokenizers' pre-split regex cuts
# text at each " word", so tokens never merge across words: the count of any concatenation of
# chunks is the number of words. That makes chunk boundaries irrelevant to the count and lets
# the big mode compute its count without tokenizing megabytes.
WORDS: Final = tuple(
    "the quick brown fox runs over a lazy dog while seven bright stars move above still water "
    "and every small river meets the open sea under clear morning light as we sing".split()
)
DEFAULT_CHUNKS: Final = 20
DEFAULT_CHUNK_TOKENS: Final = 4
# Big mode uses bigger deltas so the 50 MB are mostly text rather than JSON envelope.
DEFAULT_BIG_CHUNK_TOKENS: Final = 128


def chunk_texts(
    chunks: int = DEFAULT_CHUNKS, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> list[str]:
    """The content of each streamed delta, in order. Word i of the whole text is
    WORDS[i % len(WORDS)]; the text starts with "The" and words are space-separated."""
    out: list[str] = []
    n_words = len(WORDS)
    for c in range(chunks):
        parts: list[str] = []
        for j in range(chunk_tokens):
            i = c * chunk_tokens + j
            word = WORDS[i % n_words]
            parts.append("The" if i == 0 else " " + word)
        out.append("".join(parts))
    return out


def expected_text(chunks: int = DEFAULT_CHUNKS, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> str:
    """The full completion text the mock streams (or returns) for this chunk plan."""
    return "".join(chunk_texts(chunks, chunk_tokens))


def big_chunk_text(chunk_tokens: int = DEFAULT_BIG_CHUNK_TOKENS) -> str:
    """The one delta text repeated by the big mode (x-mock-bytes): constant so a single
    pre-built frame can be written over and over."""
    return "".join(" " + WORDS[j % len(WORDS)] for j in range(chunk_tokens))


def expected_completion_tokens(
    chunks: int = DEFAULT_CHUNKS,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    model: str = "gpt-4o-mini",
) -> int:
    """tiktoken count of expected_text() with the model's encoding (what usage reports)."""
    return count_tokens(expected_text(chunks, chunk_tokens), encoding_name_for_model(model))


def big_completion_tokens(repeats: int, chunk_tokens: int, model: str) -> int:
    """Exact count of big_chunk_text() repeated `repeats` times, without building it: the count
    of one copy plus (repeats - 1) times what each further copy adds, which is exact because
    the pre-split regex makes the boundary between copies a token boundary."""
    if repeats <= 0:
        return 0
    enc = encoding_name_for_model(model)
    text = big_chunk_text(chunk_tokens)
    one = count_tokens(text, enc)
    step = count_tokens(text + text, enc) - one
    return one + (repeats - 1) * step


# --------------------------------------------------------------------------- prompt counting

KINDS: Final = ("chat", "completions", "responses", "embeddings", "messages")


def _text_of(content: Any) -> Iterable[str]:
    """Text parts of a message content: a string, or a list of parts that carry "text"
    (OpenAI {"type":"text"|"input_text"}, Anthropic {"type":"text"}). Non-text parts (images,
    tool calls) are not counted: the mock is not a billing reference for them."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                yield part
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    yield text
                elif "content" in part:
                    yield from _text_of(part["content"])


def prompt_tokens(kind: str, body: dict[str, Any], model: str | None = None) -> int:
    """The prompt token count the mock reports for a request body.

    chat: sum of message content tokens + 3 per message + 3 (OpenAI's chat framing rule);
    messages (Anthropic): system + message contents, no framing; responses: instructions +
    input; completions: prompt(s); embeddings: input(s), token-id inputs counted as given.
    """
    enc = encoding_name_for_model(model if model is not None else str(body.get("model", "")))
    total = 0
    if kind == "chat":
        messages = body.get("messages")
        if isinstance(messages, list):
            for msg in messages:
                total += 3
                if isinstance(msg, dict):
                    for text in _text_of(msg.get("content")):
                        total += count_tokens(text, enc)
            total += 3
    elif kind == "messages":
        for text in _text_of(body.get("system")):
            total += count_tokens(text, enc)
        messages = body.get("messages")
        if isinstance(messages, list):
            for msg in messages:
                if isinstance(msg, dict):
                    for text in _text_of(msg.get("content")):
                        total += count_tokens(text, enc)
    elif kind == "responses":
        for text in _text_of(body.get("instructions")):
            total += count_tokens(text, enc)
        for text in _text_of(body.get("input")):
            total += count_tokens(text, enc)
    elif kind in ("completions", "embeddings"):
        value = body.get("prompt" if kind == "completions" else "input")
        total = _count_inputs(value, enc)
    return total


def _count_inputs(value: Any, enc: str) -> int:
    """A prompt/input that may be a string, a list of strings, a token-id list, or a list of
    token-id lists (all four are legal in the OpenAI API)."""
    if isinstance(value, str):
        return count_tokens(value, enc)
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        return sum(_count_inputs(v, enc) for v in value)
    return 0


def input_count(body: dict[str, Any]) -> int:
    """How many embedding vectors an embeddings request asks for."""
    value = body.get("input")
    if isinstance(value, list) and value and not all(isinstance(v, int) for v in value):
        return len(value)
    return 1


# --------------------------------------------------------------------------- templates

# Fixed-width stand-ins. The id suffix is "mock" + 20 digits (see make_id); the time is a
# 10-digit unix second (good until 2286). Neither can occur in the generated text or JSON.
ID_WIDTH: Final = 24
ID_PH: Final = b"~MOCK~ID~".ljust(ID_WIDTH, b"~")
CREATED_PH: Final = b"@CREATED@@"
_ID_PH_S: Final = ID_PH.decode()
_CREATED_PH_JSON: Final = b'"' + CREATED_PH + b'"'


def make_id(n: int) -> bytes:
    """Per-request id suffix, exactly ID_WIDTH bytes ("mock" + 20 digits)."""
    return b"mock%020d" % (n % 10**20)


def fill(data: bytes, rid: bytes, created: bytes) -> bytes:
    """Put the per-request id and time into template bytes."""
    return data.replace(ID_PH, rid).replace(CREATED_PH, created)


def _json(obj: Any) -> bytes:
    # Numbers that must be filled per request were written as placeholder *strings*; drop
    # the quotes so the filled bytes are a JSON number of the same width.
    return orjson.dumps(obj).replace(_CREATED_PH_JSON, CREATED_PH)


def _frame(payload: bytes) -> bytes:
    """One HTTP/1.1 chunked-encoding frame."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _data_event(obj: Any) -> bytes:
    return _frame(b"data: " + _json(obj) + b"\n\n")


def _named_event(name: str, obj: Any) -> bytes:
    return _frame(b"event: " + name.encode() + b"\ndata: " + _json(obj) + b"\n\n")


_LAST_FRAME: Final = b"0\r\n\r\n"
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    529: "Site Overloaded",
}

STREAM_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n"
    b"cache-control: no-cache\r\n"
    b"connection: keep-alive\r\n"
    b"\r\n"
)


def http_head(status: int, headers: Sequence[tuple[str, str]], content_length: int | None) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, "Unknown").encode())]
    lines.extend(f"{k}: {v}".encode("latin-1") for k, v in headers)
    if content_length is not None:
        lines.append(b"content-length: %d" % content_length)
    lines.append(b"connection: keep-alive")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def json_response(status: int, body: Any, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    payload = _json(body)
    return http_head(status, [("content-type", "application/json"), *extra], len(payload)) + payload


@dataclass(frozen=True, slots=True)
class Shape:
    """Everything a response's bytes depend on except the id and the time."""

    kind: str
    model: str
    stream: bool
    chunks: int
    chunk_tokens: int
    usage: bool  # send the usage (frame or object); False = the no-usage fault
    usage_nulls: bool  # OpenAI include_usage style: "usage":null on every chunk + usage chunk
    prompt_tokens: int
    cache_read: int = 0
    cache_write: int = 0
    big: bool = False  # constant delta repeated `chunks` times (x-mock-bytes)
    inputs: int = 1  # embeddings: number of vectors
    base64: bool = False  # embeddings: encoding_format=base64 (the openai SDK's default)
    dims: int = 8


@dataclass(frozen=True, slots=True)
class Template:
    """A response split where the writer may pause: `head`+`pre` go out first, then each of
    `deltas` (one content delta each; in big mode `deltas[0]` is written `repeat` times),
    then `post` (finish, usage, terminator). `burst` is the whole thing joined, for the
    common unpaced case; empty in big mode."""

    head: bytes
    pre: bytes
    deltas: tuple[bytes, ...]
    post: bytes
    burst: bytes
    prompt_tokens: int
    completion_tokens: int
    repeat: int = 0

    @property
    def total_bytes(self) -> int:
        if self.repeat:
            return (
                len(self.head) + len(self.pre) + len(self.deltas[0]) * self.repeat + len(self.post)
            )
        return len(self.burst)


def build(shape: Shape) -> Template:
    """Encode a response for `shape` (slow path; callers cache by shape)."""
    if shape.kind == "embeddings":
        return _embeddings(shape)
    if shape.big:
        texts = [big_chunk_text(shape.chunk_tokens)]
        completion = big_completion_tokens(shape.chunks, shape.chunk_tokens, shape.model)
        full_text = ""  # never materialised in big mode; the *.done events carry "" instead
    else:
        texts = chunk_texts(shape.chunks, shape.chunk_tokens)
        full_text = "".join(texts)
        completion = count_tokens(full_text, encoding_name_for_model(shape.model))
    builder = _BUILDERS[shape.kind]
    if not shape.stream:
        body = builder.whole(shape, full_text, completion)
        head = http_head(200, [("content-type", "application/json")], len(body))
        return Template(head, b"", (), b"", head + body, shape.prompt_tokens, completion)
    pre, deltas, post = builder.stream(shape, texts, full_text, completion)
    post += _LAST_FRAME
    repeat = shape.chunks if shape.big else 0
    burst = b"" if shape.big else STREAM_HEAD + pre + b"".join(deltas) + post
    return Template(
        STREAM_HEAD, pre, tuple(deltas), post, burst, shape.prompt_tokens, completion, repeat
    )


class _Builder:
    def whole(self, shape: Shape, text: str, completion: int) -> bytes:
        raise NotImplementedError

    def stream(
        self, shape: Shape, texts: list[str], text: str, completion: int
    ) -> tuple[bytes, list[bytes], bytes]:
        raise NotImplementedError


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


class _Chat(_Builder):
    prefix = "chatcmpl-"
    obj = "chat.completion"
    chunk_obj = "chat.completion.chunk"
    details = True  # prompt/completion_tokens_details in usage (chat has them, legacy not)

    def _base(self, shape: Shape, obj: str) -> dict[str, Any]:
        return {
            "id": self.prefix + _ID_PH_S,
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
        body["choices"] = [self._whole_choice(text)]
        if shape.usage:
            body["usage"] = _openai_usage(shape, completion, details=self.details)
        return _json(body)

    def _chunk(self, shape: Shape, choice: dict[str, Any]) -> bytes:
        chunk = self._base(shape, self.chunk_obj)
        chunk["choices"] = [choice]
        if shape.usage_nulls:
            chunk["usage"] = None
        return _data_event(chunk)

    def _first(self, shape: Shape) -> bytes:
        return self._chunk(
            shape, self._choice(None, None, {"role": "assistant", "content": "", "refusal": None})
        )

    def _delta(self, shape: Shape, text: str) -> bytes:
        return self._chunk(shape, self._choice(text, None, {"content": text}))

    def _last(self, shape: Shape) -> bytes:
        return self._chunk(shape, self._choice("", "stop", {}))

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
            post += _data_event(final)
        post += _frame(b"data: [DONE]\n\n")
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


class _Responses(_Builder):
    """OpenAI Responses API: named events with a sequence_number; usage in response.completed."""

    def _response(self, shape: Shape, status: str, output: list[Any], usage: Any) -> dict[str, Any]:
        return {
            "id": "resp_" + _ID_PH_S,
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
            "id": "msg_" + _ID_PH_S,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def whole(self, shape: Shape, text: str, completion: int) -> bytes:
        out = [self._item(text, "completed")]
        return _json(self._response(shape, "completed", out, self._usage(shape, completion)))

    def stream(
        self, shape: Shape, texts: list[str], text: str, completion: int
    ) -> tuple[bytes, list[bytes], bytes]:
        item = "msg_" + _ID_PH_S
        loc = {"item_id": item, "output_index": 0, "content_index": 0}
        pending = self._response(shape, "in_progress", [], None)
        pre = _named_event(
            "response.created",
            {"type": "response.created", "sequence_number": 0, "response": pending},
        )
        pre += _named_event(
            "response.in_progress",
            {"type": "response.in_progress", "sequence_number": 1, "response": pending},
        )
        pre += _named_event(
            "response.output_item.added",
            {
                "type": "response.output_item.added",
                "sequence_number": 2,
                "output_index": 0,
                "item": self._item("", "in_progress"),
            },
        )
        pre += _named_event(
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
            _named_event(
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
        post = _named_event(
            "response.output_text.done",
            {
                "type": "response.output_text.done",
                "sequence_number": seq,
                **loc,
                "text": text,
                "logprobs": [],
            },
        )
        post += _named_event(
            "response.content_part.done",
            {
                "type": "response.content_part.done",
                "sequence_number": seq + 1,
                **loc,
                "part": self._part(text),
            },
        )
        done_item = self._item(text, "completed")
        post += _named_event(
            "response.output_item.done",
            {
                "type": "response.output_item.done",
                "sequence_number": seq + 2,
                "output_index": 0,
                "item": done_item,
            },
        )
        final = self._response(shape, "completed", [done_item], self._usage(shape, completion))
        post += _named_event(
            "response.completed",
            {"type": "response.completed", "sequence_number": seq + 3, "response": final},
        )
        return pre, deltas, post


class _Messages(_Builder):
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
            "id": "msg_" + _ID_PH_S,
            "type": "message",
            "role": "assistant",
            "model": shape.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
        }

    def whole(self, shape: Shape, text: str, completion: int) -> bytes:
        msg = self._message(shape, [{"type": "text", "text": text}], "end_turn")
        if shape.usage:
            msg["usage"] = self._start_usage(shape, completion)
        return _json(msg)

    def stream(
        self, shape: Shape, texts: list[str], text: str, completion: int
    ) -> tuple[bytes, list[bytes], bytes]:
        msg = self._message(shape, [], None)
        if shape.usage:
            msg["usage"] = self._start_usage(shape, 1)
        pre = _named_event("message_start", {"type": "message_start", "message": msg})
        pre += _named_event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
        pre += _named_event("ping", {"type": "ping"})
        deltas = [
            _named_event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": t},
                },
            )
            for t in texts
        ]
        post = _named_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        }
        if shape.usage:
            delta["usage"] = {"output_tokens": completion}
        post += _named_event("message_delta", delta)
        post += _named_event("message_stop", {"type": "message_stop"})
        return pre, deltas, post


_BUILDERS: Final[dict[str, _Builder]] = {
    "chat": _Chat(),
    "completions": _Completions(),
    "responses": _Responses(),
    "messages": _Messages(),
}


def embedding_vector(index: int, dims: int = 8) -> list[float]:
    """Deterministic small vector for input `index`; values are exact in float32 so the
    base64 and float encodings decode to the same numbers."""
    return [((index * 7 + j * 13) % 64 - 32) / 64.0 for j in range(dims)]


def _embeddings(shape: Shape) -> Template:
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
    payload = _json(body)
    head = http_head(200, [("content-type", "application/json")], len(payload))
    return Template(head, b"", (), b"", head + payload, shape.prompt_tokens, 0)


def big_repeats(nbytes: int, fixed: int, frame: int) -> int:
    """How many copies of a `frame`-byte delta make the response at least `nbytes` long when
    `fixed` bytes (head, preamble, trailer) surround them; the overshoot is under one frame."""
    return max(1, math.ceil((nbytes - fixed) / frame))
