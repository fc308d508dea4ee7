"""The token limiter as the proxy's Admission: reserve at admission, settle at the end.

``admit`` estimates the request (prompt tokens by tiktoken plus its max_tokens),
reserves that in the identity's bucket and either lets it in (with the
x-ratelimit-* headers for its response) or refuses it with 429 and the time after
which the same request would fit. ``settle`` runs once per request, failover or
not, with the final usage (reported, or estimated for a disconnect), and replaces
the reservation with it: a refund, or an extra charge. On the in-process backend
both are synchronous; a remote backend's reservation is an awaitable.
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from sidecar.errors import QuotaExceeded, RateLimited
from sidecar.ratelimit.bucket import Grant
from sidecar.ratelimit.headers import (
    LIMIT_TOKENS,
    REMAINING_TOKENS,
    RESET_TOKENS,
    duration,
    rate_headers,
    retry_after,
)
from sidecar.ratelimit.memory import MemoryBackend
from sidecar.ratelimit.policy import (
    BYTES_PER_TOKEN_BOUND,
    EXACT_ESTIMATE_MAX_BYTES,
    LimitPolicy,
    Limits,
    completion_reserve,
)
from sidecar.ratelimit.spend import SpendLedger, period_start_ms

if TYPE_CHECKING:
    from typing import Protocol

    from sidecar.context import RequestContext
    from sidecar.handler import ClientSide
    from sidecar.request_reader import ParsedRequest
    from sidecar.runtime import Route
    from sidecar.tokenizer import Tokenizer

    class Backend(Protocol):
        def reserve(self, name: str, limits: Limits, cost: int,
                    now: float) -> Grant | Awaitable[Grant]: ...

        def settle(self, name: str, limits: Limits, delta: int, now: float) -> None: ...

        def close(self) -> None: ...

_NO_PEER: Final = "-"


class Limiter:
    __slots__ = ("backend", "clock", "memory", "spend", "tokenizer")

    def __init__(self, backend: Backend, tokenizer: Tokenizer,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        # The in-process backend, when it is the one: its token-only reservation is
        # synchronous and is taken without a Grant on the admit fast path.
        self.memory = backend if isinstance(backend, MemoryBackend) else None
        self.tokenizer = tokenizer
        self.clock = clock
        # Money spent per key (read from the meter by its own task), when keys exist.
        self.spend: SpendLedger | None = None

    # -- Admission -------------------------------------------------------------------
    def admit(self, req: ParsedRequest, body: dict[str, Any], ctx: RequestContext,
              route: Route, client: ClientSide) -> Awaitable[None] | None:
        key = ctx.api_key
        if key is not None and key.budget_usd is not None and self.spend is not None:
            self._check_budget(key)
        policy = route.limit
        if policy is None:
            return None
        memory = self.memory
        # The common case, in one frame: the in-process backend, a token bucket alone,
        # the route's own size (no tier override, no key tpm/rpm), keyed by route or
        # key, and the free size bound granted. Anything else (or a refusal) takes the
        # general path below, which decides the same way with a Grant.
        if memory is not None and policy.fast and (
                key is None or (key.tpm is None and key.rpm is None)) and (
                ctx.tier is None or ctx.tier not in policy.tiers):
            limits = policy.limits
            name = policy.route_bucket if ctx.key_id is None or policy.key == "route" \
                else f"{policy.route_bucket}|k:{ctx.key_id}"
            cost = len(req.body) // BYTES_PER_TOKEN_BOUND + 1
            if not policy.embeddings:
                cost += completion_reserve(body, policy.reserve)
            wait, remaining, reset = memory.reserve_tokens(name, limits, cost, self.clock())
            if wait == 0.0:
                ctx.rate_headers = ((LIMIT_TOKENS, limits.header_value),
                                    (REMAINING_TOKENS, b"%d" % remaining),
                                    # duration()'s first case, without the call
                                    (RESET_TOKENS, b"%dms" % math.ceil(reset * 1000)
                                     if reset < 1.0 else duration(reset)))
                if cost:
                    ctx.bucket, ctx.bucket_limits, ctx.reserved = name, limits, cost
                return None
        name, limits = self._bucket(policy, req, ctx, client)
        cost = self.bound(req, body, route, policy)
        result = self.backend.reserve(name, limits, cost, self.clock())
        if not isinstance(result, Grant):
            return self._await(result, req, body, ctx, route, policy, name, limits, cost)
        if not result.ok:  # the cheap bound did not fit: try the counted estimate
            exact = self.estimate(req, body, ctx, route, policy)
            if exact < cost:
                cost = exact
                second = self.backend.reserve(name, limits, cost, self.clock())
                if not isinstance(second, Grant):
                    return self._await(second, req, body, ctx, route, policy, name, limits,
                                       cost, counted=True)
                result = second
        self._apply(ctx, policy, result, name, limits, cost)
        return None

    async def _await(self, pending: Awaitable[Grant], req: ParsedRequest,
                     body: dict[str, Any], ctx: RequestContext, route: Route,
                     policy: LimitPolicy, name: str, limits: Limits, cost: int,
                     counted: bool = False) -> None:
        grant = await pending
        if not grant.ok and not counted:
            exact = self.estimate(req, body, ctx, route, policy)
            if exact < cost:
                cost = exact
                result = self.backend.reserve(name, limits, cost, self.clock())
                grant = result if isinstance(result, Grant) else await result
        self._apply(ctx, policy, grant, name, limits, cost)

    def _check_budget(self, key: Any) -> None:
        assert self.spend is not None
        period = key.budget_period or "month"
        spent = self.spend.spent(key.id, period, time.time())
        if spent >= key.budget_usd:
            reset = period_start_ms("day" if period == "day" else "month",
                                    time.time()) / 1000
            raise QuotaExceeded(
                f"API key {key.id} has spent {_usd(spent)} of its {_usd(key.budget_usd)} "
                f"{'daily' if period == 'day' else 'monthly'} budget",
                (retry_after(_next_period(period, reset) - time.time()),))

    def settle(self, ctx: RequestContext) -> None:
        name = ctx.bucket
        if name is None:
            return
        ctx.bucket = None  # once, whatever calls it again
        u = ctx.usage
        used = 0  # nothing the provider may have billed: the reservation goes back
        if u is not None:
            used = u.total_tokens if u.total_tokens is not None else (
                (u.prompt_tokens or 0) + (u.completion_tokens or 0))
        delta = used - ctx.reserved
        if delta:
            self.backend.settle(name, ctx.bucket_limits, delta, self.clock())

    def close(self) -> None:
        self.backend.close()

    # -- the pieces ---------------------------------------------------------------------
    def _apply(self, ctx: RequestContext, policy: LimitPolicy, grant: Grant, name: str,
               limits: Limits, cost: int) -> None:
        if not grant.held:
            # A remote backend that failed open: nothing is held and its figures mean
            # nothing, so no headers; settlement charges the whole usage (if the backend
            # is back by then).
            ctx.bucket, ctx.bucket_limits, ctx.reserved = name, limits, 0
            return
        headers = rate_headers(grant)
        if not grant.ok:
            raise RateLimited(
                f"rate limit reached on {policy.route} for {_whom(policy, ctx)}: "
                f"{grant.limit_tokens} tokens per {limits.period:g}s, this request needs "
                f"~{cost}, {grant.remaining_tokens} remain; retry in "
                f"{grant.retry_after:.1f}s", (*headers, retry_after(grant.retry_after)))
        ctx.rate_headers = headers
        if cost:
            ctx.bucket, ctx.bucket_limits, ctx.reserved = name, limits, cost

    @staticmethod
    def _bucket(policy: LimitPolicy, req: ParsedRequest, ctx: RequestContext,
                client: ClientSide) -> tuple[str, Limits]:
        key = ctx.api_key
        limits, own = policy.limits_for(ctx.tier, getattr(key, "tpm", None),
                                        getattr(key, "rpm", None))
        kind = policy.key
        if own:  # the key's own tpm/rpm: one bucket for the key, across routes
            return "k:" + str(ctx.key_id), limits
        if kind == "route" or (kind == "api_key" and ctx.key_id is None):
            return "r:" + policy.route, limits
        if kind == "api_key":
            return f"r:{policy.route}|k:{ctx.key_id}", limits
        if kind == "client_ip":
            return f"r:{policy.route}|ip:{client.peer_ip or _NO_PEER}", limits
        header = kind[7:].encode()
        value = next((v for n, v in req.headers if n == header), b"")
        return f"r:{policy.route}|h:{value.decode('latin-1') or _NO_PEER}", limits

    @staticmethod
    def bound(req: ParsedRequest, body: dict[str, Any], route: Route,
              policy: LimitPolicy) -> int:
        """The free first try: the body's size bounds its prompt tokens."""
        prompt = len(req.body) // BYTES_PER_TOKEN_BOUND + 1
        if policy.embeddings:
            return prompt
        return prompt + completion_reserve(body, policy.reserve)

    def estimate(self, req: ParsedRequest, body: dict[str, Any], ctx: RequestContext,
                 route: Route, policy: LimitPolicy) -> int:
        """Tokens to hold: the prompt, counted, plus the most the completion may take."""
        path = route.table.route.path
        if len(req.body) > EXACT_ESTIMATE_MAX_BYTES:
            prompt = len(req.body) // BYTES_PER_TOKEN_BOUND
        else:
            prompt, _ = self.tokenizer.count_prompt(body, route.table.route.format, path,
                                                    ctx.model)
        if path.endswith("/embeddings"):
            return prompt
        return prompt + completion_reserve(body, policy.reserve)


def _next_period(period: str, start_s: float) -> float:
    """The start of the day or month after the one starting at ``start_s``."""
    if period == "day":
        return start_s + 86_400
    t = time.gmtime(start_s)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def _usd(amount: float) -> str:
    """Cents for ordinary sums; small ones keep their significant digits ($0.00 would
    tell a user with a $0.001 budget nothing)."""
    return f"${amount:.2f}" if amount >= 0.01 or amount == 0 else f"${amount:.3g}"


def _whom(policy: LimitPolicy, ctx: RequestContext) -> str:
    if ctx.key_id is not None and policy.key == "api_key":
        return f"key {ctx.key_id}"
    return "this route" if policy.key == "route" else policy.key.replace("_", " ")
