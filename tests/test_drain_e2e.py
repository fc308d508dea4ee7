"""on_client_disconnect: drain over real loopback sockets: a client that hangs up mid-stream
still gets a row with the provider's own usage; the drain is capped in time and in number."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from e2e_helpers import recv_until, request_bytes

from sidecar.config import Config

SETTLE_S = 10.0  # bounds every wait below


def drain_config(drain_s: float | None = None, max_drains: int | None = None,
                 policy: str = "drain") -> Callable[[Config], Config]:
    def edit(config: Config) -> Config:
        routes = tuple(dataclasses.replace(r, on_client_disconnect=policy)
                       for r in config.routes)
        timeouts = config.timeouts if drain_s is None else dataclasses.replace(
            config.timeouts, drain=drain_s)
        limits = config.limits if max_drains is None else dataclasses.replace(
            config.limits, max_drains=max_drains)
        return dataclasses.replace(config, routes=routes, timeouts=timeouts, limits=limits)

    return edit


def body(include_usage: bool) -> dict[str, Any]:
    b: dict[str, Any] = {"model": "gpt-4o-mini", "stream": True,
                         "messages": [{"role": "user", "content": "Think hard, then answer."}]}
    if include_usage:
        b["stream_options"] = {"include_usage": True}
    return b


def open_and_hang_up(port: int, b: dict[str, Any], chunks: int, delay_ms: int) -> tuple[int, float]:
    """Start a stream, read its head and first event, hang up. (bytes read, close time)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=SETTLE_S)
    sock.sendall(request_bytes("POST", "/v1/chat/completions", b, headers=(
        (b"x-mock-chunks", b"%d" % chunks), (b"x-mock-delay-ms", b"%d" % delay_ms))))
    got = recv_until(sock, b"data: {")
    assert got.startswith(b"HTTP/1.1 200"), got[:100]
    sock.close()
    return len(got), time.monotonic()


def wait_for(pred: Callable[[], bool]) -> None:
    deadline = time.monotonic() + SETTLE_S
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def one_row(stack: Any) -> dict[str, Any]:
    wait_for(lambda: len(stack.rows()) == 1)
    (row,) = stack.rows()
    return row


@pytest.mark.parametrize("include_usage", [False, True], ids=["usage-injected", "client-asked"])
def test_a_client_leaving_a_drain_route_gets_the_providers_exact_usage(
        stack_factory: Any, include_usage: bool) -> None:
    stack = stack_factory(drain_config())
    n_read, t_close = open_and_hang_up(stack.port, body(include_usage), chunks=25, delay_ms=20)
    wait_for(lambda: bool(stack.mock.requests) and stack.mock.requests[0].completed)
    sent = stack.mock.requests[0]
    # The provider was read to its end: it finished (and billed) the whole answer.
    assert sent.usage_sent and sent.completion_tokens == 25 * 4
    row = one_row(stack)
    assert (row["outcome"], row["usage_source"], row["usage_approx"]) == (
        "client_disconnect", "reported", 0)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        sent.prompt_tokens, sent.completion_tokens)
    assert row["total_tokens"] == sent.prompt_tokens + sent.completion_tokens
    assert row["usage_raw"] is not None
    # What the client got, not what was drained.
    assert 0 < row["bytes_out"] <= n_read < sent.bytes_sent
    assert sent.connection.closed_at is None or sent.connection.closed_at >= t_close
    stack.stop()


def test_abort_is_the_default_and_cuts_the_provider_at_once(stack_factory: Any) -> None:
    stack = stack_factory()
    _, t_close = open_and_hang_up(stack.port, body(False), chunks=60, delay_ms=50)
    wait_for(lambda: stack.mock.requests[0].connection.closed_at is not None)
    sent = stack.mock.requests[0]
    assert sent.connection.closed_at is not None
    assert sent.connection.closed_at - t_close < 1.0 and not sent.completed
    row = one_row(stack)
    assert (row["outcome"], row["usage_source"]) == ("client_disconnect", "estimated")
    stack.stop()


def test_a_drain_past_timeouts_drain_is_cut_and_estimated(stack_factory: Any) -> None:
    stack = stack_factory(drain_config(drain_s=0.5))
    _, t_close = open_and_hang_up(stack.port, body(False), chunks=100, delay_ms=100)  # 10 s
    wait_for(lambda: stack.mock.requests[0].connection.closed_at is not None)
    sent = stack.mock.requests[0]
    assert sent.connection.closed_at is not None
    cut_after = sent.connection.closed_at - t_close
    # Cut by the sweeper (1 s resolution) after the 0.5 s cap, long before the 10 s end.
    assert 0.4 <= cut_after < 3.0, cut_after
    assert not sent.completed
    row = one_row(stack)
    assert (row["outcome"], row["usage_source"]) == ("client_disconnect", "estimated")
    assert "timeouts.drain" in (row["error"] or "")
    stack.stop()


def test_beyond_max_drains_a_disconnect_aborts(stack_factory: Any) -> None:
    stack = stack_factory(drain_config(max_drains=1))
    open_and_hang_up(stack.port, body(False), chunks=30, delay_ms=30)  # drains (~1 s)
    _, t_close = open_and_hang_up(stack.port, body(False), chunks=60, delay_ms=50)
    wait_for(lambda: len(stack.mock.requests) == 2
             and stack.mock.requests[1].connection.closed_at is not None)
    first, second = stack.mock.requests
    assert second.connection.closed_at is not None
    assert second.connection.closed_at - t_close < 1.0 and not second.completed
    wait_for(lambda: first.completed and len(stack.rows()) == 2)
    by_source = sorted((r["usage_source"], r["outcome"]) for r in stack.rows())
    assert by_source == [("estimated", "client_disconnect"), ("reported", "client_disconnect")]
    # The finished drain gave its place back: the next one drains again.
    open_and_hang_up(stack.port, body(False), chunks=10, delay_ms=30)
    wait_for(lambda: len(stack.rows()) == 3)
    assert stack.mock.requests[2].completed
    assert stack.rows()[2]["usage_source"] == "reported"
    stack.stop()
