"""Money spent per API key this day and this month, read from the meter itself.

The meter DB already holds every row's ``cost_usd`` and ``key_id``; every worker of a
host writes the same file. So the ledger reads the rows added since it last looked
(``id > last``: an index walk, never a scan of the month) every ``interval`` seconds,
off the event loop, and keeps two sums per key. The hot path reads one dict. All
workers (and a restarted process) see the same spend; a key can overshoot its
budget only by what it spends inside one look-up interval plus the meter's flush.

Periods are UTC calendar days and months, as ``sidecar meter summary --by day`` has them.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

log = logging.getLogger("sidecar.spend")

# Rows read per look; the rest wait for the next one (a backlog drains over a few).
MAX_ROWS_PER_LOOK: Final = 200_000
DAY_MS: Final = 86_400_000


def period_start_ms(period: str, now_s: float) -> int:
    """Start of the UTC day or month containing ``now_s``, in ms since the epoch."""
    t = time.gmtime(now_s)
    if period == "day":
        return calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) * 1000
    return calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)) * 1000


@dataclass(slots=True)
class _Sums:
    day_start: int = 0
    day: float = 0.0
    month_start: int = 0
    month: float = 0.0

    def add(self, ts_ms: int, cost: float, day_start: int, month_start: int) -> None:
        if self.day_start != day_start:
            self.day_start, self.day = day_start, 0.0
        if self.month_start != month_start:
            self.month_start, self.month = month_start, 0.0
        if ts_ms >= day_start:
            self.day += cost
        if ts_ms >= month_start:
            self.month += cost


@dataclass(slots=True)
class SpendLedger:
    db: str
    interval: float = 1.0
    last_id: int = 0
    sums: dict[str, _Sums] = field(default_factory=dict)
    # Whether any key has a budget now (the keys file can gain one at any time): while
    # none does, the meter is not read at all. Rows written meanwhile are read by the
    # first look after (id > last_id), so no spend is missed.
    wanted: Callable[[], bool] = lambda: True
    _conn: sqlite3.Connection | None = None

    def spent(self, key_id: str, period: str, now_s: float) -> float:
        s = self.sums.get(key_id)
        if s is None:
            return 0.0
        start = period_start_ms(period, now_s)
        if period == "day":
            return s.day if s.day_start == start else 0.0
        return s.month if s.month_start == start else 0.0

    def look(self, now_s: float | None = None) -> int:
        """Read the rows added since the last look (blocking: run it off the loop)."""
        now_s = time.time() if now_s is None else now_s
        month_start = period_start_ms("month", now_s)
        day_start = period_start_ms("day", now_s)
        conn = self._conn
        if conn is None:
            try:
                conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=0.5,
                                       check_same_thread=False)
            except sqlite3.Error:
                return 0  # no meter yet: nothing spent
            self._conn = conn
        if self.last_id == 0:
            # First look: start from the first row of this month (by time), not id 0.
            row = conn.execute("SELECT min(id) FROM requests WHERE ts_ms >= ?",
                               (month_start,)).fetchone()
            self.last_id = (row[0] - 1) if row and row[0] is not None else self._max_id(conn)
        rows = conn.execute(
            "SELECT id, key_id, ts_ms, cost_usd FROM requests WHERE id > ? ORDER BY id "
            "LIMIT ?", (self.last_id, MAX_ROWS_PER_LOOK)).fetchall()
        for _, key_id, ts_ms, cost in rows:
            if key_id is not None and cost:
                s = self.sums.get(key_id)
                if s is None:
                    s = self.sums[key_id] = _Sums()
                s.add(ts_ms, cost, day_start, month_start)
        if rows:
            self.last_id = rows[-1][0]
        return len(rows)

    @staticmethod
    def _max_id(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT max(id) FROM requests").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    async def run(self) -> None:
        """Look every interval until cancelled; a failed look is logged and retried."""
        loop = asyncio.get_running_loop()
        failing = False
        while True:
            try:
                if self.wanted():
                    await loop.run_in_executor(None, self.look)
                if failing:
                    log.info("spend ledger: reading the meter again")
                failing = False
            except sqlite3.Error as exc:
                if not failing:
                    log.warning("spend ledger: cannot read the meter (%s); budgets use "
                                "the last figures until it can", exc)
                failing = True
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
            await asyncio.sleep(self.interval)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
