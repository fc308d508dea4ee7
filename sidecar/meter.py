"""Meter record, bounded queue and the aiosqlite batch writer.

BEING WRITTEN. Interface the server relies on: MeterRecord and Meter below.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MeterRecord:
    """One proxied request, built once at its end and never mutated."""

    ts_ms: int  # wall clock at request start, ms since epoch
    request_id: str
    key_id: str | None  # identity (issue: auth); None until auth exists
    route: str  # the configured route path that matched
    upstream: str  # upstream name ('' when none was chosen)
    model: str | None
    status: int  # HTTP status sent to the client (0 if none was sent)
    stream: bool
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cache_read_tokens: int | None
    cache_write_tokens: int | None
    usage_source: str  # 'reported' | 'estimated' | 'none'
    usage_approx: bool  # estimate made without the model's real encoding
    usage_raw: str | None  # provider's final usage JSON, verbatim
    outcome: str  # 'ok' | 'client_disconnect' | 'upstream_error' | 'rejected' | ...
    ttft_ms: float | None  # request received -> first body byte written to client
    duration_ms: float
    bytes_in: int  # request body bytes from the client
    bytes_out: int  # response bytes written to the client (head + body)
    cost_usd: float | None  # price table arrives with budgets; None until then
    attempts: int  # upstream attempts (failover arrives later; 1 today)
    api_format: str  # 'openai' | 'anthropic'
    path: str  # request path as received
    error: str | None  # short, secret-free reason when outcome != 'ok'
