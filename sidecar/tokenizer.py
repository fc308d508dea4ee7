"""Token counting with tiktoken, offline first, never fatal.

Counts are used for two things: admission (a prompt estimate reserved in the
token bucket before the request goes upstream) and metering when a provider
never sends a usage frame (cut streams, providers without usage). Both are
estimates; the provider's own usage frame, when it arrives, always wins.

Where encodings come from, in order (first hit per encoding wins):

1. ``$SIDECAR_TOKENIZER_DIR/<name>.tiktoken`` (read when ``Tokenizer.load`` runs),
2. ``<config tokenizer.dir>/<name>.tiktoken``,
3. tiktoken's own cache (``$TIKTOKEN_CACHE_DIR``, ``$DATA_GYM_CACHE_DIR`` or
   ``<tmp>/data-gym-cache``) — used only when the file is already there, unless
   ``allow_download=True``: tiktoken would otherwise fetch it from the network,
   which on an air-gapped host hangs or fails slowly, and which must never
   happen lazily on the event loop in the middle of a request.

Local files are checked against their published sha256 by tiktoken's
``load_tiktoken_bpe``. (That function also copies the file into tiktoken's
cache directory as a side effect; tiktoken ignores a failure to write it unless
``TIKTOKEN_CACHE_DIR`` is set explicitly.)

Nothing happens at import time. Encodings load lazily on first use, once per
process (shared by every ``Tokenizer``), or eagerly with ``Tokenizer.preload()``.
Building o200k_base takes most of a second and ~100 MB, so the first use must
not land on the event loop: either preload at start-up, or (as the server does)
count only off the loop and check ``available()`` at start-up instead.

When no encoding can be loaded at all the tokenizer keeps working on an
approximation (``ceil(utf8_bytes / 4)``), logs one warning on the
``sidecar.tokenizer`` logger, and flags every result approximate.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.usage import endpoint_kind

log = logging.getLogger("sidecar.tokenizer")

TOKENIZER_DIR_ENV = "SIDECAR_TOKENIZER_DIR"

# Encoding used for models we do not know (other vendors, local models): the
# newest OpenAI vocabulary is the closest general-purpose guess; always flagged.
DEFAULT_ENCODING = "o200k_base"

# The ONE model -> encoding map. Keys are prefixes of the (lower-cased) model
# name after any "vendor/" and "ft:" prefix; the longest matching prefix wins,
# so "gpt-4o-mini" is o200k_base while "gpt-4-turbo" is cl100k_base.
ENCODING_FOR_MODEL: Mapping[str, str] = {
    "gpt-5": "o200k_base",
    "gpt-4.1": "o200k_base",
    "gpt-4.5": "o200k_base",
    "gpt-4o": "o200k_base",
    "chatgpt-4o": "o200k_base",
    "o1": "o200k_base",
    "o3": "o200k_base",
    "o4": "o200k_base",
    # OpenAI's open-weight models use o200k_harmony: o200k_base's ranks plus chat
    # special tokens, so plain text counts the same.
    "gpt-oss": "o200k_base",
    "gpt-4": "cl100k_base",
    "gpt-3.5-turbo": "cl100k_base",
    "gpt-35-turbo": "cl100k_base",  # Azure's spelling of the same models
    "text-embedding-3-": "cl100k_base",
    "text-embedding-ada-002": "cl100k_base",
}

# Client-supplied model names feed the lookup cache: bound it so a client
# cycling through random names cannot grow it without limit.
MODEL_LOOKUP_CACHE_SIZE = 1024
# ...and bound what each cached name may weigh: no real model name is this long,
# while a request body (up to limits.max_body_bytes) could carry megabytes.
MODEL_NAME_MAX = 256

# Fallback when no tiktoken encoding loads: English text averages about four
# UTF-8 bytes per token in both OpenAI vocabularies (less dense for CJK text and
# code, where this under-counts, which is why results say approximate).
APPROX_BYTES_PER_TOKEN = 4

# OpenAI's published chat accounting (openai-cookbook, "How to count tokens
# with tiktoken"): each message is wrapped in <|start|>{role}\n...<|end|>\n,
# a "name" field costs one more token, and every reply is primed with
# <|start|>assistant<|message|>. Used for Anthropic too, where the real
# overhead is not published (those counts are flagged approximate anyway).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3

# An image part is priced by its size, which we do not decode. 85 tokens is
# OpenAI's flat "low detail" cost and the floor for any image, so the estimate
# stays a lower bound rather than a guess at the resolution.
IMAGE_PART_TOKENS = 85

_PAT_CL100K = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_PAT_O200K = "|".join(
    (
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    )
)


@dataclass(frozen=True, slots=True)
class _Spec:
    """What tiktoken_ext/openai_public.py (tiktoken 0.14) builds each encoding from."""

    name: str
    sha256: str
    url: str  # tiktoken's download URL; its sha1 names the file in tiktoken's cache
    pat_str: str
    special_tokens: Mapping[str, int]


_SPECS: Mapping[str, _Spec] = {
    "cl100k_base": _Spec(
        name="cl100k_base",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        url="https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        pat_str=_PAT_CL100K,
        special_tokens={
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
    "o200k_base": _Spec(
        name="o200k_base",
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        url="https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        pat_str=_PAT_O200K,
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
}

ENCODINGS: tuple[str, ...] = tuple(_SPECS)


def encoding_for_model(model: str | None) -> tuple[str, bool]:
    """(encoding name, approximate) for a model name; unknown models -> o200k_base, True."""
    if not model or len(model) > MODEL_NAME_MAX:
        return DEFAULT_ENCODING, True
    return _lookup(model)


@functools.lru_cache(maxsize=MODEL_LOOKUP_CACHE_SIZE)
def _lookup(model: str) -> tuple[str, bool]:
    name = model.strip().lower()
    name = name.rsplit("/", 1)[-1]  # "openai/gpt-4o" (OpenRouter and similar)
    name = name.removeprefix("ft:")  # "ft:gpt-4o-mini:org::id" fine-tunes
    best = ""
    for prefix in ENCODING_FOR_MODEL:
        if name.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    if not best:
        return DEFAULT_ENCODING, True
    return ENCODING_FOR_MODEL[best], False


def approx_count(text: str) -> int:
    """The no-tiktoken fallback: ceil(utf8_bytes / APPROX_BYTES_PER_TOKEN)."""
    n = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return math.ceil(n / APPROX_BYTES_PER_TOKEN)


# Process-wide cache: every Tokenizer (and a config reload's new one) shares the
# built encodings, keyed by where they came from.
_PROCESS_CACHE: dict[str, Any] = {}
_PROCESS_LOCK = threading.Lock()


def _tiktoken_cache_file(spec: _Spec) -> str | None:
    """Where tiktoken's read_file_cached keeps spec.url, mirroring its rules; None = no cache."""
    # Imported here, not at the top: only a lookup needs them, and at import they
    # (with what tempfile pulls in: shutil, bz2, lzma, random) add ~1.4 MB to every worker.
    import hashlib
    import tempfile

    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":
        return None
    return os.path.join(cache_dir, hashlib.sha1(spec.url.encode()).hexdigest())


def _load_file(spec: _Spec, path: str) -> Any:
    import tiktoken  # deferred: importing tiktoken is not free and may never be needed
    import tiktoken.load

    key = f"file:{os.path.realpath(path)}"
    with _PROCESS_LOCK:
        enc = _PROCESS_CACHE.get(key)
        if enc is None:
            ranks = tiktoken.load.load_tiktoken_bpe(path, expected_hash=spec.sha256)
            enc = tiktoken.Encoding(
                spec.name,
                pat_str=spec.pat_str,
                mergeable_ranks=ranks,
                special_tokens=dict(spec.special_tokens),
            )
            _PROCESS_CACHE[key] = enc
        return enc


def _load_tiktoken(spec: _Spec) -> Any:
    import tiktoken

    key = f"tiktoken:{spec.name}"
    with _PROCESS_LOCK:
        enc = _PROCESS_CACHE.get(key)
        if enc is None:
            enc = tiktoken.get_encoding(spec.name)
            _PROCESS_CACHE[key] = enc
        return enc


Counter = Callable[[str], int]


class Tokenizer:
    """Counts tokens per model; see the module docstring for sources and fallbacks."""

    def __init__(
        self,
        dirs: Sequence[str] = (),
        *,
        use_tiktoken_cache: bool = True,
        allow_download: bool = False,
    ) -> None:
        self.dirs = tuple(dirs)
        self.use_tiktoken_cache = use_tiktoken_cache
        self.allow_download = allow_download
        # name -> Encoding, or None once it failed: each source is tried once per instance.
        self._encodings: dict[str, Any] = {}
        self._warned = False
        self._lock = threading.Lock()

    @classmethod
    def load(cls, config_dir: str | None = None, *, allow_download: bool = False) -> Tokenizer:
        """A tokenizer searching $SIDECAR_TOKENIZER_DIR, then config_dir, then tiktoken's cache.

        Nothing is read yet (see ``preload``).
        """
        dirs = [d for d in (os.environ.get(TOKENIZER_DIR_ENV), config_dir) if d]
        return cls(dirs, allow_download=allow_download)

    def available(self) -> bool:
        """True when every known encoding has a file to load, without loading it.

        A server calls this at start-up to warn once when estimates will be
        approximate, while leaving the (large) encodings unloaded until the first
        estimate needs one: most requests are metered from reported usage.
        """
        for name in ENCODINGS:
            spec = _SPECS[name]
            in_dirs = any(os.path.isfile(os.path.join(d, f"{name}.tiktoken")) for d in self.dirs)
            cached = not in_dirs and self.use_tiktoken_cache and (
                (path := _tiktoken_cache_file(spec)) is not None and os.path.isfile(path)
            )
            if not (in_dirs or cached):
                return False
        return True

    def preload(self) -> bool:
        """Load every known encoding now; True when all of them are real (not fallbacks)."""
        return all(self._encoding(name) is not None for name in ENCODINGS)

    # -- encodings -----------------------------------------------------------

    def _encoding(self, name: str) -> Any:
        try:
            return self._encodings[name]
        except KeyError:
            pass
        with self._lock:
            if name not in self._encodings:
                self._encodings[name] = self._find(_SPECS[name])
            return self._encodings[name]

    def _find(self, spec: _Spec) -> Any:
        problems: list[str] = []
        for d in self.dirs:
            path = os.path.join(d, f"{spec.name}.tiktoken")
            if not os.path.isfile(path):
                problems.append(f"{path}: not found")
                continue
            try:
                return _load_file(spec, path)
            # tiktoken raises ValueError (hash mismatch, bad line) or OSError; a bad
            # tokenizer file must degrade estimates, never the proxy.
            except (OSError, ValueError) as exc:
                problems.append(f"{path}: {exc}")
        if self.use_tiktoken_cache:
            cached = _tiktoken_cache_file(spec)
            if self.allow_download or (cached is not None and os.path.isfile(cached)):
                try:
                    return _load_tiktoken(spec)
                # Downloads fail in many library-specific ways (requests, ssl, hash
                # check); any of them just means this source is unavailable.
                except Exception as exc:
                    problems.append(f"tiktoken cache/download: {type(exc).__name__}: {exc}")
            else:
                problems.append(f"tiktoken cache: {cached or 'disabled'}: not cached")
        log.debug("encoding %s unavailable: %s", spec.name, "; ".join(problems))
        if not self._warned:
            self._warned = True
            log.warning(
                "tiktoken encoding %s could not be loaded (%s); token estimates are approximate",
                spec.name,
                "; ".join(problems) or "no source configured",
            )
        return None

    def _encoder(self, model: str | None) -> tuple[Any, bool]:
        """(Encoding or None for the byte approximation, approximate)."""
        name, approx = encoding_for_model(model)
        enc = self._encoding(name)
        if enc is not None:
            return enc, approx
        for other in ENCODINGS:  # the wrong OpenAI vocabulary still beats bytes/4
            if other != name and (enc := self._encoding(other)) is not None:
                return enc, True
        return None, True

    # -- counting ------------------------------------------------------------

    def counter(self, model: str | None) -> tuple[Counter, bool]:
        """A text -> tokens function for one model, and whether it is approximate.

        Resolves the encoding once, for callers counting many strings (e.g. the
        SSE tap's count-and-discard hook).
        """
        enc, approx = self._encoder(model)
        if enc is None:
            return approx_count, True
        encode = enc.encode_ordinary

        def count(text: str) -> int:
            return len(encode(text)) if text else 0

        return count, approx

    def count_text(self, text: str, model: str | None) -> tuple[int, bool]:
        """(tokens, approximate) for plain text; special-token strings count as text."""
        count, approx = self.counter(model)
        return count(text), approx

    def count_prompt(
        self,
        body: Mapping[str, Any],
        api_format: str,
        path: str,
        model: str | None = None,
    ) -> tuple[int, bool]:
        """Estimated prompt tokens of a decoded request body: (tokens, approximate).

        Always an estimate, even when ``approximate`` is False (which only says
        the model's own vocabulary was used): providers add hidden framing,
        format tool schemas their own way and price images by resolution. What
        is counted: chat ``messages`` (+ OpenAI's per-message overhead), legacy
        ``prompt``, Responses ``instructions`` + ``input``, embeddings
        ``input``, Anthropic ``system`` + ``messages``, and ``tools`` (as their
        JSON text). Token-id prompts count their ids exactly. Images count
        ``IMAGE_PART_TOKENS`` each; audio and files are not counted.
        """
        if model is None:
            m = body.get("model")
            model = m if isinstance(m, str) else None
        count, approx = self.counter(model)
        n = _Prompt(count).body(body, api_format, path)
        return n, approx


class _Prompt:
    """The walk over a request body; ``count`` does the tokenising."""

    __slots__ = ("count",)

    def __init__(self, count: Counter) -> None:
        self.count = count

    def body(self, body: Mapping[str, Any], api_format: str, path: str) -> int:
        n = self.json(body.get("tools")) + self.json(body.get("functions"))
        if api_format == "anthropic":
            return n + self.content(body.get("system")) + self.messages(body.get("messages"))
        kind = endpoint_kind(api_format, path, body)
        if kind == "chat":
            return n + self.messages(body.get("messages"))
        if kind == "completions":
            return n + self.plain(body.get("prompt"))
        if kind == "embeddings":
            return self.plain(body.get("input"))
        return n + self.text(body.get("instructions")) + self.responses_input(body.get("input"))

    def text(self, value: Any) -> int:
        return self.count(value) if isinstance(value, str) else 0

    def json(self, value: Any) -> int:
        if not value:
            return 0
        try:
            return self.count(orjson.dumps(value).decode())
        except TypeError:  # orjson rejects e.g. huge ints; skip rather than fail admission
            return 0

    def plain(self, value: Any) -> int:
        """Legacy ``prompt`` / embeddings ``input``: str, [str], [int] or [[int]]."""
        if isinstance(value, str):
            return self.count(value)
        if not isinstance(value, list):
            return 0
        n = 0
        for item in value:
            if isinstance(item, str):
                n += self.count(item)
            elif isinstance(item, int):
                n += 1  # already a token id
            elif isinstance(item, list):
                n += len(item)  # a token-id array
        return n

    def messages(self, messages: Any) -> int:
        if not isinstance(messages, list):
            return 0
        n = REPLY_PRIMING_TOKENS
        for message in messages:
            if isinstance(message, Mapping):
                n += TOKENS_PER_MESSAGE + self.message(message)
        return n

    def message(self, message: Mapping[str, Any]) -> int:
        n = 0
        for key, value in message.items():
            if key == "content":
                n += self.content(value)
            elif key == "name":
                n += self.text(value) + TOKENS_PER_NAME
            elif key in ("role", "tool_call_id", "refusal"):
                n += self.text(value)
            elif key == "tool_calls" and isinstance(value, list):
                n += sum(self.call(c.get("function")) for c in value if isinstance(c, Mapping))
            elif key == "function_call":
                n += self.call(value)
        return n

    def call(self, fn: Any) -> int:
        if not isinstance(fn, Mapping):
            return 0
        return self.text(fn.get("name")) + self.text(fn.get("arguments"))

    def content(self, value: Any) -> int:
        """A string, or a list of parts (OpenAI content parts, Anthropic blocks)."""
        if isinstance(value, str):
            return self.count(value)
        if isinstance(value, list):
            return sum(self.part(p) for p in value)
        return 0

    def part(self, part: Any) -> int:
        if isinstance(part, str):
            return self.count(part)
        if not isinstance(part, Mapping):
            return 0
        kind = part.get("type")
        if kind in ("image_url", "input_image", "image"):
            return IMAGE_PART_TOKENS
        if kind == "tool_use":  # Anthropic: the model's call, input is a JSON object
            return self.text(part.get("name")) + self.json(part.get("input"))
        if kind == "tool_result":
            return self.content(part.get("content"))
        if kind == "thinking":
            return self.text(part.get("thinking"))
        for key in ("text", "refusal"):
            if isinstance(part.get(key), str):
                return self.count(part[key])
        return 0

    def responses_input(self, value: Any) -> int:
        """Responses ``input``: a string (one user message) or a list of items."""
        if isinstance(value, str):
            return REPLY_PRIMING_TOKENS + TOKENS_PER_MESSAGE + self.count(value)
        if not isinstance(value, list):
            return 0
        n = REPLY_PRIMING_TOKENS
        for item in value:
            if isinstance(item, Mapping):
                n += self.item(item)
        return n

    def item(self, item: Mapping[str, Any]) -> int:
        kind = item.get("type")
        if "role" in item or kind == "message":
            return TOKENS_PER_MESSAGE + self.text(item.get("role")) + self.content(
                item.get("content")
            )
        if kind in ("function_call", "custom_tool_call"):
            return self.text(item.get("name")) + self.text(item.get("arguments")) + self.text(
                item.get("input")
            )
        if kind in ("function_call_output", "custom_tool_call_output"):
            out = item.get("output")
            return self.content(out)
        if kind == "reasoning":
            return sum(self.part(p) for p in _as_list(item.get("summary")))
        return self.part(item)


def _as_list(value: Any) -> Iterable[Any]:
    return value if isinstance(value, list) else ()
