"""Active health checks and /readyz over real loopback sockets: mock providers, the
sidecar, raw clients and the meter DB."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Coroutine
from typing import Any

from e2e_helpers import ClientConn, Response, chat_body, edit_upstreams, request_bytes
from test_failover_e2e import PATH, TwoMocks, two_mocks  # noqa: F401

from sidecar.config import Config, HealthCheckConfig, RouteConfig, UpstreamConfig
from sidecar.health_check import TASK_PREFIX
from sidecar.mock import MockUpstream

SECRET = "sk-health-check-must-not-see-this-7777"
# Short enough for a quick test, with room for a loaded box to answer a passing check.
FAST = HealthCheckConfig(path="/health", interval=0.2, timeout=0.18)


def _checked(*names: str, check: HealthCheckConfig = FAST) -> Callable[[Config], Config]:
    """A config_edit giving the named upstreams an active check (and an api key)."""
    def one(up: UpstreamConfig) -> UpstreamConfig:
        if up.name not in names:
            return up
        return dataclasses.replace(up, health_check=check, api_key=SECRET)
    return edit_upstreams(one)


def _on_loop(stack: Any, coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, stack.loop).result(10)


def _get(port: int, path: str) -> Response:
    with ClientConn(port) as c:
        c.send(request_bytes("GET", path))
        return c.read_response()


def _post(port: int) -> Response:
    with ClientConn(port) as c:
        c.send(request_bytes("POST", PATH, chat_body()))
        return c.read_response()


def _readyz_until(port: int, cond: Callable[[Response], bool], timeout: float = 5.0) -> Response:
    deadline = time.monotonic() + timeout
    while True:
        r = _get(port, "/readyz")
        if cond(r):
            return r
        assert time.monotonic() < deadline, (r.status, r.body)
        time.sleep(0.03)


def _state(r: Response, name: str, route: str = PATH) -> str:
    return str(r.json["routes"][route]["upstreams"][name])


def _posts(mock: MockUpstream) -> int:
    return sum(1 for q in mock.requests if q.method == "POST")


def _check_task_names(stack: Any) -> list[str]:
    return sorted(stack.call(lambda: [t.get_name() for t in asyncio.all_tasks()
                                      if t.get_name().startswith(TASK_PREFIX)]))


def test_a_failing_check_takes_the_primary_out_before_a_request_fails_and_a_pass_restores_it(
        two_mocks: Callable[..., TwoMocks]) -> None:  # noqa: F811
    stack = two_mocks(edit=_checked("primary"))
    r = _readyz_until(stack.port, lambda r: any(q.path == "/health"
                                                for q in stack.primary.requests))
    assert r.status == 200 and _state(r, "primary") == "healthy"
    first = _post(stack.port)
    assert first.status == 200 and first.header("x-sidecar-upstream") == "primary"

    port = stack.primary.port
    _on_loop(stack, stack.primary.stop())  # the primary goes away
    r = _readyz_until(stack.port, lambda r: _state(r, "primary") == "check_failing")
    assert r.status == 200 and r.json["status"] == "ok"  # the secondary still serves
    assert _state(r, "secondary") == "healthy"
    for _ in range(3):  # out of rotation: no request tries it first and fails
        resp = _post(stack.port)
        assert resp.status == 200 and resp.header("x-sidecar-upstream") == "secondary"
        assert resp.header("x-sidecar-attempts") == "1"

    back = MockUpstream(host="127.0.0.1", port=port)
    _on_loop(stack, back.start())
    stack.primary = back  # stopped with the stack
    r = _readyz_until(stack.port, lambda r: _state(r, "primary") == "healthy")
    resp = _post(stack.port)
    assert resp.status == 200 and resp.header("x-sidecar-upstream") == "primary"
    assert _posts(back) == 1
    heads = [q.head for q in back.requests if q.path == "/health"]
    assert heads and all(SECRET.encode() not in h for h in heads)

    stack.stop()
    rows = stack.rows()
    assert [r["upstream"] for r in rows] == ["primary"] + ["secondary"] * 3 + ["primary"]
    assert all(r["attempts"] == 1 and r["failed_attempts"] is None for r in rows)


def test_readyz_is_503_naming_the_only_upstream_while_its_check_fails(
        stack_factory: Any) -> None:
    stack = stack_factory(config_edit=_checked(
        "mock-openai", check=dataclasses.replace(FAST, path="/nope")))
    r = _readyz_until(stack.port, lambda r: r.status == 503)
    body = r.json
    assert body["status"] == "unready"
    assert body["routes"][PATH] == {"ready": False, "upstreams": {"mock-openai": "check_failing"}}
    assert body["routes"]["/v1/messages"] == {"ready": True,
                                              "upstreams": {"mock-anthropic": "healthy"}}
    assert (r.header("content-type") or "").startswith("application/json")
    assert SECRET.encode() not in r.body and b"127.0.0.1" not in r.body
    assert _get(stack.port, "/healthz").status == 200  # liveness is not readiness
    checks = [q for q in stack.mock.requests if q.path == "/nope"]
    assert checks and all(q.method == "GET" and q.status == 404 for q in checks)
    assert all(SECRET.encode() not in q.head for q in checks)
    assert _posts(stack.mock) == 0


def test_a_reload_that_drops_an_upstream_stops_its_check(
        two_mocks: Callable[..., TwoMocks]) -> None:  # noqa: F811
    stack = two_mocks(edit=_checked("primary", "secondary"))
    proxy = stack.server.proxy
    assert _check_task_names(stack) == [TASK_PREFIX + "primary", TASK_PREFIX + "secondary"]
    kept = proxy.runtime.upstreams.pools["secondary"]
    kept_task = proxy.health_checks.tasks[kept]
    dropped_task = proxy.health_checks.tasks[proxy.runtime.upstreams.pools["primary"]]

    route = proxy.config.routes[0]
    only_secondary = dataclasses.replace(
        proxy.config, routes=(RouteConfig(PATH, route.upstreams[1:], strategy="priority"),))
    stack.call(lambda: proxy.swap(only_secondary))
    deadline = time.monotonic() + 3
    while not dropped_task.done():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert dropped_task.cancelled()
    assert _check_task_names(stack) == [TASK_PREFIX + "secondary"]  # nothing leaked
    assert proxy.health_checks.tasks == {kept: kept_task}  # the kept pool kept its check
    checked = len(stack.primary.requests)
    time.sleep(0.5)  # over two intervals: the dropped upstream is checked no more
    assert len(stack.primary.requests) == checked
    r = _get(stack.port, "/readyz")
    assert r.status == 200 and r.json["routes"] == {
        PATH: {"ready": True, "upstreams": {"secondary": "healthy"}}}
