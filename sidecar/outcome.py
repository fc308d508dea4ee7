"""What a finished attempt amounts to: the row's outcome, status and usage.

Usage comes from the provider's own frame when the tap found a complete one;
otherwise, when the provider may have billed, the row is marked for a tiktoken
estimate, computed off the event loop before the row is queued.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import orjson

from sidecar.meter import Outcome
from sidecar.usage import Usage

if TYPE_CHECKING:
    from sidecar.context import RequestContext
    from sidecar.splice import Exchange
    from sidecar.sse.tap import TapResult
    from sidecar.tokenizer import Tokenizer

_OK: Final = Outcome.OK
_RATE_LIMITED: Final = Outcome.RATE_LIMITED
_UPSTREAM_ERROR: Final = Outcome.UPSTREAM_ERROR
_REJECTED: Final = Outcome.REJECTED
_CLIENT_DISCONNECT: Final = Outcome.CLIENT_DISCONNECT
_SHUTDOWN: Final = Outcome.SHUTDOWN


def outcome_of(exchange_outcome: Outcome, status: int) -> Outcome:
    """Meter outcome: a provider's refusal is not 'ok' even when relayed cleanly."""
    if exchange_outcome is not _OK:
        return exchange_outcome
    if status == 429:
        return _RATE_LIMITED
    if status >= 500:
        return _UPSTREAM_ERROR
    if status >= 400:
        return _REJECTED
    return _OK


def may_have_billed(status: int, exchange_outcome: Outcome) -> bool:
    """Did the provider accept work we have no usage for?

    A 2xx answer did; a refusal (4xx/5xx) did not. With no answer at all, only a
    request the client abandoned (or shutdown cut) may have been generating: a
    timeout or a connection failure means the provider never got going.
    """
    if status:
        return status < 300
    return exchange_outcome is _CLIENT_DISCONNECT or exchange_outcome is _SHUTDOWN


def take_attempt(ctx: RequestContext, ex: Exchange, body: bytes, path: str | None = None) -> None:
    """Fill the row from the attempt that served the request. ``body`` and ``path`` are
    the request as the upstream got it (a translated one differs from the client's)."""
    ctx.bytes_out = ex.bytes_out
    ctx.t_first_byte = ex.t_first_byte
    gap = ex.gap
    ctx.max_gap = gap if gap >= 0 else None
    status = ctx.status = ex.head.status if ex.head is not None else 0
    ctx.outcome = outcome_of(ex.outcome, status)
    if ex.error is not None:
        ctx.error = str(ex.error)
    # The cheap question first: most responses end with their usage frame.
    usage = ex.tap.usage() if ex.tap is not None else None
    if usage is not None and usage.prompt_tokens is not None \
            and usage.completion_tokens is not None:
        ctx.usage, ctx.usage_source = usage, "reported"
    elif may_have_billed(status, ex.outcome):
        # No (complete) usage came: estimate what the provider most likely billed,
        # keeping any part it did report (Anthropic's message_start input tokens).
        # The full parse of the stream happens with the count, off the loop.
        ctx.pending_estimate = (body, ex.tap, ctx.path if path is None else path,
                                ex.tap_bytes)


def estimate_usage(ctx: RequestContext, tokenizer: Tokenizer) -> None:
    """Fill the row's usage with a tiktoken estimate (off the loop: tiktoken releases
    the GIL), keeping any part the provider did report."""
    assert ctx.pending_estimate is not None
    body, tap, path, fed = ctx.pending_estimate
    result = tap.result() if tap is not None else None
    partial = result.usage if result is not None else None
    if partial is not None and partial.prompt_tokens is not None:
        prompt, approx_p = partial.prompt_tokens, False
    else:
        # The request JSON is parsed again here, off the loop, rather than kept
        # parsed for the whole stream: that would cost memory on every stream.
        prompt, approx_p = tokenizer.count_prompt(
            orjson.loads(body), ctx.api_format, path, ctx.model
        )
    count, approx_c = tokenizer.counter(ctx.model)
    completion = 0
    if result is not None:
        completion = result.completion_estimate(count)
        # Beyond the tap's text cap the rest is extrapolated, which makes it approximate.
        approx_c = approx_c or result.completion_bytes_dropped > 0
    ctx.usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cache_read_tokens=partial.cache_read_tokens if partial is not None else None,
        cache_write_tokens=partial.cache_write_tokens if partial is not None else None,
        raw=partial.raw if partial is not None else None,
    )
    ctx.usage_source = "estimated"
    unread = fed if result is not None and read_nothing(result) else 0
    # A body the tap could not read as text (gzip the provider sent although we asked
    # for identity, binary garbage) leaves its completion uncounted: the row says so,
    # approximate, with the bytes left out, rather than a plain completion of 0.
    ctx.unread_bytes = unread or None
    ctx.usage_approx = approx_p or approx_c or unread > 0


def read_nothing(result: TapResult) -> bool:
    """The tap found no text and no event it could read in what it was fed."""
    return not result.completion_text and not result.completion_tokens_counted \
        and not result.done and (result.events == 0 or result.truncated)
