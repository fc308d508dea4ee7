"""Per-request context: what is known about a request as it moves through the proxy.

It carries route, upstream, identity and attempt count from the start, so that
failover, auth and limits (later issues) add fields here instead of threading new
arguments through every layer. At the end it becomes one immutable MeterRecord.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.meter import MeterRecord
from sidecar.sse import Tap
from sidecar.usage import Usage


@dataclass(slots=True)
class RequestContext:
    request_id: str
    ts_ms: int
    t_received: float  # loop.time()
    path: str
    route: str = ""
    upstream: str = ""
    api_format: str = "openai"
    key_id: str | None = None
    model: str | None = None
    stream: bool = False
    attempts: int = 0
    status: int = 0
    outcome: str = "ok"
    error: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    t_first_byte: float | None = None
    usage: Usage | None = None
    usage_source: str = "none"
    usage_approx: bool = False
    # (raw request JSON, the response's tap or None, path) when no usage was reported
    # and the row needs a tiktoken estimate, computed off the event loop before queueing.
    pending_estimate: tuple[bytes, Tap | None, str] | None = None

    def to_record(self, t_end: float) -> MeterRecord:
        u = self.usage or Usage()
        return MeterRecord(
            ts_ms=self.ts_ms,
            request_id=self.request_id,
            key_id=self.key_id,
            route=self.route,
            upstream=self.upstream,
            model=self.model,
            status=self.status,
            stream=self.stream,
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            total_tokens=u.total_tokens,
            cache_read_tokens=u.cache_read_tokens,
            cache_write_tokens=u.cache_write_tokens,
            usage_source=self.usage_source,
            usage_approx=self.usage_approx,
            usage_raw=u.raw,
            outcome=self.outcome,
            ttft_ms=None
            if self.t_first_byte is None
            else round((self.t_first_byte - self.t_received) * 1000, 3),
            duration_ms=round((t_end - self.t_received) * 1000, 3),
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            cost_usd=None,
            attempts=self.attempts,
            api_format=self.api_format,
            path=self.path,
            error=self.error,
        )
