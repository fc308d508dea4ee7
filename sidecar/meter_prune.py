"""``sidecar meter prune``: delete old rows while the sidecar keeps writing.

The meter DB is in WAL mode, where one writer at a time holds the write lock. The
sidecar's writers must never wait long for it (a batch that waits past the busy
timeout is spilled), so the prune deletes in small batches, each its own short
transaction found through the ``ts_ms`` index, and pauses between them so a
waiting writer gets the lock next. Deleted pages are reused by new rows; the file
does not shrink (``VACUUM`` would lock writers out for the whole copy, so it is not
done here).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from sidecar.meter import BUSY_TIMEOUT_MS, TABLE

# Rows per DELETE transaction: a few milliseconds of lock on this box.
PRUNE_BATCH_ROWS: Final = 2_000
# Pause between batches, so a sidecar writer waiting for the lock takes it first.
PRUNE_PAUSE_S: Final = 0.01


@dataclass(frozen=True, slots=True)
class PruneResult:
    deleted: int
    batches: int
    longest_batch_ms: float  # the longest any batch held the write lock (about)


def count_older(conn: sqlite3.Connection, cutoff_ms: int) -> int:
    return int(conn.execute(f"SELECT COUNT(*) FROM {TABLE} WHERE ts_ms < ?",
                            (cutoff_ms,)).fetchone()[0])


def prune(path: str, cutoff_ms: int, batch_rows: int = PRUNE_BATCH_ROWS,
          pause_s: float = PRUNE_PAUSE_S,
          progress: Callable[[int], None] | None = None) -> PruneResult:
    """Delete the rows with ``ts_ms < cutoff_ms`` from the meter DB at ``path``."""
    if batch_rows < 1:
        raise ValueError("batch_rows must be >= 1")
    # isolation_level=None: each DELETE is its own transaction, committed at once.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        sql = (f"DELETE FROM {TABLE} WHERE id IN (SELECT id FROM {TABLE} "
               "WHERE ts_ms < ? ORDER BY ts_ms LIMIT ?)")
        deleted = batches = 0
        longest = 0.0
        while True:
            t0 = time.perf_counter()
            n = conn.execute(sql, (cutoff_ms, batch_rows)).rowcount
            longest = max(longest, (time.perf_counter() - t0) * 1000)
            if n <= 0:
                break
            deleted += n
            batches += 1
            if progress is not None:
                progress(deleted)
            if n < batch_rows:
                break
            time.sleep(pause_s)
        # Move what the deletes wrote into the main file when no reader needs the old
        # pages; PASSIVE never waits for (or blocks) anyone.
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        conn.close()
    return PruneResult(deleted, batches, longest)
