"""``sidecar meter chart``: tokens, cost or requests per UTC day or hour, drawn to a PNG.

:func:`series` reads the figures (one grouped query over the ``ts_ms`` index, empty
buckets filled with zeros so the time axis has no holes); :func:`draw` needs
matplotlib, an optional extra (``pip install 'llm-sidecar[chart]'``), imported only
here so the rest of the CLI and the server never load it.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from typing import Final

from sidecar.meter import TABLE

METRICS: Final = {
    "tokens": "COALESCE(SUM(total_tokens), 0)",
    "cost": "COALESCE(SUM(cost_usd), 0.0)",
    "requests": "COUNT(*)",
}
METRIC_LABELS: Final = {
    "tokens": "tokens (prompt + completion)",
    "cost": "cost (USD, priced rows)",
    "requests": "requests",
}
BUCKET_MS: Final = {"day": 86_400_000, "hour": 3_600_000}
# More bars than this are unreadable on one PNG: --since narrows the range.
MAX_BUCKETS: Final = 24 * 90
CHART_EXTRA: Final = "chart"


class ChartUnavailable(RuntimeError):
    """matplotlib is not installed."""


def series(conn: sqlite3.Connection, by: str, metric: str,
           since_ms: int | None) -> list[tuple[int, float]]:
    """(bucket start in ms since epoch, value) for every bucket from the first row's to
    the last's, UTC; empty buckets are 0."""
    size = BUCKET_MS[by]
    where, params = ("WHERE ts_ms >= ?", (since_ms,)) if since_ms is not None else ("", ())
    cur = conn.execute(
        f"SELECT ts_ms / {size} AS b, {METRICS[metric]} FROM {TABLE} {where} "
        "GROUP BY b ORDER BY b", params)
    found = {int(b): float(v) for b, v in cur.fetchall() if b is not None}
    if not found:
        return []
    first, last = min(found), max(found)
    if last - first + 1 > MAX_BUCKETS:
        raise ValueError(f"{last - first + 1} {by}s to draw (at most {MAX_BUCKETS}): "
                         "narrow the range with --since")
    return [(b * size, found.get(b, 0.0)) for b in range(first, last + 1)]


def _label(ms: int, by: str) -> str:
    t = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return t.strftime("%Y-%m-%d") if by == "day" else t.strftime("%m-%d %H:00")


def draw(points: list[tuple[int, float]], by: str, metric: str, out: str, title: str) -> None:
    """A bar chart of ``points`` written to ``out`` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display, no GUI toolkit
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise ChartUnavailable(
            f"charts need matplotlib: pip install 'llm-sidecar[{CHART_EXTRA}]'") from None
    labels = [_label(ms, by) for ms, _ in points]
    values = [v for _, v in points]
    width = min(16.0, max(7.0, 0.35 * len(points) + 3))
    fig, ax = plt.subplots(figsize=(width, 4.8), dpi=110)
    try:
        bars = ax.bar(range(len(values)), values, color="#3b6ea5", width=0.8)
        step = max(1, len(labels) // 24)  # at most ~24 tick labels
        ax.set_xticks(range(0, len(labels), step))
        ax.set_xticklabels(labels[::step], rotation=45, ha="right", fontsize=8)
        ax.set_xlabel(f"UTC {by}")
        ax.set_ylabel(METRIC_LABELS[metric])
        money = metric == "cost"
        ax.yaxis.set_major_formatter(FuncFormatter(
            lambda v, _pos: f"${v:,.4g}" if money else f"{v:,.0f}"))
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if len(values) <= 31:  # few bars: print each value on its bar
            ax.bar_label(bars, labels=[f"${v:,.4g}" if money else f"{v:,.0f}" for v in values],
                         fontsize=7, padding=2)
        fig.tight_layout()
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
