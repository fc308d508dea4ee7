"""Per-request context: what is known about a request as it moves through the proxy.

It carries route, upstream, identity and attempt count from the start, so that
failover, auth and limits (later issues) add fields here instead of threading new
arguments through every layer. It is a MeterRecord itself: at the end its token
and timing columns are filled in and it goes to the meter as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sidecar.meter import MeterRecord
from sidecar.sse import Tap
from sidecar.usage import Usage


@dataclass(slots=True, kw_only=True)
class RequestContext(MeterRecord):
    """The row being filled in, plus what only the proxy needs on the way."""

    # The row's timings are time.perf_counter() seconds, not loop.time(): uvloop's loop
    # time is libuv's millisecond clock, cached per loop turn, which made every
    # ttft_ms below a millisecond read 0.0 or 1.0.
    t_received: float
    t_first_byte: float | None = None
    # The longest pause between two provider body reads (seconds), for /metrics.
    max_gap: float | None = None
    usage: Usage | None = None
    # (raw request JSON, the response's tap or None, path, payload bytes the tap was fed)
    # when no usage was reported and the row needs a tiktoken estimate, computed off the
    # event loop before queueing.
    pending_estimate: tuple[bytes, Tap | None, str, int] | None = None
    # Admission (sidecar.ratelimit): the identity's key record, the bucket charged and
    # its size, the tokens reserved there, and the x-ratelimit-* headers to send.
    api_key: Any = None
    bucket: str | None = None
    bucket_limits: Any = None
    reserved: int = 0
    rate_headers: tuple[tuple[bytes, bytes], ...] = ()
    # This request's line in the crash journal (sidecar.meter.journal); 0: none yet.
    journal_seq: int = 0

    def to_record(self, t_end: float) -> MeterRecord:
        """Complete the row (tokens, timings) and hand it over; not changed after."""
        u = self.usage
        if u is not None:
            self.prompt_tokens = u.prompt_tokens
            self.completion_tokens = u.completion_tokens
            self.total_tokens = u.total_tokens
            self.cache_read_tokens = u.cache_read_tokens
            self.cache_write_tokens = u.cache_write_tokens
            self.reasoning_tokens = u.reasoning_tokens
            self.usage_raw = u.raw
        if self.t_first_byte is not None:
            self.ttft_ms = round((self.t_first_byte - self.t_received) * 1000, 3)
        self.duration_ms = round((t_end - self.t_received) * 1000, 3)
        self.pending_estimate = None  # the row must not keep the stream's bytes alive
        return self
