"""The runtime snapshot: everything the hot path reads, built once from a Config.

Routes (weights, strategy state, retry budget, the pools and health of their
upstreams), limits and timeouts. A request takes the snapshot current when it
arrives and keeps what it took (its route, its pools) to the end; a reload builds
a new snapshot and swaps it in with one assignment, so no request ever sees half
of one config and half of another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from sidecar.config import (
    DEFAULT_TIERS,
    Config,
    Identity,
    LimitsConfig,
    RouteConfig,
    Strategy,
    TimeoutsConfig,
)
from sidecar.health import UpstreamHealth
from sidecar.pricing import PriceTable
from sidecar.ratelimit.policy import LimitPolicy
from sidecar.registry import UpstreamRegistry
from sidecar.retry import DEFAULT_RETRY_ON, RetryBudget, RetryReason
from sidecar.router import Balancer, ModelMatch, RouteTable
from sidecar.upstream import UpstreamPool


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """How a route chooses and fails over, from its config."""

    strategy: Strategy = "weighted"
    retry_on: frozenset[RetryReason] = DEFAULT_RETRY_ON
    max_attempts: int = 3
    retry_budget: float = 0.2

    @classmethod
    def of(cls, route: RouteConfig) -> RoutePolicy:
        retry_on = DEFAULT_RETRY_ON if route.retry_on is None \
            else frozenset(RetryReason(r) for r in route.retry_on)
        return cls(strategy=route.strategy, retry_on=retry_on,
                   max_attempts=route.max_attempts, retry_budget=route.retry_budget)


@dataclass(frozen=True, slots=True)
class Route:
    table: RouteTable
    pools: tuple[UpstreamPool, ...]  # aligned with table.upstreams
    health: tuple[UpstreamHealth, ...]  # each pool's own
    # Stand-ins that are always available: when every upstream is ejected or cooling,
    # the first attempt still goes somewhere (as Envoy's panic mode does) rather than
    # the route answering 503 on its own.
    panic: tuple[UpstreamHealth, ...]
    balancer: Balancer
    budget: RetryBudget
    policy: RoutePolicy
    can_fail_over: bool  # more than one upstream to try
    limit: LimitPolicy | None  # its token_limiter (sidecar.ratelimit), if any
    identity: Identity
    @classmethod
    def build(cls, route: RouteConfig, upstreams: UpstreamRegistry) -> Route:
        table = RouteTable.build(route)
        pools = tuple(upstreams.pools[up.name] for up in table.upstreams)
        policy = RoutePolicy.of(route)
        return cls(table=table, pools=pools, health=tuple(p.health for p in pools),
                   panic=tuple(UpstreamHealth(p.cfg.name) for p in pools),
                   balancer=Balancer(policy.strategy, table.weights),
                   budget=RetryBudget(policy.retry_budget), policy=policy,
                   can_fail_over=len(pools) > 1, limit=LimitPolicy.of(route),
                   identity=route.identity)


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    # The first route of each path: the one a request gets unless the path's routes
    # match by model, in which case ``by_model`` has the path's matcher.
    routes: Mapping[str, Route]
    by_model: Mapping[str, ModelMatch[Route]]
    upstreams: UpstreamRegistry
    limits: LimitsConfig
    timeouts: TimeoutsConfig
    # Peers whose x-sidecar-tier header is believed; the tiers by header value, their
    # queue rank (0 is served first), and the tier of everyone else (the last one).
    trusted: tuple[IPv4Network | IPv6Network, ...] = ()
    tier_names: Mapping[bytes, str] = field(default_factory=dict)
    tier_rank: Mapping[str, int] = field(default_factory=dict)
    default_tier: str = DEFAULT_TIERS[-1]
    # Every route in file order, model-matched ones included (readiness reports them).
    all_routes: tuple[Route, ...] = ()
    # What each meter row costs: the config's prices over the defaults (sidecar.pricing).
    prices: PriceTable = field(default_factory=lambda: PriceTable({}))

    @classmethod
    def build(cls, config: Config, previous: Runtime | None = None) -> Runtime:
        """A snapshot of ``config``; ``previous`` lends the pools of unchanged upstreams."""
        upstreams = UpstreamRegistry.build(
            (ru.upstream for r in config.routes for ru in r.upstreams if ru.weight > 0),
            config.timeouts,
            previous.upstreams if previous is not None else None,
        )
        routes: dict[str, Route] = {}
        per_path: dict[str, list[tuple[tuple[str, ...], Route]]] = {}
        every: list[Route] = []
        for r in config.routes:
            built = Route.build(r, upstreams)
            every.append(built)
            routes.setdefault(r.path, built)
            per_path.setdefault(r.path, []).append((r.models, built))
        by_model = {path: ModelMatch(choices) for path, choices in per_path.items()
                    if any(models for models, _ in choices)}
        tiers = config.tiers
        return cls(config=config, routes=routes, by_model=by_model, upstreams=upstreams,
                   limits=config.limits, timeouts=config.timeouts, all_routes=tuple(every),
                   trusted=tuple(ip_network(p) for p in config.trusted_peers),
                   tier_names={t.encode(): t for t in tiers},
                   tier_rank={t: i for i, t in enumerate(tiers)}, default_tier=tiers[-1],
                   prices=PriceTable.of(config.prices, defaults=config.prices_defaults))

    def trusts(self, host: str) -> bool:
        """Is ``host`` (a peer's IP address) one of the trusted peers?"""
        try:
            ip = ip_address(host.split("%", 1)[0])  # an IPv6 zone id is not part of it
        except ValueError:
            return False
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 on a dual-stack socket is 10.0.0.1
        return any(ip in net for net in self.trusted)

    def route_for_model(self, path: str, model: str | None) -> Route | None:
        """The route serving ``model`` on ``path``, a path whose routes match by model."""
        return self.by_model[path].pick(model)
