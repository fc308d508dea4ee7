"""``sidecar meter ...``: reports over the meter database, and its pruning.

The reports open the database with SQLite's ``mode=ro`` URI, so they never create
a file, never take the write lock and are safe while workers write (WAL lets
readers and the writer proceed together). ``prune`` is the one command that
writes, in short batches (``meter_prune``). Times are UTC.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import os
import sqlite3
import sys
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import IO, Any, Final

import click
import orjson

from sidecar.config import MeterConfig
from sidecar.durations import parse_seconds
from sidecar.meter import BUSY_TIMEOUT_MS, TABLE

# How often `tail -f` looks for new rows.
TAIL_POLL_S: Final = 0.5
TAIL_DEFAULT_ROWS: Final = 20
# Rows fetched per round trip when streaming an export or a followed tail.
FETCH_ROWS: Final = 1_000

# --by choice -> SQL expression for the group. Day is the UTC calendar day.
GROUPS: Final = {
    "key": "key_id",
    "model": "model",
    "upstream": "upstream",
    "route": "route",
    "day": "strftime('%Y-%m-%d', ts_ms / 1000, 'unixepoch')",
    "outcome": "outcome",
}

# Summary figures, in output order.
FIGURES: Final = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "reported",
    "estimated",
    "none",
    "errors",
    "p50_ttft_ms",
    "avg_duration_ms",
    "bytes_out",
    "cost_usd",
)
_TABLE_HEADINGS: Final = {
    "requests": "requests",
    "prompt_tokens": "prompt",
    "completion_tokens": "completion",
    "total_tokens": "total",
    "reported": "reported",
    "estimated": "estimated",
    "none": "no usage",
    "errors": "errors",
    "p50_ttft_ms": "p50 ttft ms",
    "avg_duration_ms": "avg ms",
    "bytes_out": "bytes out",
    "cost_usd": "cost usd",
}
FLOAT_DIGITS: Final = 3  # ms figures in json/csv: microsecond precision is plenty
# cost_usd: rows are priced to 1e-9 USD (sidecar.pricing); a sum keeps that, and the
# table shows micro-dollars. It is the sum over priced rows (None: none was priced).
COST_DIGITS: Final = 9
TABLE_COST_DIGITS: Final = 6
_NO_GROUP: Final = "(none)"  # table label for a NULL or empty group value
_NO_KEY: Final = "-"  # ... for --by key: a request that had no API key


# --- helpers --------------------------------------------------------------------


def parse_duration(text: str) -> int:
    """ "30m" / "24h" / "7d" -> milliseconds."""
    try:
        seconds = parse_seconds(text)  # no bare_unit: "7" alone is an error, not a guess
    except ValueError:
        raise ValueError(f"{text!r} is not a duration like 30m, 24h or 7d") from None
    return round(seconds * 1000)


class _Since(click.ParamType[int | None]):
    """--since: a duration back from now -> the cutoff in ms since epoch (None: all)."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> int | None:
        if value is None or isinstance(value, int):
            return value
        if str(value).strip().lower() == "all":
            return None
        try:
            return int(time.time() * 1000) - parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


_since_option = click.option(
    "--since",
    type=_Since(),
    default=None,
    help="Only requests that started within this long before now: 30m, 24h, 7d (default: all).",
)
_db_option = click.option(
    "--db",
    "db_path",
    default=MeterConfig().db,
    show_default=True,
    help="Meter SQLite database.",
)


def open_ro(path: str) -> sqlite3.Connection:
    """Open the meter DB read-only; a clear ClickException (exit 1) if we cannot."""
    if not os.path.isfile(path):
        raise click.ClickException(f"meter database not found: {path}")
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
        # A reader only waits during a checkpoint/recovery, but do not fail then.
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)
        ).fetchone()
    except sqlite3.Error as exc:
        raise click.ClickException(f"cannot read meter database {path}: {exc}") from exc
    if found is None:
        conn.close()
        raise click.ClickException(f"{path} is not a meter database (no '{TABLE}' table)")
    return conn


def _query(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
    try:
        return conn.execute(sql, params)
    except sqlite3.Error as exc:
        raise click.ClickException(f"meter database query failed: {exc}") from exc


def _rows(cur: sqlite3.Cursor) -> Iterator[tuple[Any, ...]]:
    while True:
        try:
            chunk = cur.fetchmany(FETCH_ROWS)
        except sqlite3.Error as exc:
            raise click.ClickException(f"meter database read failed: {exc}") from exc
        if not chunk:
            return
        yield from chunk


def _where_since(since_ms: int | None) -> tuple[str, tuple[Any, ...]]:
    if since_ms is None:
        return "", ()
    return "WHERE ts_ms >= ?", (since_ms,)


def _iso_ms(ts_ms: int | None) -> str:
    if ts_ms is None:
        return "-"
    t = dt.datetime.fromtimestamp(ts_ms / 1000, tz=dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


# --- summary --------------------------------------------------------------------


def summarize(
    conn: sqlite3.Connection, by: str, since_ms: int | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-group figures and the totals over all groups.

    Two reads of the period's rows (the ``ts_ms`` index finds them): one GROUP BY for
    the sums, and the ttfts in ascending order, walked once to pick every group's
    median and the overall one (see :func:`_medians`). The totals add the groups'
    sums up. (A single statement with window functions for the medians sorted the
    rows twice and copied them into a temporary table: ~2 s for a day of a
    10-million-row database; these two take a fraction of that, bench/RESULTS.md.)
    """
    where, params = _where_since(since_ms)
    group_expr = GROUPS[by]
    # One read transaction: both reads see the same snapshot while workers write.
    _query(conn, "BEGIN")
    try:
        raw = _aggregate(conn, group_expr, where, params, order_by_group=by == "day")
        medians, overall = _medians(conn, group_expr, where, params,
                                    {g["group"]: g["ttft_n"] for g in raw})
    finally:
        conn.rollback()
    for g in raw:
        g["p50_ttft_ms"] = medians.get(g["group"])
    groups = [_public(g) for g in raw]
    total: dict[str, Any] = dict.fromkeys(FIGURES, 0)
    total["p50_ttft_ms"] = total["avg_duration_ms"] = total["cost_usd"] = None
    if raw:
        for name in _SUMMED:
            total[name] = sum(g[name] for g in raw)
        priced = [g["cost_usd"] for g in raw if g["cost_usd"] is not None]
        total["cost_usd"] = math.fsum(priced) if priced else None
        dur_n = sum(g["dur_n"] for g in raw)
        total["avg_duration_ms"] = math.fsum(g["dur_sum"] for g in raw) / dur_n if dur_n else None
        total["p50_ttft_ms"] = overall
        total = _public(total)
    return groups, total


# Figures whose total is the sum of the groups' (cost_usd too, but None when none priced).
_SUMMED: Final = ("requests", "prompt_tokens", "completion_tokens", "total_tokens",
                  "reported", "estimated", "none", "errors", "bytes_out")


def _public(item: dict[str, Any]) -> dict[str, Any]:
    """The figures as shown: floats rounded, the helper sums dropped."""
    out: dict[str, Any] = {"group": item["group"]} if "group" in item else {}
    for name in FIGURES:
        value = item[name]
        if isinstance(value, float):
            value = round(value, COST_DIGITS if name == "cost_usd" else FLOAT_DIGITS)
        out[name] = value
    return out


def _aggregate(
    conn: sqlite3.Connection, group_expr: str, where: str, params: Sequence[Any],
    *, order_by_group: bool
) -> list[dict[str, Any]]:
    """Every figure but the median, per group (p50_ttft_ms is filled in later)."""
    order = "grp" if order_by_group else "requests DESC, grp"
    sql = f"""
        SELECT {group_expr} AS grp,
               COUNT(*) AS requests,
               COALESCE(SUM(prompt_tokens), 0),
               COALESCE(SUM(completion_tokens), 0),
               COALESCE(SUM(total_tokens), 0),
               SUM(usage_source = 'reported'),
               SUM(usage_source = 'estimated'),
               SUM(usage_source IS NULL OR usage_source NOT IN ('reported', 'estimated')),
               SUM(outcome IS NOT 'ok'),
               NULL,
               AVG(duration_ms),
               COALESCE(SUM(bytes_out), 0),
               SUM(cost_usd),
               TOTAL(duration_ms), COUNT(duration_ms), COUNT(ttft_ms)
        FROM {TABLE} {where}
        GROUP BY grp ORDER BY {order}
    """
    names = (*FIGURES, "dur_sum", "dur_n", "ttft_n")
    return [{"group": row[0], **dict(zip(names, row[1:], strict=True))}
            for row in _rows(_query(conn, sql, params))]


def _middle(n: int) -> tuple[int, int]:
    """The 1-based positions whose mean is the median of n sorted values."""
    return (n + 1) // 2, (n + 2) // 2


def _medians(conn: sqlite3.Connection, group_expr: str, where: str, params: Sequence[Any],
             counts: dict[Any, int]) -> tuple[dict[Any, float], float | None]:
    """Each group's median ttft and the overall one, from one ascending walk of the
    period's ttfts: a value's rank within its group (and overall) is how many of the
    group's (all) values came before it, so the middle ones are picked as they pass.
    Memory stays O(groups) however many rows the period holds."""
    total_n = sum(counts.values())
    if total_n == 0:
        return {}, None
    cond = f"{where} AND ttft_ms IS NOT NULL" if where else "WHERE ttft_ms IS NOT NULL"
    cur = _query(conn, f"SELECT {group_expr}, ttft_ms FROM {TABLE} {cond} ORDER BY ttft_ms",
                 params)
    targets = {g: _middle(n) for g, n in counts.items() if n}
    seen: dict[Any, int] = dict.fromkeys(targets, 0)
    picked: dict[Any, list[float]] = {g: [] for g in targets}
    lo, hi = _middle(total_n)
    overall: list[float] = []
    rank = 0
    for grp, ttft in _rows(cur):
        rank += 1
        if rank == lo or rank == hi:
            overall.append(ttft)
        k = seen[grp] = seen[grp] + 1
        a, b = targets[grp]
        if k == a or k == b:
            picked[grp].append(ttft)
    medians = {g: (v[0] + v[-1]) / 2 for g, v in picked.items() if v}
    return medians, (overall[0] + overall[-1]) / 2 if overall else None


def _fmt_cell(value: Any, figure: str = "") -> str:
    if value is None:
        return "-"
    if figure == "cost_usd":
        return f"{value:,.{TABLE_COST_DIGITS}f}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_table(by: str, groups: Sequence[dict[str, Any]], total: dict[str, Any]) -> str:
    headings = [by, *(_TABLE_HEADINGS[f] for f in FIGURES)]
    none = _NO_KEY if by == "key" else _NO_GROUP
    body = [[_group_label(g["group"], none), *(_fmt_cell(g[f], f) for f in FIGURES)]
            for g in groups]
    foot = ["TOTAL", *(_fmt_cell(total[f], f) for f in FIGURES)]
    widths = [max(len(r[i]) for r in (headings, *body, foot)) for i in range(len(headings))]

    def line(cells: Sequence[str]) -> str:
        # Group name left-aligned, figures right-aligned so digits line up.
        parts = [cells[0].ljust(widths[0])]
        parts += [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headings), rule, *(line(r) for r in body), rule, line(foot)])


def _group_label(value: Any, none: str = _NO_GROUP) -> str:
    return none if value is None or value == "" else str(value)


# --- commands -------------------------------------------------------------------


@click.group()
def meter() -> None:
    """Reports over the meter database, and pruning (all safe while the sidecar runs)."""


@meter.command()
@_db_option
@click.option(
    "--by",
    type=click.Choice(list(GROUPS)),
    default="model",
    show_default=True,
    help="Group rows by this (day = UTC calendar day).",
)
@_since_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
)
def summary(db_path: str, by: str, since: int | None, fmt: str) -> None:
    """Requests, tokens, usage sources, errors, latency and cost per group.

    errors counts rows whose outcome is not 'ok'; "no usage" counts rows whose
    usage_source is neither 'reported' nor 'estimated'; p50 ttft is the median
    over rows that have one; cost usd sums the rows the price table priced
    (estimated rows included; '-' when none was). --by key shows a request
    without an API key as '-'.
    """
    conn = open_ro(db_path)
    try:
        groups, total = summarize(conn, by, since)
    finally:
        conn.close()
    if fmt == "json":
        doc = {
            "by": by,
            "since_ms": since,
            "groups": [{by: g["group"], **{f: g[f] for f in FIGURES}} for g in groups],
            "totals": total,
        }
        click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([by, *FIGURES])
        for g in groups:
            w.writerow(["" if g["group"] is None else g["group"], *(_csv(g[f]) for f in FIGURES)])
        click.echo(buf.getvalue(), nl=False)
    elif not groups:
        click.echo("no requests recorded" + ("" if since is None else " in that period"))
    else:
        click.echo(render_table(by, groups, total))


def _csv(value: Any) -> Any:
    return "" if value is None else value


_TAIL_COLUMNS: Final = (
    "id",
    "ts_ms",
    "request_id",
    "key_id",
    "model",
    "upstream",
    "status",
    "outcome",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "usage_source",
    "ttft_ms",
    "duration_ms",
    "bytes_out",
    "cost_usd",
)


def format_tail_line(row: dict[str, Any]) -> str:
    def n(v: Any) -> str:
        return "-" if v is None else str(v)

    def ms(v: Any) -> str:
        return "-" if v is None else f"{v:.0f}ms"

    return " ".join(
        [
            _iso_ms(row["ts_ms"]),
            n(row["request_id"]),
            n(row["status"]),
            n(row["outcome"]),
            _group_label(row["model"]),
            "via " + _group_label(row["upstream"]),
            "key " + n(row["key_id"]),
            "stream" if row["stream"] else "unary",
            f"tok {n(row['prompt_tokens'])}/{n(row['completion_tokens'])}"
            f"/{n(row['total_tokens'])} {n(row['usage_source'])}",
            f"ttft {ms(row['ttft_ms'])}",
            f"dur {ms(row['duration_ms'])}",
            f"out {n(row['bytes_out'])}B",
            "cost " + ("-" if row["cost_usd"] is None else f"${row['cost_usd']:.6f}"),
        ]
    )


@meter.command()
@_db_option
@click.option(
    "-n",
    "--lines",
    type=click.IntRange(min=0),
    default=TAIL_DEFAULT_ROWS,
    show_default=True,
    help="How many of the latest rows to show.",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new rows until Ctrl-C.")
def tail(db_path: str, lines: int, follow: bool) -> None:
    """The latest requests, one compact line each (oldest first)."""
    conn = open_ro(db_path)
    cols = ", ".join(_TAIL_COLUMNS)
    try:
        rows = _query(
            conn, f"SELECT {cols} FROM {TABLE} ORDER BY id DESC LIMIT ?", (lines,)
        ).fetchall()
        for row in reversed(rows):
            click.echo(format_tail_line(dict(zip(_TAIL_COLUMNS, row, strict=True))))
        if not follow:
            return
        # Rows get ids in commit order (one writer at a time holds the lock),
        # so "id > last seen" never skips a row committed later by a worker.
        if rows:
            last_id = int(rows[0][0])
        else:
            last_id = int(_query(conn, f"SELECT COALESCE(MAX(id), 0) FROM {TABLE}").fetchone()[0])
        try:
            while True:
                time.sleep(TAIL_POLL_S)
                cur = _query(
                    conn, f"SELECT {cols} FROM {TABLE} WHERE id > ? ORDER BY id", (last_id,)
                )
                for row in _rows(cur):
                    last_id = int(row[0])
                    click.echo(format_tail_line(dict(zip(_TAIL_COLUMNS, row, strict=True))))
        except KeyboardInterrupt:
            return
    finally:
        conn.close()


@meter.command()
@_db_option
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), required=True)
@_since_option
@click.option(
    "-o", "--output", default="-", help="Write here instead of stdout.", type=click.Path()
)
def export(db_path: str, fmt: str, since: int | None, output: str) -> None:
    """Every column of every row (in id order), values as stored."""
    conn = open_ro(db_path)
    try:
        where, params = _where_since(since)
        cur = _query(conn, f"SELECT * FROM {TABLE} {where} ORDER BY id", params)
        names = [d[0] for d in cur.description]
        with click.open_file(output, "w", encoding="utf-8") as out:
            _write_export(out, fmt, names, _rows(cur))
    finally:
        conn.close()


def _write_export(
    out: IO[str], fmt: str, names: Sequence[str], rows: Iterator[tuple[Any, ...]]
) -> None:
    if fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(names)
        for row in rows:
            w.writerow([_csv(v) for v in row])
    else:
        for row in rows:
            out.write(orjson.dumps(dict(zip(names, row, strict=True))).decode())
            out.write("\n")


# --- top, chart, prune (their logic lives in meter_top, meter_chart, meter_prune) ----


@meter.command()
@_db_option
@click.option("--window", "window", default="60s", show_default=True,
              help="Rates are over requests that started within this long before now.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--top", "top_n", type=click.IntRange(min=1), default=5, show_default=True,
              help="Keys and models listed.")
@click.option("--once", is_flag=True, help="One frame, then exit (same as --iterations 1).")
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Stop after this many frames (default: until Ctrl-C).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="json: one JSON object per frame, one per line.")
def top(db_path: str, window: str, interval: float, top_n: int, once: bool,
        iterations: int | None, fmt: str) -> None:
    """A live view: requests/s, tokens/s, spend/min, errors, top keys and models."""
    from sidecar.meter_top import figures, render, window_cells

    try:
        window_s = parse_duration(window) / 1000
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--window") from None
    if window_s <= 0:
        raise click.BadParameter("must be longer than 0", param_hint="--window")
    frames = 1 if once else iterations
    live = fmt == "table" and frames != 1 and sys.stdout.isatty()
    conn = open_ro(db_path)
    shown = 0
    try:
        while True:
            now_ms = int(time.time() * 1000)
            try:
                cells = window_cells(conn, now_ms - round(window_s * 1000))
            except sqlite3.Error as exc:
                raise click.ClickException(f"meter database query failed: {exc}") from exc
            frame = figures(cells, now_ms, window_s, top_n)
            if fmt == "json":
                click.echo(orjson.dumps(frame.as_dict()).decode())
            else:
                # A terminal is redrawn in place; a pipe gets frames one after another.
                click.echo(("\x1b[H\x1b[2J" if live else "") + render(frame, db_path)
                           + ("" if live or frames == 1 else "\n"))
            shown += 1
            if frames is not None and shown >= frames:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return
    finally:
        conn.close()


@meter.command()
@_db_option
@click.option("--by", type=click.Choice(["day", "hour"]), default="day", show_default=True,
              help="One bar per UTC day or hour.")
@click.option("--metric", type=click.Choice(["tokens", "cost", "requests"]), default="tokens",
              show_default=True)
@_since_option
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="PNG file to write.")
def chart(db_path: str, by: str, metric: str, since: int | None, out: str) -> None:
    """A bar chart of tokens, cost or requests per day or hour (needs the [chart] extra)."""
    from sidecar.meter_chart import ChartUnavailable, draw, series

    conn = open_ro(db_path)
    try:
        points = series(conn, by, metric, since)
    except sqlite3.Error as exc:
        raise click.ClickException(f"meter database query failed: {exc}") from exc
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        conn.close()
    if not points:
        raise click.ClickException("no requests recorded" +
                                   ("" if since is None else " in that period"))
    title = f"{metric} per {by} — {os.path.basename(db_path)}"
    try:
        draw(points, by, metric, out, title)
    except ChartUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    total = sum(v for _, v in points)
    shown = f"${total:,.6f}" if metric == "cost" else f"{total:,.0f}"
    click.echo(f"wrote {out}: {len(points)} {by}s, {metric} total {shown}")


@meter.command()
@_db_option
@click.option("--older-than", "older_than", required=True,
              help="Delete requests that started longer ago than this: 90d, 720h.")
@click.option("--batch-rows", type=click.IntRange(min=1), default=None,
              help="Rows per delete transaction (default: meter_prune.PRUNE_BATCH_ROWS).")
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
def prune(db_path: str, older_than: str, batch_rows: int | None, dry_run: bool) -> None:
    """Delete old rows, safely beside a running sidecar (small batches, WAL)."""
    from sidecar.meter_prune import PRUNE_BATCH_ROWS, count_older
    from sidecar.meter_prune import prune as run_prune

    try:
        cutoff = int(time.time() * 1000) - parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    conn = open_ro(db_path)  # checks it is a meter DB before anything is deleted
    try:
        n = count_older(conn, cutoff)
    finally:
        conn.close()
    when = _iso_ms(cutoff)
    if dry_run or n == 0:
        click.echo(f"{n:,} rows started before {when}" + (" (dry run)" if dry_run else ""))
        return
    try:
        res = run_prune(db_path, cutoff, batch_rows or PRUNE_BATCH_ROWS)
    except sqlite3.Error as exc:
        raise click.ClickException(f"pruning {db_path} failed: {exc}") from exc
    click.echo(f"deleted {res.deleted:,} rows started before {when} in {res.batches} "
               f"batches (longest {res.longest_batch_ms:.1f} ms)")
