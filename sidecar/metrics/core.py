"""Per-process request metrics: plain counts, updated once per request, no I/O, no await.

Why not prometheus-client: its per-request updates (a labelled counter ``inc``, three
labelled histogram ``observe`` calls, three token/cost ``inc`` calls) cost ~122,000
user-space instructions per request under callgrind (~163,000 in its multiprocess
mode), against ~538,000 for the whole streamed request through the sidecar, i.e.
+23%. The same updates here are dict look-ups keyed by label tuples, a C ``bisect``
per histogram and list increments: ~10,000 instructions (measured the same way; the
figures are in README's "Metrics and access log" section). The text exposition
(``exposition.py``) is written by hand; tests parse it with prometheus-client's own
parser.

Latency histograms are kept in milliseconds (the meter row's unit, so an observation
costs no conversion) and exposed in seconds.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from sidecar.meter import MeterRecord

# Upper bounds (ms) of every latency histogram: fine below 10 ms, where the sidecar's
# own overhead shows (sub-millisecond differences between the Nginx-direct path and
# the sidecar path), then coarser up to two minutes (long streams, slow first tokens).
LATENCY_BOUNDS_MS: Final[tuple[float, ...]] = (
    0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 25.0, 50.0, 75.0, 100.0, 250.0,
    500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 120000.0,
)
# One count per bound plus the overflow (+Inf) bucket.
N_BUCKETS: Final = len(LATENCY_BOUNDS_MS) + 1
# The label value that stands for every model (or key) past the cardinality cap.
OVERFLOW_LABEL: Final = "_other"
# Label value of a row with no model (a request refused before its body was read).
NO_MODEL: Final = ""

_B: Final = LATENCY_BOUNDS_MS


class Histogram:
    """Non-cumulative bucket counts (``counts[i]``: values in (bound[i-1], bound[i]],
    the last one past every bound) and the sum of the values."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * N_BUCKETS
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le).
        self.counts[bisect_left(_B, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)


class RouteStats:
    """What one (route, upstream) pair has seen."""

    __slots__ = ("duration", "gap", "statuses", "ttft")

    def __init__(self) -> None:
        self.statuses: dict[tuple[int, str], int] = {}  # (status, outcome) -> requests
        self.ttft = Histogram()  # request received -> first byte to the client
        self.duration = Histogram()  # request received -> row complete
        # The longest pause between two provider body reads, once per response that
        # had at least two reads (see splice.Exchange.gap).
        self.gap = Histogram()


class Metrics:
    """The process's request counts. :meth:`observe` is the hot path's only call."""

    __slots__ = ("_keys", "_models", "by_model", "by_route", "failovers", "max_keys",
                 "max_models", "per_key")

    def __init__(self, per_key: bool = False, max_models: int = 200,
                 max_keys: int = 1000) -> None:
        self.per_key = per_key
        self.max_models = max_models
        self.max_keys = max_keys
        self.by_route: dict[tuple[str, str], RouteStats] = {}
        # (model, upstream[, key id]) -> [prompt tokens, completion tokens, cost USD]
        self.by_model: dict[tuple[str, ...], list[float]] = {}
        # (route, upstream that failed, reason) -> failovers
        self.failovers: dict[tuple[str, str, str], int] = {}
        # Model and key label values seen so far: the cardinality caps count them.
        self._models: set[str] = set()
        self._keys: set[str] = set()

    def observe(self, row: MeterRecord, failed: Iterable[tuple[str, str]] | None,
                gap_s: float | None) -> None:
        """Count one finished request (its complete meter row). ``failed``: the
        (upstream, reason) of each attempt that failed over; ``gap_s``: the longest
        pause between two provider body reads of the response, seconds."""
        # try/except rather than dict.get: no method call on the common path (3.11's
        # try costs nothing until it raises, once per new series).
        key = (row.route, row.upstream)
        try:
            s = self.by_route[key]
        except KeyError:
            s = self.by_route[key] = RouteStats()
        k = (row.status, row.outcome)
        try:
            s.statuses[k] += 1
        except KeyError:
            s.statuses[k] = 1
        # The histograms' observe, inlined: a method call per observation is ~1/3 of it.
        t = row.ttft_ms
        if t is not None:
            h = s.ttft
            h.counts[bisect_left(_B, t)] += 1
            h.total += t
        t = row.duration_ms
        h = s.duration
        h.counts[bisect_left(_B, t)] += 1
        h.total += t
        if gap_s is not None:
            t = gap_s * 1000.0
            h = s.gap
            h.counts[bisect_left(_B, t)] += 1
            h.total += t
        prompt = row.prompt_tokens
        cost = row.cost_usd
        if prompt is not None or cost is not None:
            # Priced as the model the provider was sent (the row's cost is, too).
            model = row.upstream_model or row.model or NO_MODEL
            mkey: tuple[str, ...] = (model, row.upstream, row.key_id or "") if self.per_key \
                else (model, row.upstream)
            try:
                m = self.by_model[mkey]
            except KeyError:
                m = self._model_entry(mkey)
            m[0] += prompt or 0
            m[1] += row.completion_tokens or 0
            if cost is not None:
                m[2] += cost
        if failed is not None:
            route = row.route
            fo = self.failovers
            for upstream, reason in failed:
                fk = (route, upstream, reason)
                fo[fk] = fo.get(fk, 0) + 1

    def _model_entry(self, mkey: tuple[str, ...]) -> list[float]:
        """A new (model, upstream[, key]) series, or the overflow one past a cap: the
        model name comes from the client, so its label values must be bounded."""
        model = mkey[0]
        if model not in self._models:
            if len(self._models) >= self.max_models:
                model = OVERFLOW_LABEL
            else:
                self._models.add(model)
        if self.per_key:
            key_id = mkey[2]
            if key_id not in self._keys:
                if len(self._keys) >= self.max_keys:
                    key_id = OVERFLOW_LABEL
                else:
                    self._keys.add(key_id)
            capped: tuple[str, ...] = (model, mkey[1], key_id)
        else:
            capped = (model, mkey[1])
        # Past a cap, requests keep missing the dict and come here: only they pay it.
        entry = self.by_model.get(capped)
        if entry is None:
            entry = self.by_model[capped] = [0, 0, 0.0]
        return entry
