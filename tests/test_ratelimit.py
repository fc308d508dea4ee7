"""The limiter's pure cores: bucket arithmetic, the policy's sizes, OpenAI's headers."""

from __future__ import annotations

import pytest

from sidecar.config import MiddlewareConfig, RouteConfig
from sidecar.ratelimit.bucket import Bucket, reserve
from sidecar.ratelimit.headers import duration, rate_headers
from sidecar.ratelimit.memory import MemoryBackend
from sidecar.ratelimit.policy import LimitPolicy, Limits, completion_reserve


def test_a_grant_needs_the_whole_cost_and_the_wait_is_exact() -> None:
    b = Bucket.full(1000, 60.0, now=0.0)
    assert reserve(b, None, 600, 0.0).ok
    g = reserve(b, None, 600, 0.0)  # 400 left: 200 short at 1000/60 per second
    assert not g.ok and g.retry_after == pytest.approx(12.0)
    assert g.remaining_tokens == 400 and g.reset_tokens == pytest.approx(36.0)
    assert reserve(b, None, 600, 12.0).ok  # exactly when the wait said


def test_a_cost_above_capacity_runs_once_the_bucket_is_full() -> None:
    b = Bucket.full(100, 10.0, now=0.0)
    assert reserve(b, None, 5000, 0.0).ok and b.level == 0
    assert not reserve(b, None, 5000, 5.0).ok
    assert reserve(b, None, 5000, 10.0).ok


def test_settlement_refunds_charges_and_never_exceeds_capacity() -> None:
    b = Bucket.full(1000, 60.0, now=0.0)
    reserve(b, None, 500, 0.0)
    b.adjust(-400, 0.0)  # used 100 of 500
    assert b.level == 900
    b.adjust(-5000, 0.0)
    assert b.level == 1000
    b.adjust(1500, 0.0)  # used far more than reserved: a debt paid back by refill
    assert b.level == -500 and b.remaining() == 0


def test_tokens_and_requests_are_reserved_both_or_neither() -> None:
    tokens, requests = Bucket.full(1000, 60.0, 0.0), Bucket.full(1, 60.0, 0.0)
    assert reserve(tokens, requests, 10, 0.0).ok
    g = reserve(tokens, requests, 10, 0.0)
    assert not g.ok and tokens.level == 990 and g.retry_after == pytest.approx(60.0)
    assert g.limit_requests == 1 and g.remaining_requests == 0


def test_openai_duration_spelling_and_headers() -> None:
    assert [duration(x) for x in (0.02, 1.0, 59.2, 360.0, 3725.0)] == [
        b"20ms", b"1s", b"1m0s", b"6m0s", b"1h2m5s"]
    b = Bucket.full(1000, 60.0, 0.0)
    names = [n for n, _ in rate_headers(reserve(b, None, 10, 0.0))]
    assert names == [b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens",
                     b"x-ratelimit-reset-tokens"]


def _route(identity: str = "none", **config: object) -> RouteConfig:
    entry = MiddlewareConfig("token_limiter", {"limit": 1000, "period": 60.0, "requests": None,
                                               "key": None, "reserve": 256, "tiers": {},
                                               **config})
    return RouteConfig(path="/v1/chat/completions", upstreams=(), middleware=(entry,),
                       identity=identity)  # type: ignore[arg-type]


def test_policy_key_defaults_and_overrides() -> None:
    assert LimitPolicy.of(RouteConfig(path="/x", upstreams=())) is None
    route_wide = LimitPolicy.of(_route())
    keyed = LimitPolicy.of(_route("api_key", tiers={"pro": {"limit": 5000, "requests": 9}}))
    assert route_wide is not None and keyed is not None
    assert (route_wide.key, keyed.key) == ("route", "api_key")
    assert keyed.limits_for(None, None, None) == (Limits(1000, 60.0), False)
    assert keyed.limits_for("pro", None, None) == (Limits(5000, 60.0, 9), False)
    # A key's own tpm/rpm: its bucket, per minute, across routes.
    assert keyed.limits_for("pro", 42, None) == (Limits(42, 60.0, None), True)
    assert completion_reserve({"max_completion_tokens": 7}, 256) == 7
    assert completion_reserve({"max_tokens": True}, 256) == 256


def test_the_memory_backend_keeps_spend_across_a_limit_change_and_sweeps_idle() -> None:
    m = MemoryBackend()
    assert m.reserve("a", Limits(1000, 60.0), 900, 0.0).ok
    g = m.reserve("a", Limits(2000, 60.0), 900, 0.0)  # a reload doubled it
    assert g.ok and g.remaining_tokens == 200
    m.reserve("idle", Limits(10, 1.0), 1, 0.0)
    m._sweep(100.0)
    assert "idle" not in m._buckets and "a" not in m._buckets  # both refilled by now


# -- the admit fast path decides as the general path does ------------------------------

class _Delegating:
    """The in-process store behind another face: the Limiter then takes its general
    path (a Grant per reservation) instead of the one-frame fast path."""

    def __init__(self) -> None:
        self.inner = MemoryBackend()

    def reserve(self, name: str, limits: Limits, cost: int, now: float) -> object:
        return self.inner.reserve(name, limits, cost, now)

    def settle(self, name: str, limits: Limits, delta: int, now: float) -> None:
        self.inner.settle(name, limits, delta, now)

    def close(self) -> None:
        self.inner.close()


class _Tokenizer:
    """A counted prompt of 37 tokens, whatever the body (the exact estimate's path)."""

    def count_prompt(self, body: object, fmt: object, path: str,
                     model: object) -> tuple[int, None]:
        return 37, None


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _limited_route(key: str) -> object:
    from sidecar.config.load import parse_config_text
    from sidecar.runtime import Runtime

    cfg = parse_config_text(
        "routes:\n  - path: /v1/chat/completions\n"
        "    upstreams: [{ target: http://127.0.0.1:9 }]\n"
        "    middleware:\n      - type: token_limiter\n"
        f"        config: {{ limit: 2000, period: 1m, key: {key}, reserve: 100 }}\n")
    return Runtime.build(cfg).routes.get("/v1/chat/completions")


@pytest.mark.parametrize("key", ["route", "api_key"])
def test_fast_admission_matches_the_general_path_step_by_step(key: str) -> None:
    """Sequences of admissions, refusals and settlements over time: the fast path
    (MemoryBackend seen directly) and the general path (the same store behind another
    object) give the same headers, the same refusals and the same reservations."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from sidecar.context import RequestContext
    from sidecar.errors import RateLimited
    from sidecar.ratelimit.limiter import Limiter
    from sidecar.request_reader import ParsedRequest
    from sidecar.usage import Usage

    route = _limited_route(key)

    class _Client:
        peer_ip = "127.0.0.1"

    step = st.tuples(st.integers(0, 3000), st.one_of(st.none(), st.integers(0, 900)),
                     st.integers(0, 1500), st.floats(0, 20), st.sampled_from([None, "k1"]))

    @settings(max_examples=60, deadline=None)
    @given(st.lists(step, min_size=1, max_size=25))
    def run(steps: list[tuple[int, int | None, int, float, str | None]]) -> None:
        clocks = (_Clock(), _Clock())
        fast = Limiter(MemoryBackend(), _Tokenizer(),  # type: ignore[arg-type]
                       clock=clocks[0])
        general = Limiter(_Delegating(), _Tokenizer(),  # type: ignore[arg-type]
                          clock=clocks[1])
        assert fast.memory is not None and general.memory is None
        for size, max_tokens, used, dt, key_id in steps:
            body = {"model": "m", "messages": []}
            if max_tokens is not None:
                body["max_tokens"] = max_tokens
            seen = []
            for limiter, clock in zip((fast, general), clocks, strict=True):
                clock.now += dt
                req = ParsedRequest(b"POST", b"/v1/chat/completions", [], True, True,
                                    False, body=b"x" * size)
                ctx = RequestContext(request_id="", ts_ms=0, t_received=0.0, path="p",
                                     route="p", bytes_in=size)
                ctx.key_id = key_id
                try:
                    limiter.admit(req, body, ctx, route, _Client())  # type: ignore[arg-type]
                except RateLimited as exc:
                    seen.append(("429", str(exc), exc.headers))
                    continue
                seen.append(("ok", ctx.rate_headers, ctx.bucket, ctx.reserved))
                ctx.usage = Usage(used // 2, used - used // 2, used)
                limiter.settle(ctx)
            assert seen[0] == seen[1]

    run()
