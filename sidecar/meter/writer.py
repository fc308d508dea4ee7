"""The Meter: the bounded queue the hot path feeds and the task that writes it out.

:meth:`Meter.submit` (once per request) only appends to the queue; one writer
task per process drains it into SQLite in batches, one multi-row INSERT each.
:meth:`Meter.start` opens the database (busy timeout, WAL, page cache), migrates
it, replays old spill files and records what dead processes' journals left open
(journal.py, recovery.py); what cannot be queued or written is handed to the spill
(spill.py), and the writer replays it as soon as the database takes writes again.
The package docstring has the whole design.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiosqlite

from sidecar.config import MeterConfig
from sidecar.errors import SidecarError
from sidecar.meter.journal import Journal, orphan_files_exist
from sidecar.meter.record import MeterRecord
from sidecar.meter.recovery import recover
from sidecar.meter.schema import _insert_args, _insert_sql, _statement_rows, migrate
from sidecar.meter.spill import Spill
from sidecar.metrics.core import Histogram

log = logging.getLogger("sidecar.meter")  # one logger for all the meter modules


@dataclass(frozen=True, slots=True)
class MeterStats:
    """A snapshot of one Meter's counters (this process only)."""

    written: int  # rows committed by the writer task
    spilled: int  # records appended to the spill file (overflow, failed batches, late)
    queued: int  # records waiting in the queue right now
    batches: int  # committed writer batches
    errors: int  # failed batch writes, failed spill appends, failed replays
    overflowed: int = 0  # of `spilled`: the queue was full at submit()
    replayed: int = 0  # rows inserted from spill files (at start() or while running)
    lost: int = 0  # records neither written nor spilled (both failed; logged)
    interrupted: int = 0  # rows recorded from dead processes' journals


class MeterError(SidecarError):
    """The meter database could not be opened, migrated or closed."""

    code = "meter_error"


# --- limits -------------------------------------------------------------------

# How long one statement waits for another worker's write lock before SQLite
# gives up with SQLITE_BUSY (the batch is then spilled, not lost).
# Candidate for MeterConfig.busy_timeout_ms.
BUSY_TIMEOUT_MS: Final = 5_000
# Two processes switching a fresh file to WAL at once: SQLite answers one of them
# SQLITE_BUSY at once, without its busy handler (that would deadlock). start()
# retries the switch this often, for up to BUSY_TIMEOUT_MS.
WAL_RETRY_S: Final = 0.01
# SQLite's page cache for the writer's connection, in KiB. The writer only appends
# (the table and its ts index grow at their right edges), so a small cache costs no
# measurable CPU per row; SQLite's default (2 MiB) was half of what a worker grew by
# under load.
PAGE_CACHE_KIB: Final = 256
# Queue-overflow warnings are rate-limited: at full overload submit() is called
# thousands of times per second and each call would otherwise log a line.
OVERFLOW_LOG_INTERVAL_S: Final = 10.0
# While something is left to replay (this process spilled, or a dead process's journal
# could not be recovered yet), the writer tries again at most this often, idle or not.
REPLAY_RETRY_S: Final = 1.0


async def enable_wal(db: aiosqlite.Connection) -> Any:
    """``PRAGMA journal_mode = WAL``, retried while another process holds the switch
    (see WAL_RETRY_S); returns the row SQLite answers with (the mode now in force)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur = await db.execute("PRAGMA journal_mode = WAL")
            return await cur.fetchone()
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY
            if not busy or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(WAL_RETRY_S)


# --- the meter ----------------------------------------------------------------


class Meter:
    """Bounded queue + one writer task feeding the SQLite meter table."""

    def __init__(self, cfg: MeterConfig) -> None:
        # asyncio.Queue(0) is unbounded: a zero here would turn overload into
        # unbounded memory instead of spilling.
        if cfg.queue_size < 1 or cfg.batch_rows < 1 or cfg.flush_ms < 0:
            raise ValueError(f"meter: queue_size and batch_rows must be >= 1, flush_ms >= 0: {cfg}")
        self._cfg = cfg
        self.spill_path = cfg.spill_path
        # A plain deque bounded by hand: asyncio.Queue's put_nowait is several Python
        # calls per record, and nothing here awaits the queue itself (see _wake).
        self._queue: collections.deque[MeterRecord] = collections.deque()
        self._spill = Spill(self.spill_path)
        # The crash journal (journal.py): opened by start(); None when off.
        self.journal: Journal | None = None
        journal_dir = cfg.journal_path
        self._journal_dir = journal_dir
        if journal_dir is not None:
            self.journal = Journal(journal_dir, cfg.journal_rotate_bytes)
        # Prices an interrupted row (set by the server; None: cost_usd stays null).
        self.price: Callable[[MeterRecord], float | None] | None = None
        self._recovery_pending = journal_dir is not None  # orphans to look for
        self._interrupted = 0
        self._next_replay = 0.0  # monotonic time of the next replay try while running
        self._db: aiosqlite.Connection | None = None
        self._writer: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        # The writer sleeps on _wake; submit() sets it once the queue holds
        # _wake_at records (1 when idle, batch_rows while a batch is gathering).
        self._wake = asyncio.Event()
        self._wake_at = 1
        self._started = False
        self._closing = False  # close() began: drain what is queued, then stop
        self._abandon = False  # close() timed out: stop after the current batch
        self._spill_only = False  # no writer will run again: submit() spills directly
        self._written = 0
        self._batches = 0
        self._errors = 0  # failed batch writes (the spill counts its own)
        self._overflowed = 0
        # Milliseconds per committed batch (sidecar_meter_batch_seconds); the writer's.
        self.batch_ms = Histogram()
        self._last_overflow_log = -OVERFLOW_LOG_INTERVAL_S

    @property
    def stats(self) -> MeterStats:
        spill = self._spill
        return MeterStats(
            written=self._written,
            spilled=spill.spilled,
            queued=len(self._queue),
            batches=self._batches,
            errors=self._errors + spill.errors,
            overflowed=self._overflowed,
            replayed=spill.replayed,
            lost=spill.lost,
            interrupted=self._interrupted,
        )

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Open and migrate the DB, replay any spill file, start the writer."""
        if self._started:
            raise RuntimeError("Meter.start() called twice")
        self._started = True
        path = self._cfg.db
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            # SQLite would only say "unable to open database file".
            raise MeterError(f"cannot open meter db {path!r}: directory {parent!r} does not exist")
        try:
            db = await aiosqlite.connect(path, isolation_level=None)  # we issue BEGIN ourselves
        except sqlite3.Error as exc:
            raise MeterError(f"cannot open meter db {path!r}: {exc}") from exc
        try:
            await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            row = await enable_wal(db)
            if row is None or str(row[0]).lower() != "wal":
                # e.g. a filesystem without shared memory: still works, but
                # readers then block the writer.
                log.warning("meter db %r: journal_mode is %r, not wal", path, row and row[0])
            await db.execute("PRAGMA synchronous = NORMAL")
            # A negative cache_size is in KiB (positive would be pages).
            await db.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
            await migrate(db)
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.Error):
                raise MeterError(f"cannot prepare meter db {path!r}: {exc}") from exc
            raise
        self._db = db
        if self.journal is not None:
            try:
                self.journal.open()
            except OSError as exc:
                # Serving without it is better than not serving: say so loudly.
                log.error("meter journal: cannot create a journal in %s (%s); requests "
                          "in flight will not survive a crash", self._journal_dir, exc)
        await self._replay(db)
        self._writer = asyncio.get_running_loop().create_task(
            self._run(db), name="sidecar-meter-writer"
        )
        self._writer.add_done_callback(self._writer_done)

    def submit(self, rec: MeterRecord) -> None:
        """Queue one record. Never awaits, never touches the database, never raises."""
        if self._spill_only:
            self._spill_closed([rec], "meter is closed")
            return
        queue = self._queue
        if len(queue) >= self._cfg.queue_size:
            self._overflowed += 1
            now = time.monotonic()
            if now - self._last_overflow_log >= OVERFLOW_LOG_INTERVAL_S:
                self._last_overflow_log = now
                log.warning(
                    "meter queue full (%d); spilling to %s (%d overflowed so far)",
                    self._cfg.queue_size,
                    self.spill_path,
                    self._overflowed,
                )
            self._spill_closed([rec], None)
            return
        queue.append(rec)
        if len(queue) >= self._wake_at:
            self._wake.set()

    async def close(self, timeout: float | None = None) -> None:
        """Drain the queue into the DB, commit and close. Idempotent.

        ``timeout`` bounds the drain: whatever is still queued then is spilled
        (after the batch in flight finishes, so nothing is written twice).
        Errors that killed the writer, or closing the DB, are raised here by
        the first call; later calls only wait for the first to finish.
        """
        if self._close_task is not None:
            await asyncio.wait([self._close_task])
            return
        self._close_task = asyncio.get_running_loop().create_task(self._close(timeout))
        # Shielded: a cancelled caller must not abandon the drain half-way.
        await asyncio.shield(self._close_task)

    async def _close(self, timeout: float | None) -> None:
        self._closing = True
        self._wake.set()
        error: BaseException | None = None
        writer = self._writer
        if writer is not None:
            done, _ = await asyncio.wait([writer], timeout=timeout)
            if not done:
                log.warning(
                    "meter: queue not drained within %ss; spilling %d queued records to %s",
                    timeout,
                    len(self._queue),
                    self.spill_path,
                )
                self._abandon = True
                self._wake.set()
                await asyncio.wait([writer])
            if not writer.cancelled():
                error = writer.exception()
        # Records submitted after the writer's last look (or with no writer at
        # all) go to the spill file; from here on submit() spills directly.
        # No await between these two steps, so none can slip in between.
        self._spill_closed(self._drain(len(self._queue)), "meter is closing")
        self._spill_only = True
        self._spill.close()
        if self.journal is not None:
            self.journal.shutdown()
        db, self._db = self._db, None
        if db is not None:
            try:
                await db.close()
            except sqlite3.Error as exc:
                if error is None:
                    error = MeterError(f"closing meter db {self._cfg.db!r}: {exc}")
                    error.__cause__ = exc
        if error is not None:
            raise error

    # -- writer ----------------------------------------------------------------

    async def _run(self, db: aiosqlite.Connection) -> None:
        batch_rows = self._cfg.batch_rows
        flush_s = self._cfg.flush_ms / 1000
        queue = self._queue
        backlog = False
        while not self._abandon:
            if not queue:
                if self._closing:
                    return
                pending = self._spill.pending or self._recovery_pending
                await self._wait(1, REPLAY_RETRY_S if pending else None)
                if pending and not queue and not self._closing:
                    await self._replay_due(db)
                continue
            # First record is here: give the batch until flush_ms to fill (unless
            # the last write left records behind: then they are due already).
            if len(queue) < batch_rows and not backlog:
                await self._wait(batch_rows, flush_s)
            if self._abandon:
                return
            batch = self._drain(_statement_rows(min(len(queue), batch_rows)))
            backlog = bool(queue)
            if await self._write(db, batch) and (self._spill.pending or self._recovery_pending):
                await self._replay_due(db)

    async def _replay_due(self, db: aiosqlite.Connection) -> None:
        """Replay (spill, then journals) when the last try is REPLAY_RETRY_S old."""
        now = time.monotonic()
        if now < self._next_replay:
            return
        self._next_replay = now + REPLAY_RETRY_S
        await self._replay(db)

    async def _replay(self, db: aiosqlite.Connection) -> None:
        """Spill files first, then dead processes' journals, under one replay lock: a
        dead process's spilled rows must be in the table before its journal is read."""
        if self._recovery_pending:
            await self._spill.replay(db, lambda: self._recover(db))
        else:
            await self._spill.replay(db)

    async def _recover(self, db: aiosqlite.Connection) -> None:
        directory = self._journal_dir
        assert directory is not None
        own = self.journal.path if self.journal is not None else ""
        if not await asyncio.to_thread(orphan_files_exist, directory, own):
            self._recovery_pending = False
            return
        try:
            inserted, _ = await recover(db, directory, self.price)
        except (OSError, sqlite3.Error) as exc:
            self._errors += 1
            log.error("meter journal: recovering %s failed (%s); will retry", directory, exc)
            return
        self._interrupted += inserted
        self._recovery_pending = False

    async def _wait(self, threshold: int, timeout: float | None) -> None:
        """Sleep until ``threshold`` records are queued, close(), or ``timeout``."""
        self._wake_at = threshold
        self._wake.clear()
        if len(self._queue) >= threshold or self._closing:
            return
        timer = None
        if timeout is not None:
            timer = asyncio.get_running_loop().call_later(timeout, self._wake.set)
        try:
            await self._wake.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def _drain(self, limit: int) -> list[MeterRecord]:
        queue = self._queue
        return [queue.popleft() for _ in range(min(limit, len(queue)))]

    async def _write(self, db: aiosqlite.Connection, batch: Sequence[MeterRecord]) -> bool:
        """Insert one batch (a size from _statement_rows) as one atomic multi-row
        INSERT; on a DB error spill it instead.

        A cancellation is not caught: it can only land once the statement is queued
        to the writer thread, which will most likely commit it, so spilling the batch
        as well would write it twice.
        """
        sql, args = _insert_sql(len(batch)), _insert_args(batch)
        t0 = time.perf_counter()
        try:
            # One statement in autocommit is its own transaction: all rows or none.
            # Its write lock waits busy_timeout for the other workers' writers.
            await db.execute(sql, args)
        except sqlite3.Error as exc:
            self._errors += 1
            log.error("meter: writing %d rows failed (%s); spilling them", len(batch), exc)
            self._spill_closed(batch, "write failed")
            return False
        self.batch_ms.observe((time.perf_counter() - t0) * 1000)
        self._written += len(batch)
        self._batches += 1
        if self.journal is not None:
            self.journal.closed_records(batch)  # after the commit: a crash before it recovers
        return True

    def _spill_closed(self, records: Sequence[MeterRecord], reason: str | None) -> None:
        """Spill records; once they are in the spill file their journal lines are closed
        (the spill is replayed before any journal is recovered)."""
        if self._spill.append(records, reason) and self.journal is not None:
            self.journal.closed_records(records)

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            # Someone cancelled the writer (e.g. the loop shut down without
            # close()): what is still queued would vanish with the process.
            self._spill_only = True
            self._spill_closed(self._drain(len(self._queue)), "writer cancelled")
            return
        exc = task.exception()
        if exc is None:
            return
        # A bug killed the writer: say so now rather than at close(), and stop
        # queueing records nobody will write.
        log.error("meter writer died; spilling from now on", exc_info=exc)
        self._spill_only = True
        self._spill_closed(self._drain(len(self._queue)), "writer died")
