from __future__ import annotations

from collections import Counter

from sidecar.config import RouteConfig, RouteUpstream, UpstreamConfig
from sidecar.health import UpstreamHealth
from sidecar.router import Balancer, RouteTable


def _up(name: str) -> UpstreamConfig:
    return UpstreamConfig(name=name, url=f"http://{name}", scheme="http", host=name, port=80)


def _pick(table: RouteTable, b: Balancer) -> UpstreamConfig:
    """One weighted pick, as the proxy makes it (one balancer per route)."""
    i = b.pick([UpstreamHealth(u.name) for u in table.upstreams], 0.0)
    assert i is not None
    return table.upstreams[i]


def test_weights_split_traffic_in_proportion() -> None:
    route = RouteConfig(path="/v1/chat/completions", upstreams=(
        RouteUpstream(_up("a"), 50), RouteUpstream(_up("b"), 25), RouteUpstream(_up("c"), 25)))
    table = RouteTable.build(route)
    b = Balancer("weighted", table.weights)
    counts = Counter(_pick(table, b).name for _ in range(1000))
    assert counts == {"a": 500, "b": 250, "c": 250}


def test_zero_weight_upstream_never_chosen() -> None:
    route = RouteConfig(path="/x", upstreams=(RouteUpstream(_up("a"), 0), RouteUpstream(_up("b"), 1)))
    table = RouteTable.build(route)
    b = Balancer("weighted", table.weights)
    assert {_pick(table, b).name for _ in range(100)} == {"b"}
