"""``sidecar meter top``: a live view of the meter: rates over the last minute, top keys
and models.

Each frame asks the database one question: the rows of requests that started within
the last ``window`` seconds (the ``ts_ms`` index finds them), grouped by key and model.
A stream is in the meter once it has ended, so a long one counts from then, in the
window of its start: rates in the last seconds of a window run a little low while
long streams are in flight. The figures are made by :func:`figures` (pure) and drawn
by :func:`render`; the command redraws every ``interval`` seconds.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sidecar.meter import TABLE

DEFAULT_WINDOW_S: Final = 60.0
DEFAULT_INTERVAL_S: Final = 1.0
DEFAULT_TOP: Final = 5
NO_KEY: Final = "-"  # a request without an API key
NO_MODEL: Final = "(none)"


@dataclass(frozen=True, slots=True)
class Line:
    """One key's or model's share of the window."""

    name: str
    requests: int
    tokens: int
    cost_usd: float | None  # None: none of its rows was priced
    req_per_s: float
    tokens_per_s: float
    spend_per_min: float | None


@dataclass(frozen=True, slots=True)
class Frame:
    now_ms: int
    window_s: float
    requests: int
    tokens: int
    cost_usd: float | None
    errors: int
    req_per_s: float
    tokens_per_s: float
    spend_per_min: float | None
    top_keys: tuple[Line, ...]
    top_models: tuple[Line, ...]

    def as_dict(self) -> dict[str, Any]:
        def line(x: Line) -> dict[str, Any]:
            return {"name": x.name, "requests": x.requests, "tokens": x.tokens,
                    "cost_usd": x.cost_usd, "req_per_s": x.req_per_s,
                    "tokens_per_s": x.tokens_per_s, "spend_per_min": x.spend_per_min}

        return {
            "now_ms": self.now_ms, "window_s": self.window_s, "requests": self.requests,
            "tokens": self.tokens, "cost_usd": self.cost_usd, "errors": self.errors,
            "req_per_s": self.req_per_s, "tokens_per_s": self.tokens_per_s,
            "spend_per_min": self.spend_per_min,
            "top_keys": [line(x) for x in self.top_keys],
            "top_models": [line(x) for x in self.top_models],
        }


# (key_id, model, requests, tokens, cost or None, errors): one row per key and model.
Cell = tuple[str | None, str | None, int, int, float | None, int]


def window_cells(conn: sqlite3.Connection, since_ms: int) -> list[Cell]:
    """The window's rows, grouped by key and model (one indexed range read)."""
    cur = conn.execute(
        f"""SELECT key_id, model, COUNT(*), COALESCE(SUM(total_tokens), 0), SUM(cost_usd),
                   SUM(outcome IS NOT 'ok')
            FROM {TABLE} WHERE ts_ms >= ? GROUP BY key_id, model""",
        (since_ms,),
    )
    return [(r[0], r[1], int(r[2]), int(r[3]), r[4], int(r[5])) for r in cur.fetchall()]


def _sum_cost(costs: Iterable[float | None]) -> float | None:
    priced = [c for c in costs if c is not None]
    return sum(priced) if priced else None


def _rank(cells: Sequence[Cell], pick: int, none: str, window_s: float,
          top: int) -> tuple[Line, ...]:
    acc: dict[str, tuple[list[int], list[float | None]]] = {}
    for cell in cells:
        name = str(cell[pick] or none)
        counts, costs = acc.setdefault(name, ([0, 0], []))
        counts[0] += cell[2]
        counts[1] += cell[3]
        costs.append(cell[4])
    # Most requests first; ties by tokens, then name, so the order is stable.
    order = sorted(acc.items(), key=lambda kv: (-kv[1][0][0], -kv[1][0][1], kv[0]))[:top]
    out = []
    for name, ((req, tok), costs) in order:
        cost = _sum_cost(costs)
        out.append(Line(name, req, tok, cost, req / window_s, tok / window_s,
                        None if cost is None else cost * 60 / window_s))
    return tuple(out)


def figures(cells: Sequence[Cell], now_ms: int, window_s: float, top: int) -> Frame:
    """The frame for the window's cells (pure)."""
    requests = sum(c[2] for c in cells)
    tokens = sum(c[3] for c in cells)
    cost = _sum_cost(c[4] for c in cells)
    return Frame(
        now_ms=now_ms, window_s=window_s, requests=requests, tokens=tokens, cost_usd=cost,
        errors=sum(c[5] for c in cells), req_per_s=requests / window_s,
        tokens_per_s=tokens / window_s,
        spend_per_min=None if cost is None else cost * 60 / window_s,
        top_keys=_rank(cells, 0, NO_KEY, window_s, top),
        top_models=_rank(cells, 1, NO_MODEL, window_s, top),
    )


def _money(v: float | None) -> str:
    return "-" if v is None else f"${v:,.6f}"


def _table(title: str, lines: Sequence[Line]) -> list[str]:
    if not lines:
        return [f"{title}: none"]
    width = max(len(title), *(len(x.name) for x in lines))
    out = [f"{title:<{width}}  {'req/s':>8}  {'tokens/s':>10}  {'spend/min':>12}"]
    for x in lines:
        out.append(f"{x.name:<{width}}  {x.req_per_s:>8,.2f}  {x.tokens_per_s:>10,.1f}  "
                   f"{_money(x.spend_per_min):>12}")
    return out


def render(frame: Frame, db: str) -> str:
    """The frame as the terminal shows it."""
    when = dt.datetime.fromtimestamp(frame.now_ms / 1000, tz=dt.UTC).strftime("%H:%M:%SZ")
    err = 100.0 * frame.errors / frame.requests if frame.requests else 0.0
    lines = [
        f"sidecar meter top  {db}  {when}  requests started in the last {frame.window_s:g} s",
        f"requests/s {frame.req_per_s:,.2f}   tokens/s {frame.tokens_per_s:,.1f}   "
        f"spend/min {_money(frame.spend_per_min)}   errors {err:.1f}%   "
        f"({frame.requests:,} requests, {frame.tokens:,} tokens)",
        "",
        *_table("top keys", frame.top_keys),
        "",
        *_table("top models", frame.top_models),
    ]
    return "\n".join(lines)
