"""The spill file: records that could not be queued or written, as JSON lines.

A record that finds the meter's queue full, or a batch the database refuses, is
appended here instead of being dropped; the writer that spilled replays it into the
table once a write succeeds again (and every Meter.start() of a worker sharing the
file replays what is left). See the package docstring for how concurrent appenders
and replayers stay safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import glob
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import IO, Any, Final

import aiosqlite
import orjson

from sidecar.meter.record import MeterRecord
from sidecar.meter.schema import COLUMNS, _insert_rows, _record_row

log = logging.getLogger("sidecar.meter")  # one logger for all the meter modules

# Spill lines read and inserted per step when replaying, so a large spill file
# is never held in memory whole.
REPLAY_CHUNK_ROWS: Final = 5_000
LOCK_SUFFIX: Final = ".lock"  # <spill>.lock: held by the process replaying
CLAIM_SUFFIX: Final = ".replay-"  # <spill>.replay-<pid>-<ns>: a claimed spill file
REJECTED_SUFFIX: Final = ".rejected"  # <spill>.rejected: lines that cannot be replayed

_SQL_SCALARS: Final = (str, int, float, type(None))  # bool is an int


def _encode(records: Iterable[MeterRecord]) -> bytes:
    return b"".join(
        orjson.dumps(dict(zip(COLUMNS, _record_row(r), strict=True))) + b"\n" for r in records
    )


def _decode(line: bytes) -> tuple[Any, ...] | None:
    """One spill line -> a row in COLUMNS order, or None if it is not a record."""
    try:
        obj = orjson.loads(line)
        rec = MeterRecord(**obj)
    except (orjson.JSONDecodeError, TypeError):
        return None
    row = _record_row(rec)
    if not all(isinstance(v, _SQL_SCALARS) for v in row):
        return None
    return row


class _SpillFile:
    """Appends whole lines to the spill file; safe against concurrent replays.

    The descriptor is kept open between appends (overflow means many appends
    in a row), so after taking the lock we check that the path still names our
    file: a replayer renames it away and then takes the same lock once, which
    waits for any append already past that check.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def append(self, data: bytes) -> None:
        while True:
            if self._fd is None:
                self._fd = os.open(
                    self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666
                )
            fd = self._fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if self._is_current(fd):
                    self._write_whole(fd, data)
                    return
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            self.close()  # claimed by a replayer since we opened it: start a new file

    def _is_current(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    @staticmethod
    def _write_whole(fd: int, data: bytes) -> None:
        # os.write may write part of the data (e.g. the disk fills mid-way). A
        # torn line would corrupt the next record appended after it, so cut
        # the file back to where this append started before re-raising.
        start = os.fstat(fd).st_size
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _try_lock(path: str) -> int | None:
    """Non-blocking exclusive flock on ``path``; the fd, or None if held elsewhere."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def _claim_spill_files(spill: str) -> list[str]:
    """Rename the live spill file away and list every claimed file to replay.

    Called with ``<spill>.lock`` held. Claimed files left by a replayer that
    crashed are included (oldest first), the one claimed now last.
    """
    claimed = sorted(glob.glob(glob.escape(spill) + CLAIM_SUFFIX + "*"))
    target = f"{spill}{CLAIM_SUFFIX}{os.getpid()}-{time.time_ns()}"
    try:
        os.rename(spill, target)
    except FileNotFoundError:
        return claimed
    # Wait out an append that passed its path check just before the rename;
    # every later append re-checks, sees the rename and opens a fresh file.
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    claimed.append(target)
    return claimed


def _read_chunk(f: IO[bytes], rows: int) -> tuple[list[tuple[Any, ...]], list[bytes], bool]:
    """Up to ``rows`` decoded rows; also the undecodable lines and whether EOF was hit."""
    good: list[tuple[Any, ...]] = []
    bad: list[bytes] = []
    while len(good) < rows:
        line = f.readline()
        if not line:
            return good, bad, True
        if not line.strip():
            continue
        row = _decode(line)
        if row is None:
            bad.append(line if line.endswith(b"\n") else line + b"\n")
        else:
            good.append(row)
    return good, bad, False


class Spill:
    """One Meter's spill file: appends what the writer cannot take, replays old files.

    Counts what it did for Meter.stats (this process only).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = _SpillFile(path)
        self.spilled = 0  # records appended (overflow, failed batches, late)
        self.replayed = 0  # rows inserted from spill files
        self.lost = 0  # records that could not be appended either (logged)
        self.errors = 0  # failed appends, failed replays
        # This process appended since its last replay: the writer replays again soon.
        self.pending = False

    def close(self) -> None:
        self._file.close()

    def append(self, records: Sequence[MeterRecord], reason: str | None) -> bool:
        """Append records that will not reach the table now; ``reason`` (if any) is logged.
        False when they could not be appended either (counted as lost)."""
        if not records:
            return True
        try:
            self._file.append(_encode(records))
        except (OSError, TypeError, orjson.JSONEncodeError) as exc:
            self.errors += 1
            self.lost += len(records)
            log.critical(
                "meter: LOST %d records: cannot append to spill file %s: %s",
                len(records),
                self.path,
                exc,
            )
            return False
        self.spilled += len(records)
        self.pending = True
        if reason is not None:
            log.warning("meter: spilled %d records to %s (%s)", len(records), self.path, reason)
        return True

    async def replay(self, db: aiosqlite.Connection,
                     then: Callable[[], Awaitable[None]] | None = None) -> bool:
        """Insert spill files left by any worker (earlier runs, or this one while the
        database refused writes), then remove them; then run ``then`` (journal
        recovery), still holding the replay lock. True when all of it was done.

        All claimed files go in one transaction, so a failure leaves them all
        in place (claimed) for the next replay to retry, with nothing doubled.
        A failure here is logged, not raised: the meter can still write.
        """
        lock_path = self.path + LOCK_SUFFIX
        try:
            lock_fd = await asyncio.to_thread(_try_lock, lock_path)
        except OSError as exc:
            self.errors += 1
            log.error("meter: cannot lock %s (%s); spill files not replayed", lock_path, exc)
            return False
        if lock_fd is None:
            log.info("meter: another worker is replaying %s", self.path)
            return False
        # Cleared before the claim: whatever is appended from here on lands in a file
        # this replay may not see, and sets it again.
        self.pending = False
        try:
            paths = await asyncio.to_thread(_claim_spill_files, self.path)
            if paths:
                await self._insert_files(db, paths)
            if then is not None:
                await then()
        except (OSError, sqlite3.Error) as exc:
            self.errors += 1
            self.pending = True
            log.error("meter: replaying %s failed (%s); will retry", self.path, exc)
            return False
        finally:
            os.close(lock_fd)
        return True

    async def _insert_files(self, db: aiosqlite.Connection, paths: Sequence[str]) -> None:
        rows_in = 0
        rejected: list[bytes] = []
        await db.execute("BEGIN IMMEDIATE")
        try:
            for p in paths:
                with open(p, "rb") as f:
                    eof = False
                    while not eof:
                        rows, bad, eof = await asyncio.to_thread(_read_chunk, f, REPLAY_CHUNK_ROWS)
                        rejected.extend(bad)
                        if rows:
                            await _insert_rows(db, rows)
                            rows_in += len(rows)
            if rejected:
                # Kept before COMMIT: if this fails, nothing is committed and
                # the claimed files stay for the next start.
                rejected_path = self.path + REJECTED_SUFFIX
                await asyncio.to_thread(_append_file, rejected_path, b"".join(rejected))
                log.error(
                    "meter: %d spill lines are not records; moved to %s",
                    len(rejected),
                    rejected_path,
                )
            await db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    await db.execute("ROLLBACK")
            raise
        self.replayed += rows_in
        log.info("meter: replayed %d spilled rows from %d file(s)", rows_in, len(paths))
        for p in paths:
            try:
                os.unlink(p)
            except OSError as exc:
                # Committed but still on disk: the next start would insert
                # these rows a second time.
                self.errors += 1
                log.critical(
                    "meter: cannot remove replayed spill file %s (%s); "
                    "remove it by hand or its rows will be counted twice",
                    p,
                    exc,
                )


def _append_file(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)
