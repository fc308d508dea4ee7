"""The bucket store named by ``limits.backend``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sidecar.ratelimit.memory import MemoryBackend

if TYPE_CHECKING:
    from sidecar.config import LimitsConfig
    from sidecar.ratelimit.limiter import Backend


def limit_backend(limits: LimitsConfig) -> Backend:
    if limits.backend == "memory":
        return MemoryBackend()
    from sidecar.ratelimit.redis_backend import RedisBackend

    return RedisBackend(limits.backend, fail_open=limits.redis_failure == "open",
                        socket_timeout=limits.redis_timeout)
