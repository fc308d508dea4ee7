"""Token limits over real loopback sockets, on the in-process backend: the seed's
``token_limiter {limit, period}`` shape enforced exactly, reservations settled with
the reported usage, and OpenAI's rate-limit headers."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from conftest import Stack
from e2e_helpers import (
    ClientConn,
    assert_openai_error,
    chat_body,
    concurrent_posts,
    request_bytes,
    stream_body,
    token_limited,
)

PATH = "/v1/chat/completions"


limited = token_limited


def test_concurrent_streams_cannot_overdraw_a_1000_token_minute(
        stack_factory: Callable[..., Stack]) -> None:
    stack = stack_factory(limited(1000, 60.0), chunks=20, delay_ms=20)
    # 30 streams in flight at once, ~100 tokens each
    responses = concurrent_posts([stack.port] * 30, PATH, stream_body(90))
    ok = [r for r in responses if r.status == 200]
    refused = [r for r in responses if r.status == 429]
    assert ok and refused and len(ok) + len(refused) == 30
    reservation = 1000 - int(ok[0].header("x-ratelimit-remaining-tokens") or 0)
    for r in refused:
        err = assert_openai_error(r, 429, "rate_limit_exceeded")
        assert "1000 tokens per 60s" in err["message"]
        wait = int(r.header("retry-after") or 0)
        # The bucket refills 1000/60 tokens a second: a refused request fits again
        # after (its cost - what remains) / rate seconds. Its cost is the counted
        # estimate (prompt + max_tokens 90), at most the size bound the served ones held.
        remaining = int(r.header("x-ratelimit-remaining-tokens") or 0)
        low = max(1, -(-(90 - remaining) * 60 // 1000))
        high = max(1, -(-(reservation - remaining) * 60 // 1000))
        assert low <= wait <= high, (wait, remaining, reservation)
        assert r.header("x-ratelimit-limit-tokens") == "1000"
    stack.stop()
    rows = stack.rows()
    served = [row for row in rows if row["outcome"] == "ok"]
    assert len(served) == len(ok)
    used = sum(row["total_tokens"] for row in served)
    assert used <= 1000 + reservation, (used, reservation)
    limited_rows = [row for row in rows if row["status"] == 429]
    assert len(limited_rows) == len(refused)
    assert all(row["attempts"] == 0 for row in limited_rows)  # never reached the provider


def test_a_refused_request_fits_after_its_retry_after(
        stack_factory: Callable[..., Stack]) -> None:
    stack = stack_factory(limited(300, 3.0))  # 100 tokens a second
    with ClientConn(stack.port) as c:
        statuses = []
        for _ in range(6):
            c.send(request_bytes("POST", PATH, {**chat_body(), "max_tokens": 100}))
            resp = c.read_response()
            statuses.append(resp.status)
            if resp.status == 429:
                break
        assert statuses[-1] == 429 and 200 in statuses
        wait = int(resp.header("retry-after") or 0)
        assert 1 <= wait <= 2
        time.sleep(wait)
        c.send(request_bytes("POST", PATH, {**chat_body(), "max_tokens": 100}))
        assert c.read_response().status == 200


def test_a_refund_shows_in_the_next_responses_remaining_tokens(
        stack_factory: Callable[..., Stack]) -> None:
    stack = stack_factory(limited(100_000, 60.0))
    with ClientConn(stack.port) as c:
        remaining = []
        for _ in range(2):  # reserves ~500, the mock reports far fewer
            c.send(request_bytes("POST", PATH, stream_body(500)))
            resp = c.read_response()
            assert resp.status == 200
            remaining.append(int(resp.header("x-ratelimit-remaining-tokens") or 0))
            for name in ("limit", "remaining", "reset"):
                assert resp.header(f"x-ratelimit-{name}-tokens"), name
    stack.stop()
    first = stack.rows()[0]
    reservation = 100_000 - remaining[0]
    assert first["total_tokens"] < reservation - 300
    # Without settlement the second would see remaining[0] - reservation; with it the
    # first request holds only what it used (plus a few tokens of refill).
    expected = remaining[0] - first["total_tokens"]
    assert expected - 2 <= remaining[1] <= expected + 20, (remaining, first["total_tokens"])


@pytest.mark.parametrize("requests_limit", [2])
def test_a_request_count_limit_beside_the_token_limit(
        stack_factory: Callable[..., Stack], requests_limit: int) -> None:
    stack = stack_factory(limited(1_000_000, 60.0, requests=requests_limit))
    with ClientConn(stack.port) as c:
        got = []
        for _ in range(requests_limit + 1):
            c.send(request_bytes("POST", PATH, chat_body()))
            got.append(c.read_response())
    assert [r.status for r in got] == [200] * requests_limit + [429]
    assert got[0].header("x-ratelimit-limit-requests") == str(requests_limit)
    assert got[0].header("x-ratelimit-remaining-requests") == str(requests_limit - 1)
    assert got[-1].header("x-ratelimit-remaining-requests") == "0"
