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
    assert_openai_error,
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


def _with_routes(*routes: Callable[[UpstreamConfig, UpstreamConfig], RouteConfig]
                 ) -> Callable[[Config], Config]:
    """A config edit replacing the routes, each built from (primary, secondary)."""
    import dataclasses

    def edit(config: Config) -> Config:
        primary, secondary = (ru.upstream for ru in config.routes[0].upstreams)
        return dataclasses.replace(config, routes=tuple(r(primary, secondary) for r in routes))

    return edit


def test_weighted_50_50_over_1000_requests(two_mocks: Callable[..., TwoMocks]) -> None:
    stack = two_mocks(edit=_with_routes(lambda p, s: RouteConfig(
        path=PATH, strategy="weighted", upstreams=(RouteUpstream(p, 50), RouteUpstream(s, 50)))))
    served: dict[str, int] = {}
    with ClientConn(stack.port) as c:
        for _ in range(1000):
            c.send(request_bytes("POST", PATH, chat_body()))
            resp = c.read_response()
            assert resp.status == 200
            up = resp.header("x-sidecar-upstream") or ""
            served[up] = served.get(up, 0) + 1
    assert set(served) == {"primary", "secondary"}
    assert all(450 <= n <= 550 for n in served.values()), served
    assert (len(stack.primary.requests), len(stack.secondary.requests)) == (
        served["primary"], served["secondary"])


def test_model_matched_routes_and_a_renamed_model(two_mocks: Callable[..., TwoMocks]) -> None:
    stack = two_mocks(edit=_with_routes(
        lambda p, s: RouteConfig(path=PATH, models=("gpt-4o", "gpt-4o-*"),
                                 upstreams=(RouteUpstream(p, model="deepseek-chat"),)),
        lambda p, s: RouteConfig(path=PATH, upstreams=(RouteUpstream(s),)),
        lambda p, s: RouteConfig(path="/v1/embeddings", models=("text-embedding-3-*",),
                                 upstreams=(RouteUpstream(s),)),
    ))
    # Streamed, so the body gets both edits: the model renamed and usage asked for.
    for model, upstream in [("gpt-4o", "primary"), ("gpt-4o-2024-08-06", "primary"),
                            ("gpt-3.5-turbo", "secondary")]:
        resp = _post(stack.port, chat_body(model=model, stream=True))
        assert resp.status == 200 and resp.header("x-sidecar-upstream") == upstream, model
        assert not any(b'"usage"' in d for d in resp.sse_data())  # the client did not ask
    sent = [orjson.loads(r.body) for r in stack.primary.requests]
    assert [b["model"] for b in sent] == ["deepseek-chat", "deepseek-chat"]
    assert all(b["stream_options"] == {"include_usage": True} for b in sent)
    assert orjson.loads(stack.secondary.requests[0].body)["model"] == "gpt-3.5-turbo"
    # A path whose routes all match by model: another model is OpenAI's 404.
    with ClientConn(stack.port) as c:
        c.send(request_bytes("POST", "/v1/embeddings",
                             {"model": "ada-002", "input": "x"}))
        err = assert_openai_error(c.read_response(), 404, "model_not_found")
    assert "ada-002" in err["message"]
    stack.stop()
    rows = [r for r in stack.rows() if r["route"] == PATH]
    assert [(r["model"], r["upstream_model"], r["upstream"]) for r in rows] == [
        ("gpt-4o", "deepseek-chat", "primary"),
        ("gpt-4o-2024-08-06", "deepseek-chat", "primary"),
        ("gpt-3.5-turbo", None, "secondary")]
    assert all(r["usage_source"] == "reported" for r in rows)


@pytest.mark.parametrize("retry_on", [None, ("connect", "reset")])
def test_a_post_the_provider_read_on_a_reused_connection_is_never_sent_twice(
        two_mocks: Callable[..., TwoMocks], retry_on: tuple[str, ...] | None) -> None:
    import dataclasses

    def edit(config: Config) -> Config:
        return dataclasses.replace(config, routes=(
            dataclasses.replace(config.routes[0], retry_on=retry_on),))

    stack = two_mocks(edit=edit)
    with ClientConn(stack.port) as c:
        c.send(request_bytes("POST", PATH, chat_body()))
        assert c.read_response().header("x-sidecar-upstream") == "primary"  # now pooled
        # The provider reads the next POST on that kept-alive connection, then drops it
        # 100 ms later without a byte back: it may have started (and billed) it.
        stack.call(lambda: stack.primary.set_fault("close-after-read:100"))
        c.send(request_bytes("POST", PATH, chat_body(text="read then dropped")))
        resp = c.read_response()
    assert len(stack.primary.requests) == 2  # once each, never replayed on a fresh one
    assert stack.primary.requests[1].connection is stack.primary.requests[0].connection
    stack.stop()
    row = stack.rows()[1]
    if retry_on is None:  # reset is not in the default retry_on: a visible failure
        assert_openai_error(resp, 502)
        assert row["outcome"] == "upstream_error" and row["attempts"] == 1
        assert row["upstream"] == "primary" and row["error"]
    else:  # the route opted in: a counted failover to the other upstream
        assert resp.status == 200 and resp.header("x-sidecar-upstream") == "secondary"
        assert len(stack.secondary.requests) == 1 and row["attempts"] == 2
        assert orjson.loads(row["failed_attempts"]) == [
            {"upstream": "primary", "reason": "reset"}]
