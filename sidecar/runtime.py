"""The runtime snapshot: everything the hot path reads, built once from a Config.

Route tables (weights, usage opt-in), the upstream registry (connection pools),
limits and timeouts. A request takes the snapshot current when it arrives and
keeps what it took (its route table, its pool) to the end; a reload builds a new
snapshot and swaps it in with one assignment, so no request ever sees half of
one config and half of another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.config import Config, LimitsConfig, TimeoutsConfig
from sidecar.registry import UpstreamRegistry
from sidecar.router import RouteTable


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    routes: Mapping[str, RouteTable]
    upstreams: UpstreamRegistry
    limits: LimitsConfig
    timeouts: TimeoutsConfig

    @classmethod
    def build(cls, config: Config, previous: Runtime | None = None) -> Runtime:
        """A snapshot of ``config``; ``previous`` lends the pools of unchanged upstreams."""
        routes = {r.path: RouteTable.build(r) for r in config.routes}
        upstreams = UpstreamRegistry.build(
            (up for table in routes.values() for up in table.upstreams),
            config.timeouts,
            previous.upstreams if previous is not None else None,
        )
        return cls(config=config, routes=routes, upstreams=upstreams,
                   limits=config.limits, timeouts=config.timeouts)
