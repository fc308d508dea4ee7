"""Recording what dead processes had in flight: their orphaned journals become rows.

Runs in the meter writer (at start, and while running when something is left to do),
under the spill replay lock and right after the spill files are replayed, so every row a
dead process wrote or spilled is in the table before we look for it.

Exactly once: an open journal entry is inserted only when no row with its
``(request_id, ts_ms)`` is in the table, looked up inside the same ``BEGIN IMMEDIATE``
that inserts. The journal files are removed after the COMMIT; a crash between the two
leaves files whose entries the next recovery finds already present, so it inserts
nothing again and removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Sequence
from typing import Final

import aiosqlite

from sidecar.meter.journal import Entry, claim_orphans, interrupted_record
from sidecar.meter.record import MeterRecord
from sidecar.meter.schema import TABLE, _insert_rows, _record_row

log = logging.getLogger("sidecar.meter")

# Request ids looked up per SELECT (SQLite's default limit is 32,766 parameters).
LOOKUP_CHUNK: Final = 500

Pricer = Callable[[MeterRecord], "float | None"]


async def _present(db: aiosqlite.Connection, entries: Sequence[Entry]) -> set[tuple[str, int]]:
    """The (request_id, ts_ms) of these entries that already have a row."""
    found: set[tuple[str, int]] = set()
    for i in range(0, len(entries), LOOKUP_CHUNK):
        chunk = entries[i : i + LOOKUP_CHUNK]
        lo = min(e.ts_ms for e in chunk)
        hi = max(e.ts_ms for e in chunk)
        ids = sorted({e.request_id for e in chunk})
        # The ts index bounds the scan; ts_ms of a row is the request's start, as journalled.
        sql = (f"SELECT request_id, ts_ms FROM {TABLE} WHERE ts_ms BETWEEN ? AND ? "
               f"AND request_id IN ({', '.join('?' * len(ids))})")
        cur = await db.execute(sql, [lo, hi, *ids])
        for rid, ts in await cur.fetchall():
            found.add((rid, ts))
    return found


async def recover(db: aiosqlite.Connection, directory: str,
                  price: Pricer | None = None) -> tuple[int, int]:
    """Insert an 'interrupted' row for each request an orphaned journal left open.

    Returns (rows inserted, entries that already had a row). Raises on a database or
    file error, leaving the journals in place for the next try.
    """
    orphans = await asyncio.to_thread(claim_orphans, directory)
    if not orphans.paths:
        return 0, 0
    inserted = already = 0
    try:
        if orphans.bad_lines:
            log.warning("meter journal: %d unreadable lines in %s (a torn write?); skipped",
                        orphans.bad_lines, directory)
        if orphans.entries:
            await db.execute("BEGIN IMMEDIATE")
            try:
                present = await _present(db, orphans.entries)
                seen: set[tuple[str, int]] = set()
                rows = []
                for e in orphans.entries:
                    key = (e.request_id, e.ts_ms)
                    if key in present or key in seen:
                        already += key in present
                        continue
                    seen.add(key)
                    rec = interrupted_record(e)
                    if price is not None:
                        rec.cost_usd = price(rec)
                    rows.append(_record_row(rec))
                if rows:
                    await _insert_rows(db, rows)
                await db.execute("COMMIT")
                inserted = len(rows)
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        await db.execute("ROLLBACK")
                raise
    except BaseException:
        orphans.release(remove=False)
        raise
    orphans.release(remove=True)
    if not inserted and not already:
        return 0, 0
    log.warning("meter journal: %d requests were in flight when their process died; recorded "
                "as interrupted (%d already had a row), from %d journal file(s)",
                inserted, already, len(orphans.paths))
    return inserted, already
