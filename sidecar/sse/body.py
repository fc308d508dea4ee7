"""The tap for a non-streaming (JSON) response body: ``_BodyTap``."""

from __future__ import annotations

from typing import Any

import orjson

from sidecar.endpoints import EndpointKind
from sidecar.sse.scan import ORJSON_PARSE_MAX, _salvage_usage
from sidecar.sse.tap import OVERSIZE_TAIL_BYTES, Counter, Tap, TapResult
from sidecar.sse.text import _BODY_KEYS, _Text
from sidecar.usage import (
    Usage,
    usage_from_anthropic,
    usage_from_body,
    usage_from_openai,
    usage_from_openai_embeddings,
)


class _BodyTap(Tap):
    """A JSON body: copied up to body_cap, looked at when asked.

    Bodies up to ORJSON_PARSE_MAX are parsed whole. Bigger ones (embeddings
    batches reach megabytes of floats) are not: orjson would need ~13x the body in
    scratch memory and the stdlib parser tens of ms on the event loop. Their usage
    is taken from the tail instead, where every provider writes it after the
    large part (see _salvage_usage), and ``done`` means that usage was found in a
    body ending in ``}``. Beyond body_cap only that tail is kept at all.
    """

    __slots__ = ("_api_format", "_buf", "_cap", "_counter", "_kind", "_over", "_tail")

    def __init__(
        self, api_format: str, kind: EndpointKind, body_cap: int, counter: Counter | None
    ) -> None:
        self._api_format = api_format
        self._kind = kind
        self._cap = body_cap
        self._counter = counter
        self._buf = bytearray()
        self._over = False
        self._tail = bytearray()

    def feed(self, data: bytes | memoryview) -> None:
        if self._over:
            tail = self._tail
            tail += data
            if len(tail) > 2 * OVERSIZE_TAIL_BYTES:
                del tail[:-OVERSIZE_TAIL_BYTES]
            return
        buf = self._buf
        buf += data
        if len(buf) > self._cap:
            # Give up on the body rather than grow: keep a tail to salvage usage from.
            self._over = True
            self._tail = bytearray(buf[-OVERSIZE_TAIL_BYTES:])
            self._buf = bytearray()

    def _usage_of(self, usage: dict[str, Any]) -> Usage:
        if self._api_format == "anthropic":
            return usage_from_anthropic(usage)
        if self._kind == "embeddings":
            return usage_from_openai_embeddings(usage)
        return usage_from_openai(usage)

    def _parse(self) -> tuple[Usage | None, bool]:
        """(usage, done) of what was fed so far."""
        if not self._over and len(self._buf) <= ORJSON_PARSE_MAX:
            try:
                obj = orjson.loads(self._buf)
            except orjson.JSONDecodeError:
                return None, False
            if not isinstance(obj, dict):
                return None, False
            embeddings = self._kind == "embeddings"
            return usage_from_body(self._api_format, obj, embeddings=embeddings), True
        tail = self._tail if self._over else self._buf[-OVERSIZE_TAIL_BYTES:]
        salvaged = _salvage_usage(tail)
        if salvaged is None:
            return None, False
        return self._usage_of(salvaged), tail.rstrip().endswith(b"}")

    def usage(self) -> Usage | None:
        return self._parse()[0]

    def result(self) -> TapResult:
        usage, done = self._parse()
        text = _Text(self._counter)
        if not self._over:
            for key in _BODY_KEYS[self._kind]:
                text.grab(self._buf, key)
        return TapResult(
            usage=usage,
            completion_text=text.text(),
            events=0,
            done=done,
            completion_tokens_counted=text.counted,
            completion_bytes_dropped=text.dropped,
            truncated=self._over,
        )
