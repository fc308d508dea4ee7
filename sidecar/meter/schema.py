"""The meter table's shape: DDL, migrations, column order, the INSERTs that fill it.

Also registers the sqlite3 adapters the row values bind through (see below):
process-wide, at import, because a row's binding cost is paid per request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import operator
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

import aiosqlite

from sidecar.meter.record import MeterRecord, Outcome, UsageSource

log = logging.getLogger("sidecar.meter")  # one logger for all the meter modules

TABLE: Final = "requests"

# MIGRATIONS[i] takes the database from user_version i to i + 1. Append only:
# never edit a released step (databases in the field have already run it) and
# never rename a column (the contract names are used by users' own queries).
# Columns are nullable on purpose: a record with an unexpected None must still
# be stored rather than fail its whole batch.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE IF NOT EXISTS {TABLE} (
            id INTEGER PRIMARY KEY,
            ts_ms INTEGER,
            request_id TEXT,
            key_id TEXT,
            route TEXT,
            upstream TEXT,
            model TEXT,
            status INTEGER,
            stream INTEGER,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            total_tokens INTEGER,
            cache_read_tokens INTEGER,
            cache_write_tokens INTEGER,
            usage_source TEXT,
            usage_approx INTEGER,
            usage_raw TEXT,
            outcome TEXT,
            ttft_ms REAL,
            duration_ms REAL,
            bytes_in INTEGER,
            bytes_out INTEGER,
            cost_usd REAL,
            attempts INTEGER,
            api_format TEXT,
            path TEXT,
            error TEXT
        )""",
        f"CREATE INDEX IF NOT EXISTS {TABLE}_ts ON {TABLE}(ts_ms)",
        # Per-key and per-model reports are always bounded by time as well.
        f"CREATE INDEX IF NOT EXISTS {TABLE}_key_ts ON {TABLE}(key_id, ts_ms)",
        f"CREATE INDEX IF NOT EXISTS {TABLE}_model_ts ON {TABLE}(model, ts_ms)",
    ),
    # 1 -> 2: every report (`sidecar meter ...`) selects by ts_ms or id alone, so the
    # per-key and per-model indexes served no query, and each cost ~10 us of CPU per
    # row written (measured: 49 us a row with both, 26 without; 25-row commits, this box).
    (
        f"DROP INDEX IF EXISTS {TABLE}_key_ts",
        f"DROP INDEX IF EXISTS {TABLE}_model_ts",
    ),
    # Failover: the attempts that failed before the one that served.
    (f"ALTER TABLE {TABLE} ADD COLUMN failed_attempts TEXT",),
    # Routing: the model sent upstream when a route renamed it; the queue tier.
    (f"ALTER TABLE {TABLE} ADD COLUMN upstream_model TEXT",
     f"ALTER TABLE {TABLE} ADD COLUMN tier TEXT"),
    # Estimates that say what they are: body bytes the estimate could not read as text.
    (f"ALTER TABLE {TABLE} ADD COLUMN unread_bytes INTEGER",),
    # Reasoning tokens as reported (a subset of completion_tokens), for reasoning models.
    (f"ALTER TABLE {TABLE} ADD COLUMN reasoning_tokens INTEGER",),
)

COLUMNS: Final[tuple[str, ...]] = tuple(f.name for f in dataclasses.fields(MeterRecord))
# A record's values in column order; attrgetter is the cheapest way to do it.
_record_row: Final[Callable[[MeterRecord], tuple[Any, ...]]] = operator.attrgetter(*COLUMNS)
# sqlite3 binds an exact int, float or str at once, but sends any other value (None,
# bool) through its adaptation protocol, which on Python 3.11 raises and discards an
# AttributeError per value: ~3,000 instructions, ~6 times a row, ~4% of the sidecar's
# instructions per request (`python -m bench instructions`). A registered adapter is
# found first, by one dict lookup; these bind exactly what was bound before (NULL, and
# the bool's int), for every sqlite3 user in the process.
sqlite3.register_adapter(type(None), cast("Callable[[None], None]", {}.get))  # C, returns None
sqlite3.register_adapter(bool, int)
# The enums are str subclasses, adapted the same way: str() gives the plain value.
sqlite3.register_adapter(Outcome, str)
sqlite3.register_adapter(UsageSource, str)
# Rows per INSERT statement. A batch is written as ONE multi-row INSERT (atomic by
# itself, in autocommit), which is one hop to the writer thread and back. The hops
# are what limit the writer when the event loop is saturated: each waits for the
# loop to yield the GIL, up to the 5 ms switch interval. BEGIN + a statement per
# row (executemany) + COMMIT let the queue grow to 11,000 records at ~5,500 req/s
# (15 MB of RSS). One statement also costs ~40% less CPU a row than executemany.
# Statement sizes are 1..SMALL_INSERT_ROWS, then powers of two up to the bound, so
# at most 19 distinct statements are ever prepared and cached by sqlite3 (one per
# batch size had grown the process by ~12 MB); the bound keeps parameter binding
# (which holds the GIL, so the loop waits) near 0.25 ms. 128, not 256: the cached
# 256-row statement alone held ~0.7 MB, and 128 rows a hop still write 25,000
# rows/s if every hop waits the whole switch interval (a worker peaks near 6,000).
ROWS_PER_INSERT: Final = 128
SMALL_INSERT_ROWS: Final = 16


def _statement_rows(n: int) -> int:
    """Rows for one statement out of ``n`` waiting: all of a small batch, else the
    largest power of two <= min(n, ROWS_PER_INSERT)."""
    if n <= SMALL_INSERT_ROWS:
        return n
    size = ROWS_PER_INSERT
    while size > n:
        size //= 2
    return size


@functools.lru_cache(maxsize=32)
def _insert_sql(rows: int) -> str:
    one = "(" + ", ".join("?" * len(COLUMNS)) + ")"
    return f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES " + ", ".join([one] * rows)


def _insert_args(records: Sequence[MeterRecord]) -> list[Any]:
    return list(itertools.chain.from_iterable(map(_record_row, records)))


async def _insert_rows(db: aiosqlite.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert rows (in COLUMNS order) as a few multi-row statements (for replay)."""
    i, n = 0, len(rows)
    while i < n:
        size = _statement_rows(n - i)
        chunk = rows[i : i + size]
        await db.execute(_insert_sql(size), list(itertools.chain.from_iterable(chunk)))
        i += size


def schema_version() -> int:
    """The user_version a database has once this code has migrated it."""
    return len(MIGRATIONS)


async def migrate(db: aiosqlite.Connection) -> int:
    """Bring the schema up to date; safe when several processes race to do it.

    ``BEGIN IMMEDIATE`` takes the write lock before user_version is read, so a
    second process waits (busy_timeout), then sees the new version and does
    nothing. Returns the version found before migrating.
    """
    migrations = MIGRATIONS  # read once: one consistent list for the whole run
    await db.execute("BEGIN IMMEDIATE")
    try:
        cur = await db.execute("PRAGMA user_version")
        row = await cur.fetchone()
        found = int(row[0]) if row is not None else 0
        for version in range(found, len(migrations)):
            for stmt in migrations[version]:
                await db.execute(stmt)
        if found < len(migrations):
            # PRAGMA takes no parameters; the value is our own int.
            await db.execute(f"PRAGMA user_version = {len(migrations)}")
        await db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            await db.execute("ROLLBACK")
        raise
    if found > len(migrations):
        # A newer sidecar migrated this DB. Inserts name their columns and
        # migrations only add, so this version can keep writing.
        log.info("meter db schema v%d is newer than this code's v%d", found, len(migrations))
    elif found < len(migrations):
        log.info("meter db schema migrated v%d -> v%d", found, len(migrations))
    return found
