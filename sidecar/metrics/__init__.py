"""Prometheus metrics: counted per request without I/O, exposed at ``/metrics``.

``core`` (the per-request counts), ``families`` (names and types: the contract the
dashboard and alerts use), ``samples`` (figures as data, merged across workers),
``exposition`` (the text format), ``share`` (workers publishing to each other) and
``exporter`` (a scrape's answer). This package only re-exports.
"""

from sidecar.metrics.core import LATENCY_BOUNDS_MS, OVERFLOW_LABEL, Histogram, Metrics
from sidecar.metrics.exporter import Exporter
from sidecar.metrics.exposition import CONTENT_TYPE, render
from sidecar.metrics.families import FAMILIES, Family
from sidecar.metrics.share import SHARE_INTERVAL_S, Share

__all__ = [
    "CONTENT_TYPE",
    "FAMILIES",
    "LATENCY_BOUNDS_MS",
    "OVERFLOW_LABEL",
    "SHARE_INTERVAL_S",
    "Exporter",
    "Family",
    "Histogram",
    "Metrics",
    "Share",
    "render",
]
