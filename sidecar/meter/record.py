"""The meter record: the one row a proxied request leaves in the meter table.

Imported by the hot path (the per-request context subclasses MeterRecord), so
this module imports nothing beyond the standard library's dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    """The meter's ``outcome`` values (a contract: users query them)."""

    OK = "ok"
    CLIENT_DISCONNECT = "client_disconnect"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    RATE_LIMITED = "rate_limited"  # the provider answered 429
    REJECTED = "rejected"  # refused: bad request, a 4xx from the provider
    SHUTDOWN = "shutdown"  # cut at the shutdown deadline
    INTERRUPTED = "interrupted"  # reserved: in flight when the process died
    SHED = "shed"  # refused by load shedding (queue full, or waited past queue_timeout)


class UsageSource(StrEnum):
    """Where a row's token counts came from."""

    REPORTED = "reported"  # the provider's own usage frame
    ESTIMATED = "estimated"  # tiktoken, when no usage came
    NONE = "none"  # nothing billable


@dataclass(slots=True)  # not frozen: a frozen init pays object.__setattr__ per field (26)
class MeterRecord:
    """One proxied request's row: complete at its end, never changed once submitted.

    The proxy's per-request context is a subclass that fills these fields in as
    the request goes, so ending a request costs no copy into a second object.
    """

    ts_ms: int  # wall clock at request start, ms since epoch
    request_id: str
    key_id: str | None = None  # identity (issue: auth); None until auth exists
    route: str = ""  # the configured route path that matched
    upstream: str = ""  # upstream name ('' when none was chosen)
    model: str | None = None
    status: int = 0  # HTTP status sent to the client (0 if none was sent)
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    usage_source: str = "none"  # 'reported' | 'estimated' | 'none'
    usage_approx: bool = False  # estimate made without the model's real encoding
    usage_raw: str | None = None  # provider's final usage JSON, verbatim
    outcome: str = "ok"  # 'ok' | 'client_disconnect' | 'upstream_error' | 'rejected' | ...
    ttft_ms: float | None = None  # request received -> first body byte written to client
    duration_ms: float = 0.0
    bytes_in: int = 0  # request body bytes from the client
    bytes_out: int = 0  # response bytes written to the client (head + body)
    cost_usd: float | None = None  # USD by the price table (sidecar.pricing); None: unpriced
    attempts: int = 0  # upstream attempts (failover arrives later; 1 today)
    api_format: str = "openai"  # 'openai' | 'anthropic'
    path: str = ""  # request path as received
    error: str | None = None  # short, secret-free reason when outcome != 'ok'
    # JSON list of {"upstream", "reason"} for each attempt that failed over (None: none).
    failed_attempts: str | None = None
    # The model name the serving upstream was sent, when the route renamed it
    # (``model`` keeps the one the client asked for). None: not renamed.
    upstream_model: str | None = None
    tier: str | None = None  # the queue tier the request was served in
    # An estimated row whose response body the estimate could not read as text (gzip
    # although identity was asked for, binary): those bytes, which completion_tokens
    # counts none of (usage_approx is set). None: nothing was left unread.
    unread_bytes: int | None = None
    # Hidden reasoning/thinking tokens the provider reported, a subset of
    # completion_tokens (OpenAI's completion_tokens_details / output_tokens_details).
    reasoning_tokens: int | None = None
