"""Usage normalisation across API formats and tiktoken estimates (pure, no I/O).

BEING WRITTEN. Interface the server relies on: Usage below.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    raw: str | None = None  # the provider's own usage JSON, verbatim where possible
