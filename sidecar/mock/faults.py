"""The mock's knobs: pacing, sizes, usage and fault options, set at construction (or on the
CLI) and overridable per request with x-mock-* headers, so one instance serves many tests.

    x-mock-chunks: N            content deltas per stream (default 20)
    x-mock-chunk-tokens: N      words (= tokens) per delta (default 4; 128 in big mode)
    x-mock-delay-ms: D          pause between deltas; 0 = burst, the whole stream in one write
    x-mock-first-byte-ms: F     pause before the response head
    x-mock-bytes: 50MB          big mode: stream until the response is at least this long
    x-mock-always-usage: 1      OpenAI: send the usage chunk even without include_usage
    x-mock-fault: F[,F...]      status:NNN | disconnect-after:N | no-usage | hang | malformed |
                                close-after-read:MS (read the request, close MS ms later, no reply)
    x-mock-retry-after: S       retry-after value on 429/503 (default 1)
    x-mock-cache-read-tokens / x-mock-cache-write-tokens: N   cached prompt tokens to report
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class Faults:
    status: int | None = None
    disconnect_after: int | None = None
    no_usage: bool = False
    hang: bool = False
    malformed: bool = False
    close_after_read: float | None = None  # seconds


def parse_faults(spec: str | None) -> Faults:
    faults = Faults()
    if not spec:
        return faults
    for raw in spec.split(","):
        item = raw.strip().lower()
        name, _, arg = item.partition(":")
        if not item or name == "none":
            continue
        if name == "status":
            code = int(arg)
            if not 100 <= code <= 599:
                raise ValueError(f"status fault wants an HTTP status, got {arg!r}")
            faults = replace(faults, status=code)
        elif name == "disconnect-after":
            faults = replace(faults, disconnect_after=max(0, int(arg)))
        elif name == "no-usage":
            faults = replace(faults, no_usage=True)
        elif name == "hang":
            faults = replace(faults, hang=True)
        elif name == "malformed":
            faults = replace(faults, malformed=True)
        elif name == "close-after-read":
            faults = replace(faults, close_after_read=max(0, int(arg or 0)) / 1000)
        else:
            raise ValueError(f"unknown mock fault {item!r}")
    return faults


def parse_size(text: str) -> int:
    """Size text -> bytes: "52428800", "50MB", "50M", "64k", "1GiB" (K/M/G are 1024-based)."""
    s = text.strip().lower().replace(" ", "")
    if s.endswith("ib"):
        s = s[:-2]
    elif s.endswith("b"):
        s = s[:-1]
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(s[-1:], 1)
    if scale != 1:
        s = s[:-1]
    return int(float(s) * scale)


@dataclass(frozen=True, slots=True)
class Knobs:
    chunks: int
    chunk_tokens: int | None  # None: DEFAULT_CHUNK_TOKENS, or DEFAULT_BIG_CHUNK_TOKENS in big mode
    delay_ms: float
    first_byte_ms: float
    bytes_total: int
    always_usage: bool
    faults: Faults
    retry_after: str
    cache_read: int
    cache_write: int

    def with_headers(self, items: Sequence[tuple[bytes, bytes]]) -> Knobs:
        changes: dict[str, Any] = {}
        for name, raw in items:
            value = raw.decode("latin-1").strip()
            key = name[7:]  # after b"x-mock-"
            if key == b"chunks":
                changes["chunks"] = max(0, int(value))
            elif key == b"chunk-tokens":
                changes["chunk_tokens"] = max(1, int(value))
            elif key == b"delay-ms":
                changes["delay_ms"] = max(0.0, float(value))
            elif key == b"first-byte-ms":
                changes["first_byte_ms"] = max(0.0, float(value))
            elif key == b"bytes":
                changes["bytes_total"] = parse_size(value)
            elif key == b"always-usage":
                changes["always_usage"] = value.lower() in ("1", "true", "yes", "on")
            elif key == b"fault":
                changes["faults"] = parse_faults(value)
            elif key == b"retry-after":
                changes["retry_after"] = value
            elif key == b"cache-read-tokens":
                changes["cache_read"] = max(0, int(value))
            elif key == b"cache-write-tokens":
                changes["cache_write"] = max(0, int(value))
            # Unknown x-mock-* headers are ignored so newer tests can run against older mocks.
        return replace(self, **changes) if changes else self
