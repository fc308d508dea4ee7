"""Turning a `Shape` into a `Template`: the text and its count, the wire format's builder,
and in big mode how many repeats of the one delta frame make the requested size.

Slow path, pure: the server calls it once per shape and caches the result.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Final

from sidecar.mock import anthropic, openai
from sidecar.mock.expected import (
    big_chunk_text,
    big_completion_tokens,
    chunk_texts,
    count_tokens,
    encoding_name_for_model,
    tool_argument_fragments,
)
from sidecar.mock.shapes import Builder, Shape, Template
from sidecar.mock.wire import LAST_FRAME, STREAM_HEAD, http_head

_BUILDERS: Final[dict[str, Builder]] = {**openai.BUILDERS, **anthropic.BUILDERS}


def build(shape: Shape) -> Template:
    """Encode a response for `shape` (slow path; callers cache by shape)."""
    if shape.kind == "embeddings":
        return openai.embeddings(shape)
    if shape.big:
        texts = [big_chunk_text(shape.chunk_tokens)]
        completion = big_completion_tokens(shape.chunks, shape.chunk_tokens, shape.model)
        full_text = ""  # never materialised in big mode; the *.done events carry "" instead
    elif shape.tool is not None:
        # A tool call: the "texts" are the argument fragments, counted as the completion.
        texts = tool_argument_fragments(shape.chunks, shape.chunk_tokens)
        full_text = "".join(texts)
        completion = count_tokens(full_text, encoding_name_for_model(shape.model))
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
    post += LAST_FRAME
    repeat = shape.chunks if shape.big else 0
    burst = b"" if shape.big else STREAM_HEAD + pre + b"".join(deltas) + post
    return Template(
        STREAM_HEAD, pre, tuple(deltas), post, burst, shape.prompt_tokens, completion, repeat
    )


def big_repeats(nbytes: int, fixed: int, frame: int) -> int:
    """How many copies of a `frame`-byte delta make the response at least `nbytes` long when
    `fixed` bytes (head, preamble, trailer) surround them; the overshoot is under one frame."""
    return max(1, math.ceil((nbytes - fixed) / frame))


def build_big(shape: Shape, nbytes: int) -> Template:
    """Big mode: the number of repeats is chosen so the whole response (head and framing
    included) is at least `nbytes` and overshoots by less than one delta frame."""
    probe = build(replace(shape, big=True, chunks=1))
    fixed = probe.total_bytes - len(probe.deltas[0])
    repeats = big_repeats(nbytes, fixed, len(probe.deltas[0]))
    tmpl = build(replace(shape, big=True, chunks=repeats))
    # The trailer grows by a few digits with the counts; top up if that tipped us under.
    while tmpl.total_bytes < nbytes:
        repeats += 1
        tmpl = build(replace(shape, big=True, chunks=repeats))
    return tmpl
