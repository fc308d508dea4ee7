"""The upstream registry: one connection pool per named upstream of a config.

Built with a runtime snapshot. A reload builds a new registry and keeps the pools
of upstreams it did not change (same upstream config, same timeouts), so their
warm keep-alive connections survive it; the pools it dropped are retired: their
idle connections close at once and their streaming ones when the stream ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from sidecar.config import TimeoutsConfig, UpstreamConfig
from sidecar.upstream import UpstreamPool


class UpstreamRegistry:
    __slots__ = ("pools",)

    def __init__(self, pools: dict[str, UpstreamPool]) -> None:
        # Read by name on every request: the dict itself, not a method around it.
        self.pools: Mapping[str, UpstreamPool] = pools

    @classmethod
    def build(cls, upstreams: Iterable[UpstreamConfig], timeouts: TimeoutsConfig,
              previous: UpstreamRegistry | None = None) -> UpstreamRegistry:
        pools: dict[str, UpstreamPool] = {}
        for cfg in upstreams:
            if cfg.name in pools:
                continue
            old = previous.pools.get(cfg.name) if previous is not None else None
            if old is not None and not old.retired and old.cfg == cfg \
                    and old.timeouts == timeouts:
                pools[cfg.name] = old
            else:
                pools[cfg.name] = UpstreamPool(cfg, timeouts)
        return cls(pools)

    def __iter__(self) -> Iterator[UpstreamPool]:
        return iter(self.pools.values())

    def __len__(self) -> int:
        return len(self.pools)

    def retire_except(self, kept: UpstreamRegistry) -> None:
        """Retire every pool of this registry that ``kept`` does not carry on."""
        keep = {id(pool) for pool in kept}
        for pool in self:
            if id(pool) not in keep:
                pool.retire()

    def close(self) -> None:
        for pool in self:
            pool.close()
