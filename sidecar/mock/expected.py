"""What the mock says and the usage it reports: the deterministic text, exact token counts,
prompt counting and `expected_usage`.

Pure (no sockets). The server builds its responses from these; tests use the same functions
to know the truth a client should have received.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, Final

from sidecar.tokenizer import Tokenizer, encoding_for_model

# --------------------------------------------------------------------------- tokenizer


# A model of each encoding, so the sidecar's tokenizer picks that encoding.
_MODEL_OF_ENCODING: Final = {"o200k_base": "gpt-4o", "cl100k_base": "gpt-4"}


@functools.cache
def _counter(name: str) -> Callable[[str], int]:
    """Token counter for one encoding, loaded the way the sidecar loads it (offline first:
    SIDECAR_TOKENIZER_DIR, then tiktoken's cache, never a download), so the mock also runs
    air-gapped; with no encoding at all it counts with the sidecar's documented approximation."""
    count, _approx = Tokenizer.load().counter(_MODEL_OF_ENCODING.get(name, "gpt-4o"))
    return count


def encoding_name_for_model(model: str) -> str:
    """The encoding the sidecar's tokenizer uses for `model` (its one model -> encoding map),
    so what the mock reports and what the sidecar counts can never disagree by encoding."""
    return encoding_for_model(model)[0]


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


def tool_argument_fragments(
    chunks: int = DEFAULT_CHUNKS, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> list[str]:
    """The argument fragments of the mock's tool call, in stream order: the JSON object
    ``{"query": TEXT}`` (TEXT = expected_text) cut as ``{"query": "``, each chunk's text,
    ``"}``. The words need no JSON escaping, so the fragments join to valid JSON."""
    return ['{"query": "', *chunk_texts(chunks, chunk_tokens), '"}']


def expected_tool_arguments(
    chunks: int = DEFAULT_CHUNKS, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> str:
    """The whole arguments JSON of the mock's tool call (its completion tokens count this)."""
    return "".join(tool_argument_fragments(chunks, chunk_tokens))


def tool_to_call(kind: str, body: dict[str, Any]) -> str | None:
    """The tool the mock calls for this request, or None for a text answer.

    Like a model in an agent loop: a request that offers tools (and does not forbid
    them) gets a call of the named tool (tool_choice) or else the first one, unless
    its last message is a tool result, which gets the text answer.
    """
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
        return None
    choice = body.get("tool_choice")
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if kind == "chat":
        if choice == "none":
            return None
        if isinstance(last, dict) and last.get("role") == "tool":
            return None
        if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
            return str(choice["function"].get("name"))
        fn = tools[0].get("function")
        return str(fn.get("name")) if isinstance(fn, dict) else None
    if kind == "messages":
        if isinstance(choice, dict) and choice.get("type") == "none":
            return None
        content = last.get("content") if isinstance(last, dict) else None
        if isinstance(content, list) and any(
                isinstance(b, dict) and b.get("type") == "tool_result" for b in content):
            return None
        if isinstance(choice, dict) and choice.get("type") == "tool":
            return str(choice.get("name"))
        return str(tools[0].get("name"))
    return None


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


def expected_usage(
    kind: str,
    body: dict[str, Any],
    *,
    chunks: int = DEFAULT_CHUNKS,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    model: str | None = None,
) -> dict[str, int]:
    """prompt/completion/total tokens the mock reports for `body` sent to `kind`."""
    m = model or str(body.get("model") or "gpt-4o-mini")
    p = prompt_tokens(kind, body, m)
    c = 0 if kind == "embeddings" else expected_completion_tokens(chunks, chunk_tokens, m)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
