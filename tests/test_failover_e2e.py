"""Failover before the first byte, over real loopback sockets: two fault-injecting
mock providers behind one route, the official openai SDK and raw clients in front,
the meter DB behind."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import orjson
import pytest
from conftest import Stack
from e2e_helpers import (
    ClientConn,
    assert_ends_with_stream_error,
    chat_body,
    closed_port,
    request_bytes,
)

from sidecar.config import Config, MeterConfig, RouteConfig, RouteUpstream, UpstreamConfig

PATH = "/v1/chat/completions"


def _up(name: str, port: int) -> UpstreamConfig:
    return UpstreamConfig(name=name, url=f"http://127.0.0.1:{port}", scheme="http",
                          host="127.0.0.1", port=port)


class TwoMocks(Stack):
    """A primary and a secondary mock provider behind one route (primary first)."""

    def __init__(self, tmp_path: pathlib.Path, primary: dict[str, Any],
                 secondary: dict[str, Any], primary_port: int | None,
                 edit: Callable[[Config], Config] | None) -> None:
        super().__init__(tmp_path, {}, edit)
        self._primary_kwargs = primary
        self._secondary_kwargs = secondary
        self._primary_port = primary_port  # a port of our own (e.g. nothing listening)

    async def _start_upstreams(self) -> Config:
        from sidecar.mock import MockUpstream

        self.primary = MockUpstream(host="127.0.0.1", port=0, **self._primary_kwargs)
        self.secondary = MockUpstream(host="127.0.0.1", port=0, **self._secondary_kwargs)
        self.mock = self.secondary
        if self._primary_port is None:
            await self.primary.start()
        await self.secondary.start()
        p_port = self._primary_port if self._primary_port is not None else self.primary.port
        route = RouteConfig(path=PATH, strategy="priority", upstreams=(
            RouteUpstream(_up("primary", p_port)),
            RouteUpstream(_up("secondary", self.secondary.port))))
        return Config(listen_host="127.0.0.1", listen_port=0, routes=(route,),
                      meter=MeterConfig(db=self.db), source="<test>")

    async def _stop_upstreams(self) -> None:
        if self._primary_port is None:
            await self.primary.stop()
        await self.secondary.stop()


@pytest.fixture
def two_mocks(tmp_path: pathlib.Path) -> Iterator[Callable[..., TwoMocks]]:
    made: list[TwoMocks] = []

    def make(primary: dict[str, Any] | None = None, secondary: dict[str, Any] | None = None,
             primary_port: int | None = None,
             edit: Callable[[Config], Config] | None = None) -> TwoMocks:
        s = TwoMocks(tmp_path, primary or {}, secondary or {}, primary_port, edit)
        s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def _post(port: int, body: dict[str, Any]) -> Any:
    with ClientConn(port) as c:
        c.send(request_bytes("POST", PATH, body))
        return c.read_response()


def test_429_with_retry_after_fails_over_and_cools_the_primary_down(
        two_mocks: Callable[..., TwoMocks]) -> None:
    stack = two_mocks(primary={"fault": "status:429", "retry_after": 2})
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="sk-test", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini", stream=True,
        messages=[{"role": "user", "content": "hello"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text and len(stack.primary.requests) == 1 and len(stack.secondary.requests) == 1

    t_cooled = time.monotonic()
    for _ in range(5):  # inside the 2 s cool-down: straight to the secondary
        resp = _post(stack.port, chat_body())
        assert resp.status == 200 and resp.header("x-sidecar-upstream") == "secondary"
        assert resp.header("x-sidecar-attempts") == "1"
    assert time.monotonic() - t_cooled < 1.8, "the box was too slow to test the cool-down"
    assert len(stack.primary.requests) == 1
    time.sleep(max(0.0, 2.1 - (time.monotonic() - t_cooled)))
    resp = _post(stack.port, chat_body())  # the cool-down is over: the primary again
    assert len(stack.primary.requests) == 2
    assert resp.status == 200 and resp.header("x-sidecar-attempts") == "2"

    stack.stop()
    rows = stack.rows()
    first = rows[0]
    assert first["upstream"] == "secondary" and first["attempts"] == 2
    assert first["outcome"] == "ok" and first["usage_source"] == "reported"
    assert orjson.loads(first["failed_attempts"]) == [{"upstream": "primary", "reason": "429"}]
    assert [r["attempts"] for r in rows[1:]] == [1] * 5 + [2]


def test_refused_connection_fails_over(two_mocks: Callable[..., TwoMocks]) -> None:
    stack = two_mocks(primary_port=closed_port())
    resp = _post(stack.port, chat_body(stream=True))
    assert resp.status == 200 and resp.complete
    assert resp.header("x-sidecar-upstream") == "secondary"
    stack.stop()
    (row,) = stack.rows()
    assert row["attempts"] == 2
    assert orjson.loads(row["failed_attempts"]) == [{"upstream": "primary", "reason": "connect"}]


def test_a_silent_primary_fails_over_after_the_first_byte_timeout(
        two_mocks: Callable[..., TwoMocks]) -> None:
    import dataclasses

    def short(config: Config) -> Config:
        return dataclasses.replace(
            config, timeouts=dataclasses.replace(config.timeouts, first_byte=0.4))

    stack = two_mocks(primary={"fault": "hang"}, edit=short)
    t0 = time.monotonic()
    resp = _post(stack.port, chat_body(stream=True))
    took = time.monotonic() - t0
    assert resp.status == 200 and resp.complete and resp.header("x-sidecar-attempts") == "2"
    assert 0.4 <= took < 3.0
    stack.stop()
    (row,) = stack.rows()
    assert orjson.loads(row["failed_attempts"]) == [
        {"upstream": "primary", "reason": "first_byte_timeout"}]


def test_a_reset_after_bytes_is_never_retried(two_mocks: Callable[..., TwoMocks]) -> None:
    stack = two_mocks(primary={"fault": "disconnect-after:3", "chunks": 20})
    resp = _post(stack.port, chat_body(stream=True))
    assert resp.status == 200  # one stream, ended by an error event, never a second one
    assert_ends_with_stream_error(resp)
    assert len(stack.secondary.requests) == 0
    stack.stop()
    (row,) = stack.rows()
    assert row["upstream"] == "primary" and row["attempts"] == 1
    assert row["outcome"] == "upstream_error" and row["usage_source"] == "estimated"


def test_the_retry_budget_bounds_provider_attempts_in_an_outage(
        two_mocks: Callable[..., TwoMocks]) -> None:
    stack = two_mocks(primary={"fault": "status:503", "retry_after": 0},
                      secondary={"fault": "status:503", "retry_after": 0})
    n = 200
    with ClientConn(stack.port) as c:
        for _ in range(n):
            c.send(request_bytes("POST", PATH, chat_body()))
            assert c.read_response().status == 503
    attempts = len(stack.primary.requests) + len(stack.secondary.requests)
    # 20% budget, plus its floor and one request's own attempts
    assert attempts <= int(1.2 * n) + 3 + 3, attempts
    assert attempts > n  # some did fail over


def test_a_status_left_out_of_retry_on_is_relayed_not_retried(
        two_mocks: Callable[..., TwoMocks]) -> None:
    import dataclasses

    def connect_only(config: Config) -> Config:
        route = dataclasses.replace(config.routes[0], retry_on=("connect",))
        return dataclasses.replace(config, routes=(route,))

    stack = two_mocks(primary={"fault": "status:429"}, edit=connect_only)
    resp = _post(stack.port, chat_body())
    assert resp.status == 429 and resp.header("x-sidecar-upstream") == "primary"
    assert len(stack.secondary.requests) == 0
    stack.stop()
    (row,) = stack.rows()
    assert row["outcome"] == "rate_limited" and row["attempts"] == 1
    assert row["failed_attempts"] is None
