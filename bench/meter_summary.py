"""``python -m bench meter-summary``: how long ``sidecar meter summary --since 24h`` takes
on a big meter database (10 million rows by default).

The database is made once (kept at ``--db``, reused when it already has the rows) by
the sidecar's own migrations, then filled inside SQLite with a recursive CTE: rows
spread evenly over ``--days`` days ending now, keys, models, upstreams, routes,
outcomes and usage sources from fixed cycles of co-prime length, token counts and
latencies from multiplicative hashes of the row number, so every run builds the
same table; rows carry a provider usage JSON as long as a real one (the row size
decides how many pages a day's rows span). Each query is timed on a fresh
read-only connection (as the CLI opens one); the median of ``--runs`` is
reported, wall and CPU time (the box may be shared). ``--covering-index`` also
times the queries with an index that covers every column they read (made for the
run, dropped after).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any

import aiosqlite

from sidecar.meter import TABLE, migrate
from sidecar.meter_cli import GROUPS, open_ro, summarize

DAY_MS = 86_400_000
DEFAULT_ROWS = 10_000_000
DEFAULT_DAYS = 90
DEFAULT_RUNS = 5
# An index holding every column the summary reads, in ts_ms order, so a period's
# rows are read from it without visiting the table (--covering-index times it). Not in
# the schema: it measured no faster (the rows are in the page cache; the CPU is in
# grouping and sorting), and every row written would pay for it.
COVERING_INDEX = f"{TABLE}_ts_covering"
COVERING_SQL = (
    f"CREATE INDEX {COVERING_INDEX} ON {TABLE}(ts_ms, key_id, model, upstream, route, "
    "outcome, usage_source, prompt_tokens, completion_tokens, total_tokens, ttft_ms, "
    "duration_ms, bytes_out, cost_usd)"
)

MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3-mini", "claude-sonnet-4",
          "claude-3-5-haiku", "llama-3.1-70b")
UPSTREAMS = ("openai", "anthropic", "vllm")
ROUTES = ("/v1/chat/completions", "/v1/messages", "/v1/responses")


def _values(options: tuple[str, ...]) -> str:
    return "CASE x % {n} {whens} END".format(
        n=len(options),
        whens=" ".join(f"WHEN {i} THEN '{v}'" for i, v in enumerate(options)),
    )


async def _create(path: str) -> None:
    async with aiosqlite.connect(path, isolation_level=None) as db:
        await db.execute("PRAGMA journal_mode = WAL")
        await migrate(db)


def build(path: str, rows: int, days: int, now_ms: int) -> None:
    """A meter DB of ``rows`` rows over ``days`` days up to ``now_ms`` (made by the
    sidecar's migrations, so it has exactly the indexes a real one has)."""
    if os.path.exists(path):
        os.unlink(path)
    asyncio.run(_create(path))
    span = days * DAY_MS
    start = now_ms - span
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -262144")
    conn.execute("BEGIN")
    # x: the row number; h: a hash of it for the "random" figures.
    conn.execute(
        f"""
        WITH RECURSIVE c(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM c WHERE x < {rows - 1})
        INSERT INTO {TABLE} (ts_ms, request_id, key_id, route, upstream, model, status,
            stream, prompt_tokens, completion_tokens, total_tokens, usage_source, usage_raw,
            outcome, ttft_ms, duration_ms, bytes_in, bytes_out, cost_usd, attempts,
            api_format, path)
        SELECT ts, printf('%016x%08x', h, x),
               CASE WHEN x % 11 = 0 THEN NULL ELSE 'key_' || (x * 7 % 200) END,
               {_values(ROUTES).replace('x %', '(x / 7) %')},
               {_values(UPSTREAMS).replace('x %', '(x / 3) %')},
               {_values(MODELS)},
               CASE WHEN x % 97 = 0 THEN 502 WHEN x % 89 = 0 THEN 429 ELSE 200 END,
               x % 5 <> 0,
               p, comp, p + comp,
               CASE WHEN x % 53 = 0 THEN 'estimated' WHEN x % 97 = 0 THEN 'none'
                    ELSE 'reported' END,
               -- the provider's usage JSON, as long as OpenAI's (~250 bytes): the row
               -- size decides how many pages a day's rows span
               CASE WHEN x % 53 = 0 OR x % 97 = 0 THEN NULL ELSE printf(
                 '{{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d,'
                 || '"prompt_tokens_details":{{"cached_tokens":0,"audio_tokens":0}},'
                 || '"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0,'
                 || '"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}',
                 p, comp, p + comp) END,
               CASE WHEN x % 97 = 0 THEN 'upstream_error' WHEN x % 89 = 0 THEN 'rate_limited'
                    WHEN x % 61 = 0 THEN 'client_disconnect' ELSE 'ok' END,
               CASE WHEN x % 97 = 0 THEN NULL ELSE 50 + h % 1500 + (h % 7) / 10.0 END,
               200 + h % 30000 + (h % 13) / 10.0,
               300 + p * 4, 400 + comp * 6,
               (p * 2.5 + comp * 10.0) / 1000000.0,
               1, 'openai', '/v1/chat/completions'
        FROM (SELECT x, {start} + x * {span} / {rows} AS ts,
                     (x * 2654435761) % 4294967296 AS h,
                     20 + (x * 40503) % 4000 AS p,
                     1 + (x * 9973) % 900 AS comp
              FROM c)
        """
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("ANALYZE")
    conn.close()


def _time_summary(path: str, by: str, since_ms: int | None,
                  runs: int) -> tuple[float, float, Any]:
    """Median wall and CPU seconds of ``runs`` summaries (SQLite runs in this process,
    so CPU time is the query's own, whatever else the box is doing)."""
    walls, cpus = [], []
    result: Any = None
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        conn = open_ro(path)
        try:
            result = summarize(conn, by, since_ms)
        finally:
            conn.close()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), result


def run(path: str, rows: int, days: int, runs: int, bys: list[str], rebuild: bool,
        covering: bool) -> str:
    now_ms = int(time.time() * 1000)
    have = 0
    if os.path.exists(path) and not rebuild:
        with sqlite3.connect(path) as c:
            have = int(c.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0])
            last = c.execute(f"SELECT MAX(ts_ms) FROM {TABLE}").fetchone()[0]
        if have == rows:
            now_ms = int(last)  # "the last 24 h" of the stored data, whenever it was made
    if have != rows:
        t0 = time.perf_counter()
        build(path, rows, days, now_ms)
        print(f"built {path}: {rows:,} rows in {time.perf_counter() - t0:.0f} s")
    since = now_ms - DAY_MS
    with sqlite3.connect(path) as c:
        day_rows = int(c.execute(f"SELECT COUNT(*) FROM {TABLE} WHERE ts_ms >= ?",
                                 (since,)).fetchone()[0])
        c.execute(f"DROP INDEX IF EXISTS {COVERING_INDEX}")  # left by an interrupted run
    size_mb = os.path.getsize(path) / 1e6
    load = os.getloadavg()[0]
    lines = [
        f"meter DB: {rows:,} rows over {days} days ({size_mb:,.0f} MB), "
        f"{day_rows:,} rows in the last 24 h; median of {runs} runs, fresh connection "
        f"each; load average {load:.1f} on {os.cpu_count()} CPUs",
        "",
        "| query | wall | CPU | groups |" + (" wall, covering index | CPU, covering index |"
                                             if covering else ""),
        "|---|---|---|---|" + ("---|---|" if covering else ""),
    ]
    results = {by: _time_summary(path, by, since, runs) for by in bys}
    with_cover: dict[str, tuple[float, float, Any]] = {}
    if covering:
        c = sqlite3.connect(path)
        try:
            c.execute(COVERING_SQL)
            c.execute("ANALYZE")
            c.commit()
            with_cover = {by: _time_summary(path, by, since, runs) for by in bys}
        finally:
            c.execute(f"DROP INDEX IF EXISTS {COVERING_INDEX}")
            c.execute("ANALYZE")
            c.commit()
            c.close()
    for by in bys:
        wall, cpu, (groups, _total) = results[by]
        line = f"| summary --by {by} --since 24h | {wall:.3f} s | {cpu:.3f} s | {len(groups)} |"
        if by in with_cover:
            line += f" {with_cover[by][0]:.3f} s | {with_cover[by][1]:.3f} s |"
        lines.append(line)
    return "\n".join(lines)


def main(db: Path, rows: int, days: int, runs: int, bys: list[str] | None,
         rebuild: bool, covering: bool = False) -> int:
    bys = bys or list(GROUPS)
    print(run(str(db), rows, days, runs, bys, rebuild, covering))
    return 0
