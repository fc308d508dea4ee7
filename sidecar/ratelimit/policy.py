"""A route's token limiter, from its ``token_limiter`` middleware entry (pure).

Which bucket a request draws from (``key``: the API key, the route, the client
address, or a header's value), how big that bucket is (the entry's ``limit`` per
``period``, replaced by the tier's override, replaced by the key's own ``tpm`` /
``rpm``), and how much a request reserves at admission (its prompt counted with
tiktoken plus its ``max_tokens``, or the entry's ``reserve`` when it names none).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from sidecar.config import MiddlewareConfig, RouteConfig

# A reservation is first tried with a bound from the body's size, which costs
# nothing: at most one token per BYTES_PER_TOKEN_BOUND bytes of request JSON (English
# runs ~4 bytes a token, and the JSON around the text adds more bytes). Only when that
# bound is refused is the prompt counted with tiktoken (~6 us and ~30k instructions for
# a short chat on the loop) and the smaller, exact estimate tried: far from its limit a
# bucket grants the bound, and settlement replaces either with the reported usage.
BYTES_PER_TOKEN_BOUND: Final = 2
# Above this many body bytes the prompt is never counted on the loop; the bound stands.
EXACT_ESTIMATE_MAX_BYTES: Final = 32 * 1024
# Body fields that cap a response's length, by API.
_MAX_TOKEN_FIELDS: Final = ("max_tokens", "max_completion_tokens", "max_output_tokens")
KEY_PERIOD_S: Final = 60.0  # a key's own tpm / rpm are per minute


@dataclass(frozen=True, slots=True)
class Limits:
    """One bucket pair's size: ``tokens`` (and ``requests``) per ``period`` seconds."""

    tokens: int
    period: float
    requests: int | None = None
    # x-ratelimit-limit-tokens, formatted once: every admitted response carries it.
    header_value: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "header_value", b"%d" % self.tokens)


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    route: str
    key: str  # api_key | route | client_ip | header:NAME
    limits: Limits
    reserve: int
    tiers: Mapping[str, Limits] = field(default_factory=dict)
    embeddings: bool = False  # no completion to reserve for
    # Bucket names, built once: "r:<route>" is this route's own bucket and the
    # prefix of the per-identity ones.
    route_bucket: str = field(init=False, repr=False, compare=False)
    # Whether the limiter's one-frame path may serve it: keyed by route or API key, a
    # token bucket alone (the rest: client_ip, header:NAME, a request count).
    fast: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "route_bucket", "r:" + self.route)
        object.__setattr__(self, "fast", self.key in ("route", "api_key")
                           and self.limits.requests is None)

    @classmethod
    def of(cls, route: RouteConfig) -> LimitPolicy | None:
        entry = next((m for m in route.middleware if m.type == "token_limiter"), None)
        return None if entry is None else cls.from_entry(route, entry)

    @classmethod
    def from_entry(cls, route: RouteConfig, entry: MiddlewareConfig) -> LimitPolicy:
        c: dict[str, Any] = entry.config
        period = float(c["period"])
        key = c.get("key") or ("api_key" if route.identity == "api_key" else "route")
        tiers = {name: Limits(t["limit"], period, t.get("requests"))
                 for name, t in (c.get("tiers") or {}).items()}
        return cls(route=route.path, key=key,
                   limits=Limits(int(c["limit"]), period, c.get("requests")),
                   reserve=int(c.get("reserve", 256)), tiers=tiers,
                   embeddings=route.path.endswith("/embeddings"))

    def limits_for(self, tier: str | None, key_tpm: int | None,
                   key_rpm: int | None) -> tuple[Limits, bool]:
        """The bucket size for this identity, and whether it is the key's own (per key,
        across routes) rather than this route's."""
        if key_tpm is not None or key_rpm is not None:
            base = self.tiers.get(tier or "", self.limits)
            tokens = key_tpm if key_tpm is not None else round(
                base.tokens * KEY_PERIOD_S / base.period)
            return Limits(tokens, KEY_PERIOD_S, key_rpm), True
        if tier is not None and tier in self.tiers:
            return self.tiers[tier], False
        return self.limits, False


def completion_reserve(body: Mapping[str, Any], default: int) -> int:
    # Most requests name none of them: three membership tests, no loop.
    if "max_tokens" not in body and "max_completion_tokens" not in body \
            and "max_output_tokens" not in body:
        return default
    for name in _MAX_TOKEN_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return default
