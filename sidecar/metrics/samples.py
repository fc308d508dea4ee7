"""Samples: one process's figures as plain data, which workers share and a scrape merges.

A :data:`Samples` maps (family name, label pairs) to a number, or, for a histogram,
to its non-cumulative bucket counts followed by the sum of its values (in the
histogram's internal unit, ms). Pure: no I/O; ``share.py`` moves them between
processes as JSON (:func:`to_json`, :func:`from_json`).
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from sidecar.metrics.core import N_BUCKETS, Histogram, Metrics
from sidecar.metrics.families import FAMILIES

Labels = tuple[tuple[str, str], ...]
Value = float | list[float]
Samples = dict[tuple[str, Labels], Value]

SNAPSHOT_VERSION: Final = 1


def put_histogram(out: Samples, name: str, labels: Labels, h: Histogram) -> None:
    if any(h.counts):
        out[(name, labels)] = [*h.counts, h.total]


def from_metrics(m: Metrics, out: Samples) -> None:
    """The request counts of ``m`` as samples (counters and histograms)."""
    for (route, upstream), s in m.by_route.items():
        for (status, outcome), n in s.statuses.items():
            out[("sidecar_requests_total", (("route", route), ("upstream", upstream),
                                            ("status", str(status)), ("outcome", outcome)))] = n
        labels = (("route", route), ("upstream", upstream))
        put_histogram(out, "sidecar_ttft_seconds", labels, s.ttft)
        put_histogram(out, "sidecar_request_duration_seconds", labels, s.duration)
        put_histogram(out, "sidecar_stream_max_gap_seconds", labels, s.gap)
    for mkey, (prompt, completion, cost) in m.by_model.items():
        base: Labels = (("model", mkey[0]), ("upstream", mkey[1]))
        if len(mkey) > 2:
            base += (("key", mkey[2]),)
        out[("sidecar_tokens_total", (*base, ("type", "prompt")))] = prompt
        out[("sidecar_tokens_total", (*base, ("type", "completion")))] = completion
        out[("sidecar_cost_usd_total", base)] = cost
    for (route, upstream, reason), n in m.failovers.items():
        out[("sidecar_failovers_total", (("route", route), ("upstream", upstream),
                                         ("reason", reason)))] = n


def merge(into: Samples, other: Samples, gauges: bool = True) -> None:
    """Add ``other`` to ``into``: counters and histograms sum; gauges sum or take the
    minimum as their family says (``gauges=False`` leaves them out: a dead process's
    counts carry on in its successor, its gauges do not)."""
    for key, value in other.items():
        family = FAMILIES.get(key[0])
        if family is None:
            continue  # written by a newer or older sidecar: not ours to expose
        if family.kind == "gauge":
            if not gauges:
                continue
            have = into.get(key)
            if isinstance(value, list) or isinstance(have, list):
                continue  # a gauge is a number; a list here is not ours
            if have is None:
                into[key] = value
            elif family.merge == "min":
                into[key] = min(have, value)
            else:
                into[key] = have + value
            continue
        have = into.get(key)
        if have is None:
            into[key] = list(value) if isinstance(value, list) else value
        elif isinstance(have, list) and isinstance(value, list):
            if len(have) == len(value) == N_BUCKETS + 1:
                into[key] = [a + b for a, b in zip(have, value, strict=True)]
        elif not isinstance(have, list) and not isinstance(value, list):
            into[key] = have + value


def to_json(samples: Samples) -> bytes:
    return orjson.dumps({"v": SNAPSHOT_VERSION,
                         "samples": [[name, labels, value]
                                     for (name, labels), value in samples.items()]})


def from_json(data: bytes) -> Samples:
    """Samples written by :func:`to_json`; malformed entries are skipped (a file being
    replaced is never read half-written, but a foreign one may be anything)."""
    doc: Any = orjson.loads(data)
    out: Samples = {}
    if not isinstance(doc, dict) or doc.get("v") != SNAPSHOT_VERSION:
        return out
    for entry in doc.get("samples", ()):
        try:
            name, labels, value = entry
            key = (str(name), tuple((str(k), str(v)) for k, v in labels))
        except (TypeError, ValueError):
            continue
        if isinstance(value, list):
            if len(value) == N_BUCKETS + 1 and all(isinstance(v, int | float) for v in value):
                out[key] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = value
    return out
