"""Samples -> the Prometheus text exposition format (version 0.0.4). Pure.

Every family of ``families.FAMILIES`` is written with its HELP and TYPE lines, with
or without samples, so a dashboard's queries name metrics that exist from the first
scrape. Histograms are kept in ms and written in seconds, with cumulative buckets.
"""

from __future__ import annotations

from typing import Final

from sidecar.metrics.core import LATENCY_BOUNDS_MS
from sidecar.metrics.families import FAMILIES
from sidecar.metrics.samples import Labels, Samples, Value

CONTENT_TYPE: Final = b"text/plain; version=0.0.4; charset=utf-8"
# The histograms' upper bounds as written in `le` (seconds), then +Inf.
LE_VALUES: Final = (*(f"{b / 1000:g}" for b in LATENCY_BOUNDS_MS), "+Inf")


def _escape(value: str) -> str:
    # The format's three escapes in label values; model names come from clients.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(v: float) -> str:
    if isinstance(v, int) or v.is_integer():
        return str(int(v))
    return repr(v)


def render(samples: Samples) -> bytes:
    by_family: dict[str, list[tuple[Labels, Value]]] = {}
    for (name, labels), value in samples.items():
        by_family.setdefault(name, []).append((labels, value))
    out: list[str] = []
    for name, family in FAMILIES.items():
        out.append(f"# HELP {name} {family.help}")
        out.append(f"# TYPE {name} {family.kind}")
        for labels, value in sorted(by_family.get(name, ()), key=lambda s: s[0]):
            if family.kind == "histogram":
                assert isinstance(value, list)
                *counts, total_ms = value
                cumulative = 0.0
                for le, n in zip(LE_VALUES, counts, strict=True):
                    cumulative += n
                    bucket = _labels(labels, 'le="' + le + '"')
                    out.append(f"{name}_bucket{bucket} {_number(cumulative)}")
                out.append(f"{name}_sum{_labels(labels)} {_number(total_ms / 1000)}")
                out.append(f"{name}_count{_labels(labels)} {_number(cumulative)}")
            else:
                assert isinstance(value, int | float)
                out.append(f"{name}{_labels(labels)} {_number(value)}")
    out.append("")
    return "\n".join(out).encode()
