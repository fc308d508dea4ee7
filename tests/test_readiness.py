"""The /readyz answer as a pure function of the runtime snapshot and the clock."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import orjson

from sidecar.config import Config, RouteConfig, RouteUpstream, UpstreamConfig
from sidecar.health import State
from sidecar.readiness import readiness
from sidecar.runtime import Runtime

CHAT = "/v1/chat/completions"


class FakeHealth:
    def __init__(self, state: State) -> None:
        self._state = state
        self.asked: list[float] = []

    def state(self, now: float) -> State:
        self.asked.append(now)
        return self._state


def _up(name: str, key: str | None = None) -> UpstreamConfig:
    return UpstreamConfig(name=name, url=f"https://{name}.internal", scheme="https",
                          host=f"{name}.internal", port=443, api_key=key)


def _route(path: str, states: dict[str, State], models: tuple[str, ...] = ()) -> Any:
    ups = tuple(_up(n) for n in states)
    return SimpleNamespace(
        table=SimpleNamespace(route=RouteConfig(path, tuple(RouteUpstream(u) for u in ups),
                                                models=models), upstreams=ups),
        health=tuple(FakeHealth(s) for s in states.values()))


def _ready(*routes: Any, now: float = 5.0, draining: bool = False) -> tuple[int, Any]:
    status, body = readiness(cast(Runtime, SimpleNamespace(all_routes=routes)), now, draining)
    return status, orjson.loads(body)


def test_ready_when_every_route_has_an_upstream_that_serves() -> None:
    chat = _route(CHAT, {"primary": State.HEALTHY, "secondary": State.EJECTED})
    msgs = _route("/v1/messages", {"claude": State.HALF_OPEN})
    status, body = _ready(chat, msgs, now=7.5)
    assert status == 200
    assert body == {"status": "ok", "routes": {
        CHAT: {"ready": True, "upstreams": {"primary": "healthy", "secondary": "ejected"}},
        "/v1/messages": {"ready": True, "upstreams": {"claude": "half_open"}}}}
    assert chat.health[0].asked == [7.5]  # the clock it was given


def test_one_route_with_nothing_to_serve_makes_it_unready_and_is_named() -> None:
    chat = _route(CHAT, {"primary": State.HEALTHY})
    msgs = _route("/v1/messages", {"a": State.CHECK_FAILING, "b": State.COOLING})
    status, body = _ready(chat, msgs)
    assert status == 503 and body["status"] == "unready"
    assert body["routes"]["/v1/messages"] == {
        "ready": False, "upstreams": {"a": "check_failing", "b": "cooling"}}
    assert body["routes"][CHAT]["ready"] is True


def test_a_probe_in_flight_still_counts_as_serving() -> None:
    assert _ready(_route(CHAT, {"only": State.PROBING}))[0] == 200


def test_draining_is_503_whatever_the_upstreams() -> None:
    status, body = _ready(_route(CHAT, {"primary": State.HEALTHY}), draining=True)
    assert status == 503 and body["status"] == "draining"
    assert body["routes"][CHAT]["upstreams"] == {"primary": "healthy"}


def test_model_routes_sharing_a_path_are_each_reported() -> None:
    gpt = _route(CHAT, {"openai": State.CHECK_FAILING}, models=("gpt-4o", "o1-*"))
    rest = _route(CHAT, {"vllm": State.HEALTHY})
    status, body = _ready(gpt, rest)
    assert status == 503
    assert body["routes"] == {
        f"{CHAT} [gpt-4o,o1-*]": {"ready": False, "models": ["gpt-4o", "o1-*"],
                                  "upstreams": {"openai": "check_failing"}},
        CHAT: {"ready": True, "upstreams": {"vllm": "healthy"}}}


def test_a_real_snapshot_reports_every_route_and_no_secret() -> None:
    key = "sk-live-do-not-print-4242"
    a, b = _up("a", key), _up("b", key)
    routes = (RouteConfig(CHAT, (RouteUpstream(a), RouteUpstream(b, weight=0)),
                          models=("gpt-*",)),
              RouteConfig(CHAT, (RouteUpstream(b),)))
    runtime = Runtime.build(Config(routes=routes, upstreams={"a": a, "b": b}))
    assert len(runtime.all_routes) == 2
    runtime.upstreams.pools["b"].health.check_failed(1.0)
    status, raw = readiness(runtime, 2.0)
    assert status == 503 and key.encode() not in raw and b"internal" not in raw
    assert orjson.loads(raw)["routes"] == {  # a standby (weight 0) upstream is not listed
        f"{CHAT} [gpt-*]": {"ready": True, "models": ["gpt-*"],
                            "upstreams": {"a": "healthy"}},
        CHAT: {"ready": False, "upstreams": {"b": "check_failing"}}}
