"""The price table: USD per million tokens by model, and the cost of one meter row.

Pure, no I/O. The proxy prices every row just before it goes to the meter, with
the table of the runtime snapshot the request started on (``Runtime.prices``).

Matching: a model's price is the entry of its exact name, else the entry of the
longest name that the model starts with followed by ``-``. So ``gpt-4o`` prices
``gpt-4o-2024-08-06``, while ``gpt-4o-mini-2024-07-18`` gets ``gpt-4o-mini`` (the
longer match) and ``gpt-4o2`` gets nothing. A family entry therefore prices every
dated or suffixed variant of it that has no entry of its own: a variant billed
differently needs its own entry (``gpt-4o-2024-05-13`` below). Names are matched
case-sensitively, as providers spell them. Lookups are cached per model string.

Cost of a row, with the normalised usage of ``sidecar.usage`` (cache tokens are
*subsets* of ``prompt_tokens`` in every format, Anthropic included)::

    uncached = max(0, prompt - cache_read - cache_write)
    cost = (uncached * input + cache_read * cached_read + cache_write * cached_write
            + completion * output) / 1_000_000

where a cache rate of None means "billed as input". Reasoning tokens are part of
``completion_tokens`` and billed as output, as the providers bill them. The result
is rounded to 1e-9 USD. Not modelled: batch, flex or priority tiers, Anthropic's
1-hour cache writes (2x input; all writes are priced at the 5-minute rate), long-
context surcharges (Sonnet 4 prompts over 200k tokens), and audio or image tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

__all__ = ["DEFAULT_PRICES", "Price", "PriceTable"]

PER_TOKENS: Final = 1_000_000  # prices are USD per this many tokens
COST_DIGITS: Final = 9  # a row's cost is rounded to 1e-9 USD
# Distinct model strings whose lookups are remembered. Model names come from
# clients, so the cache is bounded: when full it is emptied and fills again.
CACHE_MAX: Final = 1024


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1,000,000 tokens. A cache rate of None: those tokens billed as input."""

    input: float
    output: float
    cached_read: float | None = None
    cached_write: float | None = None


_MISS: Final = object()


class PriceTable:
    """Model name -> Price, with prefix matching and a bounded lookup cache."""

    __slots__ = ("_cache", "_prices")

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices: dict[str, Price] = dict(prices)
        self._cache: dict[str, Price | None] = {}

    @classmethod
    def of(cls, configured: Mapping[str, Price], defaults: bool = True) -> PriceTable:
        """The configured entries over DEFAULT_PRICES (an entry replaces the default of
        its name), or only the configured ones when ``defaults`` is false."""
        return cls({**DEFAULT_PRICES, **configured} if defaults else configured)

    @property
    def prices(self) -> Mapping[str, Price]:
        return self._prices

    def __len__(self) -> int:
        return len(self._prices)

    def price_for(self, model: str | None) -> Price | None:
        """The price of ``model``: its own entry, else the longest matching prefix."""
        if model is None:
            return None
        hit = self._cache.get(model, _MISS)
        if hit is not _MISS:
            return hit  # type: ignore[return-value]
        price = self._match(model)
        cache = self._cache
        if len(cache) >= CACHE_MAX:
            cache.clear()
        cache[model] = price
        return price

    def _match(self, model: str) -> Price | None:
        prices = self._prices
        end = len(model)
        while end > 0:  # the whole name, then each prefix that ends before a '-'
            price = prices.get(model[:end])
            if price is not None:
                return price
            end = model.rfind("-", 0, end)
        return None

    def cost(self, model: str | None, prompt: int | None, completion: int | None,
             cache_read: int | None, cache_write: int | None) -> float | None:
        """USD for one row's tokens (see the module docstring), or None when the model
        has no price or no token count at all is known."""
        if prompt is None and completion is None and cache_read is None \
                and cache_write is None:
            return None
        price = self.price_for(model)
        if price is None:
            return None
        read = cache_read or 0
        write = cache_write or 0
        uncached = max(0, (prompt or 0) - read - write)
        read_rate = price.input if price.cached_read is None else price.cached_read
        write_rate = price.input if price.cached_write is None else price.cached_write
        usd = (uncached * price.input + read * read_rate + write * write_rate
               + (completion or 0) * price.output) / PER_TOKENS
        return round(usd, COST_DIGITS)


def _anthropic(input_: float, output: float) -> Price:
    """Anthropic's rule: a (5-minute) cache write is 1.25x input, a cache hit 0.1x."""
    return Price(input_, output, cached_read=round(input_ * 0.1, 6),
                 cached_write=round(input_ * 1.25, 6))


# Shipped list prices, USD per million tokens, standard tier, as published December
# 2026 on platform.openai.com/docs/pricing and docs.anthropic.com/en/docs/about-claude/
# pricing (checked against pricing trackers that cite those pages). Prices change:
# override or add entries under `prices:` in the config.
#
# OpenAI: cached input is 0.5x input for gpt-4o, o1 and o3-mini, 0.25x for the
# gpt-4.1 family, o3 and o4-mini (since o3's June 2025 cut) and 0.1x for gpt-5; writes
# are not billed (OpenAI caches implicitly and reports no writes). Models without
# prompt caching (gpt-3.5-turbo, embeddings) have no cached rate. Embeddings bill
# input only. Variants billed unlike their family have entries of their own, so the
# prefix rule does not give them the family's price.
DEFAULT_PRICES: Final[Mapping[str, Price]] = MappingProxyType({
    # --- OpenAI ---
    "gpt-4o": Price(2.50, 10.00, cached_read=1.25),
    "gpt-4o-2024-05-13": Price(5.00, 15.00),  # the first gpt-4o snapshot, never cut
    "gpt-4o-mini": Price(0.15, 0.60, cached_read=0.075),
    "gpt-4o-realtime-preview": Price(5.00, 20.00, cached_read=2.50),  # text tokens
    "gpt-4o-mini-realtime-preview": Price(0.60, 2.40, cached_read=0.30),  # text tokens
    "gpt-4.1": Price(2.00, 8.00, cached_read=0.50),
    "gpt-4.1-mini": Price(0.40, 1.60, cached_read=0.10),
    "gpt-4.1-nano": Price(0.10, 0.40, cached_read=0.025),
    "gpt-5": Price(1.25, 10.00, cached_read=0.125),
    "gpt-5-mini": Price(0.25, 2.00, cached_read=0.025),
    "gpt-5-nano": Price(0.05, 0.40, cached_read=0.005),
    "gpt-5-pro": Price(15.00, 120.00),
    "o1": Price(15.00, 60.00, cached_read=7.50),
    "o1-mini": Price(1.10, 4.40, cached_read=0.55),
    "o1-pro": Price(150.00, 600.00),
    "o3": Price(2.00, 8.00, cached_read=0.50),
    "o3-pro": Price(20.00, 80.00),
    "o3-deep-research": Price(10.00, 40.00, cached_read=2.50),
    "o3-mini": Price(1.10, 4.40, cached_read=0.55),
    "o4-mini": Price(1.10, 4.40, cached_read=0.275),
    "o4-mini-deep-research": Price(2.00, 8.00, cached_read=0.50),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "gpt-3.5-turbo-instruct": Price(1.50, 2.00),
    "text-embedding-3-small": Price(0.02, 0.0),
    "text-embedding-3-large": Price(0.13, 0.0),
    "text-embedding-ada-002": Price(0.10, 0.0),
    # --- Anthropic (cache write 1.25x input, cache read 0.1x) ---
    "claude-3-haiku": _anthropic(0.25, 1.25),
    "claude-3-sonnet": _anthropic(3.00, 15.00),
    "claude-3-opus": _anthropic(15.00, 75.00),
    "claude-3-5-haiku": _anthropic(0.80, 4.00),
    "claude-3-5-sonnet": _anthropic(3.00, 15.00),
    "claude-3-7-sonnet": _anthropic(3.00, 15.00),
    "claude-haiku-4-5": _anthropic(1.00, 5.00),
    "claude-sonnet-4": _anthropic(3.00, 15.00),
    "claude-sonnet-4-5": _anthropic(3.00, 15.00),
    "claude-opus-4": _anthropic(15.00, 75.00),
    "claude-opus-4-1": _anthropic(15.00, 75.00),
    "claude-opus-4-5": _anthropic(5.00, 25.00),
})
