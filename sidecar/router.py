"""Routing choice (pure): which upstream of a route serves this request.

Failover, health and model maps arrive later; they extend ``choose`` without
changing its callers.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate

from sidecar.config import RouteConfig, UpstreamConfig
from sidecar.endpoints import USAGE_OPT_IN, kind_for_path


@dataclass(frozen=True, slots=True)
class RouteTable:
    """A route with its cumulative weights precomputed once at start-up."""

    route: RouteConfig
    upstreams: tuple[UpstreamConfig, ...]
    cumulative: tuple[int, ...]
    # An OpenAI-format stream on this route reports usage only when asked for it.
    usage_opt_in: bool = False

    @classmethod
    def build(cls, route: RouteConfig) -> RouteTable:
        live = [ru for ru in route.upstreams if ru.weight > 0]
        return cls(
            route=route,
            upstreams=tuple(ru.upstream for ru in live),
            cumulative=tuple(accumulate(ru.weight for ru in live)),
            usage_opt_in=kind_for_path(route.path) in USAGE_OPT_IN,
        )

    def choose(self, r: float) -> UpstreamConfig:
        """Weighted pick; ``r`` is uniform in [0, 1) so tests can drive it directly."""
        if len(self.upstreams) == 1:
            return self.upstreams[0]
        point = r * self.cumulative[-1]
        return self.upstreams[bisect_right(self.cumulative, point)]
