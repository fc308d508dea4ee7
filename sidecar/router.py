"""Routing choice (pure): which upstream of a route serves this attempt.

A :class:`Balancer` picks by the route's strategy among the upstreams that are
healthy (see ``health.py``) and not yet tried by this request:

* ``weighted``: smooth weighted round-robin (nginx's): deterministic, and no upstream
  gets two picks in a row more than its weight says;
* ``priority``: the first available in the configured order (ordered fallback);
* ``least_inflight``: the fewest attempts running now;
* ``latency``: the lowest EWMA of time to first byte (untried upstreams first).

Tried upstreams are a bit mask, so a failover costs no set per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Generic, TypeVar

from sidecar.config import RouteConfig, Strategy, UpstreamConfig
from sidecar.endpoints import USAGE_OPT_IN, kind_for_path
from sidecar.health import UpstreamHealth

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RouteTable:
    """A route with the upstreams that take traffic (weight > 0), fixed at start-up."""

    route: RouteConfig
    upstreams: tuple[UpstreamConfig, ...]
    weights: tuple[int, ...]
    # An OpenAI-format stream on this route reports usage only when asked for it.
    usage_opt_in: bool = False
    # Per upstream: the model name it is sent instead of the client's (None: as asked).
    renames: tuple[str | None, ...] = ()
    # Per upstream: it speaks the other format than the route's path, so its requests
    # and answers are translated (sidecar.translate).
    translate: tuple[bool, ...] = ()
    # The format the route's clients speak (its path's), read per translated request.
    format: str = "openai"

    @classmethod
    def build(cls, route: RouteConfig) -> RouteTable:
        live = [ru for ru in route.upstreams if ru.weight > 0]
        return cls(
            route=route,
            upstreams=tuple(ru.upstream for ru in live),
            weights=tuple(ru.weight for ru in live),
            usage_opt_in=kind_for_path(route.path) in USAGE_OPT_IN,
            renames=tuple(ru.model for ru in live),
            translate=tuple(ru.upstream.format != route.format for ru in live),
            format=route.format,
        )


class ModelMatch(Generic[T]):
    """Which of the routes sharing a path serves a requested model (pure).

    Routes are tried in file order; exact names are one dict lookup, globs
    (fnmatch) are tried only when no exact name matched, and the route with no
    ``model:`` (validation puts it last) catches the rest.
    """

    __slots__ = ("_exact", "_globs", "fallback")

    def __init__(self, routes: Sequence[tuple[tuple[str, ...], T]]) -> None:
        self._exact: dict[str, tuple[int, T]] = {}
        self._globs: list[tuple[int, str, T]] = []
        self.fallback: T | None = None
        for order, (patterns, target) in enumerate(routes):
            if not patterns:
                self.fallback = target
            for p in patterns:
                if any(c in p for c in "*?["):
                    self._globs.append((order, p, target))
                else:
                    self._exact.setdefault(p, (order, target))

    def pick(self, model: str | None) -> T | None:
        if model is None:
            return self.fallback
        exact = self._exact.get(model)
        # A glob in an earlier route wins over an exact name in a later one: file order.
        for order, pattern, target in self._globs:
            if exact is not None and order > exact[0]:
                break
            if fnmatchcase(model, pattern):
                return target
        return exact[1] if exact is not None else self.fallback


class Balancer:
    """The strategy's state for one route: ``pick`` returns an index into its upstreams."""

    __slots__ = ("_current", "strategy", "weights")

    def __init__(self, strategy: Strategy, weights: Sequence[int]) -> None:
        self.strategy = strategy
        self.weights = tuple(weights)
        self._current = [0] * len(self.weights)  # smooth weighted round-robin state

    def has_candidate(self, health: Sequence[UpstreamHealth], now: float, tried: int) -> bool:
        """Is some untried upstream available? (Asked before a retry spends budget.)"""
        weights = self.weights
        return any(weights[i] and not (tried >> i) & 1 and health[i].available(now)
                   for i in range(len(weights)))

    def pick(self, health: Sequence[UpstreamHealth], now: float, tried: int = 0) -> int | None:
        """The upstream for the next attempt, or None when none is available.

        ``tried`` has bit i set for each upstream this request has already tried.
        """
        weights = self.weights
        n = len(weights)
        if n == 1:  # the common single-upstream route: no strategy to run
            return 0 if not tried and health[0].available(now) else None
        strategy = self.strategy
        best = -1
        if strategy == "weighted":
            current = self._current
            total = 0
            for i in range(n):
                if (tried >> i) & 1 or not weights[i] or not health[i].available(now):
                    continue
                current[i] += weights[i]
                total += weights[i]
                if best < 0 or current[i] > current[best]:
                    best = i
            if best >= 0:
                current[best] -= total
        elif strategy == "priority":
            for i in range(n):
                if not (tried >> i) & 1 and weights[i] and health[i].available(now):
                    best = i
                    break
        else:
            least = 0.0
            for i in range(n):
                if (tried >> i) & 1 or not weights[i] or not health[i].available(now):
                    continue
                h = health[i]
                score = float(h.inflight) if strategy == "least_inflight" \
                    else (h.ewma_ttfb or 0.0)
                if best < 0 or score < least:
                    best, least = i, score
        return best if best >= 0 else None
