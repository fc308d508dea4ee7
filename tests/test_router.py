from __future__ import annotations

from collections import Counter

from sidecar.config import RouteConfig, RouteUpstream, UpstreamConfig
from sidecar.router import RouteTable


def _up(name: str) -> UpstreamConfig:
    return UpstreamConfig(name=name, url=f"http://{name}", scheme="http", host=name, port=80)


def test_weights_split_traffic_in_proportion() -> None:
    route = RouteConfig(path="/v1/chat/completions", upstreams=(
        RouteUpstream(_up("a"), 50), RouteUpstream(_up("b"), 25), RouteUpstream(_up("c"), 25)))
    table = RouteTable.build(route)
    counts = Counter(table.choose(i / 1000).name for i in range(1000))
    assert counts == {"a": 500, "b": 250, "c": 250}


def test_zero_weight_upstream_never_chosen() -> None:
    route = RouteConfig(path="/x", upstreams=(RouteUpstream(_up("a"), 0), RouteUpstream(_up("b"), 1)))
    table = RouteTable.build(route)
    assert {table.choose(i / 100).name for i in range(100)} == {"b"}
