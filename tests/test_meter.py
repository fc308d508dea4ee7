"""Meter writer against real SQLite files: rows, batching, spill/replay, races."""

from __future__ import annotations

import asyncio
import os
import pathlib
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from sidecar import meter as meter_mod
from sidecar.config import MeterConfig
from sidecar.meter import (
    COLUMNS,
    Meter,
    MeterRecord,
    _claim_spill_files,
    _SpillFile,
    schema_version,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
BASE_TS = 1_700_000_000_000
POLL_S = 0.005  # how often tests look at the DB while waiting for the writer


def rec(i: int, **kw: Any) -> MeterRecord:
    fields: dict[str, Any] = {
        "ts_ms": BASE_TS + i,
        "request_id": f"req-{i}",
        "key_id": None,
        "route": "/v1/chat/completions",
        "upstream": "mock",
        "model": "gpt-4o-mini",
        "status": 200,
        "stream": True,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "cache_read_tokens": None,
        "cache_write_tokens": None,
        "usage_source": "reported",
        "usage_approx": False,
        "usage_raw": None,
        "outcome": "ok",
        "ttft_ms": 12.5,
        "duration_ms": 100.0,
        "bytes_in": 100,
        "bytes_out": 1000,
        "cost_usd": None,
        "attempts": 1,
        "api_format": "openai",
        "path": "/v1/chat/completions",
        "error": None,
    }
    fields.update(kw)
    return MeterRecord(**fields)


def cfg_for(tmp_path: pathlib.Path, **kw: Any) -> MeterConfig:
    return MeterConfig(db=str(tmp_path / "meter.db"), **kw)


def ro(db: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True)


def count(db: str) -> int:
    with ro(db) as c:
        return int(c.execute("SELECT COUNT(*) FROM requests").fetchone()[0])


def request_ids(db: str) -> set[str]:
    with ro(db) as c:
        return {r[0] for r in c.execute("SELECT request_id FROM requests")}


def spill_lines(path: str) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        return [orjson.loads(line) for line in f]


async def wait_until(pred: Callable[[], bool], limit_s: float = 5.0) -> float:
    """Poll ``pred`` (bounded); return the seconds it took to become true."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > limit_s:
            raise AssertionError(f"condition not met within {limit_s}s")
        await asyncio.sleep(POLL_S)
    return time.monotonic() - t0


def write_through(cfg: MeterConfig, *records: MeterRecord) -> Meter:
    """Start a meter on cfg, submit the records, close it (one process lifetime)."""

    async def main() -> Meter:
        m = Meter(cfg)
        await m.start()
        for r in records:
            m.submit(r)
        await m.close()
        return m

    return asyncio.run(main())


def visible_rows(db: str) -> int:
    try:
        return count(db)
    except sqlite3.OperationalError:  # table not there yet
        return 0


# --- writing ------------------------------------------------------------------


def test_thousand_submitted_records_are_exactly_thousand_rows_after_close(
    tmp_path: pathlib.Path,
) -> None:
    cfg = cfg_for(tmp_path)
    m = write_through(cfg, *(rec(i) for i in range(1000)))
    assert count(cfg.db) == 1000
    assert request_ids(cfg.db) == {f"req-{i}" for i in range(1000)}
    s = m.stats
    assert (s.written, s.spilled, s.queued, s.errors, s.lost) == (1000, 0, 0, 0, 0)
    # All 1,000 were queued before the writer ran: written back to back as
    # bounded statements (7 x 128, then 64 + 32 + 8), not row by row.
    assert s.batches == 10
    assert not os.path.exists(m.spill_path)


def test_the_writer_connection_caps_its_page_cache(tmp_path: pathlib.Path) -> None:
    # SQLite's default 2 MiB page cache per connection was half of a worker's growth
    # under load; the writer only appends, so it runs with PAGE_CACHE_KIB.
    cfg = cfg_for(tmp_path)

    async def main() -> int:
        m = Meter(cfg)
        await m.start()
        try:
            assert m._db is not None
            row = await (await m._db.execute("PRAGMA cache_size")).fetchone()
        finally:
            await m.close()
        assert row is not None
        return int(row[0])

    assert asyncio.run(main()) == -meter_mod.PAGE_CACHE_KIB


def test_every_field_round_trips_and_zero_tokens_stay_zero(tmp_path: pathlib.Path) -> None:
    cfg = cfg_for(tmp_path)
    zero = rec(
        1,
        key_id="key_abc",
        prompt_tokens=0,
        completion_tokens=0,
        total_tokens=0,
        cache_read_tokens=0,
        cache_write_tokens=0,
        usage_source="estimated",
        usage_approx=True,
        usage_raw='{"prompt_tokens":0}',
        ttft_ms=0.0,
        cost_usd=0.0,
        stream=False,
    )
    nulls = rec(
        2,
        model=None,
        prompt_tokens=None,
        completion_tokens=None,
        total_tokens=None,
        usage_source="none",
        outcome="client_disconnect",
        ttft_ms=None,
        status=0,
        upstream="",
        error="client went away",
    )

    async def main() -> None:
        m = Meter(cfg)
        await m.start()
        m.submit(zero)
        m.submit(nulls)
        await m.close()

    asyncio.run(main())
    with ro(cfg.db) as c:
        c.row_factory = sqlite3.Row
        rows = c.execute("SELECT * FROM requests ORDER BY id").fetchall()
        types = c.execute(
            "SELECT typeof(prompt_tokens), typeof(completion_tokens), typeof(total_tokens),"
            " typeof(cost_usd), typeof(stream), typeof(usage_approx), typeof(key_id)"
            " FROM requests ORDER BY id"
        ).fetchall()
    assert [r["id"] for r in rows] == [1, 2]
    for row, want in zip(rows, (zero, nulls), strict=True):
        for col in COLUMNS:
            got = row[col]
            expected = getattr(want, col)
            if isinstance(expected, bool):
                expected = int(expected)
            assert got == expected, col
    # None binds NULL and a bool an integer, through the adapters meter.py registers.
    assert tuple(types[0]) == ("integer", "integer", "integer", "real", "integer", "integer",
                               "text")
    assert tuple(types[1]) == ("null", "null", "null", "null", "integer", "integer", "null")


def test_rows_become_visible_within_the_flush_interval_without_close(
    tmp_path: pathlib.Path,
) -> None:
    cfg = cfg_for(tmp_path, flush_ms=50)

    async def main() -> float:
        m = Meter(cfg)
        await m.start()
        for i in range(3):
            m.submit(rec(i))
        took = await wait_until(lambda: visible_rows(cfg.db) == 3, limit_s=2.0)
        # The counter is bumped just after COMMIT returns, so the rows may be seen first.
        await wait_until(lambda: m.stats.batches >= 1, limit_s=2.0)
        assert m.stats.batches == 1
        await m.close()
        return took

    took = asyncio.run(main())
    # flush_ms is 50: rows are committed after ~50 ms, not at close(). The bound
    # leaves room for a loaded CI machine; without the flush timer it would fail
    # (close() is never reached and the batch of 500 never fills).
    assert took < 0.5, took


def test_a_partial_batch_waits_for_flush_ms_and_a_full_one_does_not(
    tmp_path: pathlib.Path,
) -> None:
    slow = cfg_for(tmp_path, flush_ms=1000, batch_rows=5)

    async def main() -> None:
        m = Meter(slow)
        await m.start()
        m.submit(rec(0))
        await asyncio.sleep(0.1)
        assert visible_rows(slow.db) == 0  # still gathering the batch
        await wait_until(lambda: visible_rows(slow.db) == 1, limit_s=2.0)
        # A full batch is written at once, not flush_ms later.
        t0 = time.monotonic()
        for i in range(1, 6):
            m.submit(rec(i))
        await wait_until(lambda: visible_rows(slow.db) == 6, limit_s=2.0)
        assert time.monotonic() - t0 < 0.6
        await m.close()

    asyncio.run(main())


def test_batches_never_exceed_batch_rows(tmp_path: pathlib.Path) -> None:
    cfg = cfg_for(tmp_path, batch_rows=100)

    async def main() -> Meter:
        m = Meter(cfg)
        await m.start()
        for i in range(1050):
            m.submit(rec(i))
        await m.close()
        return m

    m = asyncio.run(main())
    assert count(cfg.db) == 1050
    # No batch over 100 rows: at least 11 of them (statement sizes are bounded too).
    assert m.stats.batches >= 11


# --- overflow, failures, spill and replay -------------------------------------


def test_queue_overflow_is_spilled_and_replayed_on_next_start(tmp_path: pathlib.Path) -> None:
    cfg = cfg_for(tmp_path, queue_size=10)

    async def first_run() -> Meter:
        m = Meter(cfg)  # writer never started: the queue fills at 10
        for i in range(25):
            m.submit(rec(i))
        s = m.stats
        assert (s.queued, s.overflowed, s.spilled) == (10, 15, 15)
        assert [d["request_id"] for d in spill_lines(m.spill_path)] == [
            f"req-{i}" for i in range(10, 25)
        ]
        await m.close()  # no writer: the 10 queued are spilled too
        return m

    m1 = asyncio.run(first_run())
    assert (m1.stats.spilled, m1.stats.queued, m1.stats.lost) == (25, 0, 0)
    assert len(spill_lines(m1.spill_path)) == 25

    async def second_run() -> Meter:
        m = Meter(cfg)
        await m.start()
        await m.close()
        return m

    m2 = asyncio.run(second_run())
    assert m2.stats.replayed == 25
    assert request_ids(cfg.db) == {f"req-{i}" for i in range(25)}
    assert count(cfg.db) == 25
    assert not os.path.exists(m2.spill_path)


def test_overflow_before_start_is_replayed_by_the_same_meter(tmp_path: pathlib.Path) -> None:
    cfg = cfg_for(tmp_path, queue_size=10)

    async def main() -> Meter:
        m = Meter(cfg)
        for i in range(25):
            m.submit(rec(i))
        await m.start()  # replays the 15 spilled, then writes the 10 queued
        await m.close()
        return m

    m = asyncio.run(main())
    assert (m.stats.replayed, m.stats.written, m.stats.overflowed) == (15, 10, 15)
    assert count(cfg.db) == 25
    assert request_ids(cfg.db) == {f"req-{i}" for i in range(25)}


def hold_write_lock(db: str) -> sqlite3.Connection:
    """Another 'worker' that holds the WAL write lock until rolled back."""
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("BEGIN IMMEDIATE")
    return c


def test_a_batch_that_cannot_be_written_is_spilled_not_lost(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(meter_mod.writer, "BUSY_TIMEOUT_MS", 50)
    cfg = cfg_for(tmp_path, flush_ms=10)

    async def main() -> Meter:
        m = Meter(cfg)
        await m.start()
        locker = hold_write_lock(cfg.db)
        for i in range(5):
            m.submit(rec(i))
        await wait_until(lambda: m.stats.errors == 1)
        assert m.stats.spilled == 5
        locker.rollback()
        locker.close()
        for i in range(5, 10):  # the writer keeps going after the failure
            m.submit(rec(i))
        await m.close()
        return m

    m = asyncio.run(main())
    assert (m.stats.written, m.stats.spilled, m.stats.errors, m.stats.lost) == (5, 5, 1, 0)
    # The spilled batch went in as soon as a write succeeded again, not at the next start.
    assert m.stats.replayed == 5
    assert count(cfg.db) == 10
    assert request_ids(cfg.db) == {f"req-{i}" for i in range(10)}
    assert not os.path.exists(m.spill_path)

    async def restart() -> None:
        m2 = Meter(cfg)
        await m2.start()
        await m2.close()

    asyncio.run(restart())  # nothing left to replay: still exactly once
    assert count(cfg.db) == 10
    assert request_ids(cfg.db) == {f"req-{i}" for i in range(10)}


def test_spilled_rows_reach_the_db_once_it_is_writable_again_without_traffic_or_restart(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(meter_mod.writer, "BUSY_TIMEOUT_MS", 50)
    cfg = cfg_for(tmp_path, flush_ms=10)

    async def main() -> tuple[Meter, int, int]:
        m = Meter(cfg)
        await m.start()
        locker = hold_write_lock(cfg.db)
        for i in range(20):
            m.submit(rec(i))
        await wait_until(lambda: m.stats.spilled == 20)
        in_db_while_locked = visible_rows(cfg.db)
        locker.rollback()
        locker.close()
        # No new record is submitted: the idle writer retries the replay by itself.
        await wait_until(lambda: visible_rows(cfg.db) == 20, limit_s=10.0)
        await asyncio.sleep(2 * meter_mod.writer.REPLAY_RETRY_S)  # a later retry adds nothing
        rows_later = count(cfg.db)
        await m.close()
        return m, in_db_while_locked, rows_later

    m, in_db_while_locked, rows_later = asyncio.run(main())
    assert in_db_while_locked == 0
    assert rows_later == 20
    assert (m.stats.spilled, m.stats.replayed, m.stats.written, m.stats.lost) == (20, 20, 0, 0)
    with ro(cfg.db) as c:
        dupes = c.execute("SELECT request_id FROM requests GROUP BY request_id "
                          "HAVING COUNT(*) > 1").fetchall()
    assert dupes == []
    assert request_ids(cfg.db) == {f"req-{i}" for i in range(20)}
    assert not os.path.exists(m.spill_path)


def test_close_timeout_spills_what_is_still_queued(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(meter_mod.writer, "BUSY_TIMEOUT_MS", 300)
    cfg = cfg_for(tmp_path, batch_rows=5, flush_ms=1)

    async def main() -> Meter:
        m = Meter(cfg)
        await m.start()
        locker = hold_write_lock(cfg.db)  # the first batch waits busy_timeout
        for i in range(20):
            m.submit(rec(i))
        t0 = time.monotonic()
        await m.close(timeout=0.05)
        # close() waited for the batch in flight (busy_timeout), not the whole queue.
        assert time.monotonic() - t0 < 2.0
        locker.rollback()
        locker.close()
        return m

    m = asyncio.run(main())
    s = m.stats
    assert (s.written, s.spilled, s.queued, s.lost) == (0, 20, 0, 0)
    assert sorted(d["request_id"] for d in spill_lines(m.spill_path)) == sorted(
        f"req-{i}" for i in range(20)
    )


def test_close_is_idempotent_and_later_submits_are_spilled(tmp_path: pathlib.Path) -> None:
    cfg = cfg_for(tmp_path)

    async def main() -> Meter:
        m = Meter(cfg)
        await m.start()
        m.submit(rec(0))
        await asyncio.gather(m.close(), m.close())
        await m.close()
        m.submit(rec(1))
        return m

    m = asyncio.run(main())
    assert count(cfg.db) == 1
    assert (m.stats.written, m.stats.spilled) == (1, 1)
    assert [d["request_id"] for d in spill_lines(m.spill_path)] == ["req-1"]


def test_replay_keeps_unreadable_lines_aside(tmp_path: pathlib.Path) -> None:
    cfg = cfg_for(tmp_path)
    spill = cfg.spill_path
    good = [
        orjson.dumps(dict(zip(COLUMNS, meter_mod._record_row(rec(i)), strict=True)))
        for i in range(2)
    ]
    with open(spill, "wb") as f:
        f.write(good[0] + b"\n")
        f.write(b"not json\n")
        f.write(b'{"request_id": "only-one-field"}\n')
        f.write(good[1] + b"\n")
        f.write(good[1][:20])  # torn last line of a crashed writer

    async def main() -> Meter:
        m = Meter(cfg)
        await m.start()
        await m.close()
        return m

    m = asyncio.run(main())
    assert m.stats.replayed == 2
    assert request_ids(cfg.db) == {"req-0", "req-1"}
    assert not os.path.exists(spill)
    rejected = pathlib.Path(spill + meter_mod.REJECTED_SUFFIX).read_bytes()
    assert rejected.count(b"\n") == 3


def test_spill_append_after_a_replay_claim_starts_a_new_file(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "x.spill.jsonl")
    sf = _SpillFile(path)
    sf.append(b"first\n")
    claimed = _claim_spill_files(path)  # another worker claims it; sf's fd is stale
    sf.append(b"second\n")
    sf.close()
    assert len(claimed) == 1
    with open(claimed[0], "rb") as f:
        assert f.read() == b"first\n"
    with open(path, "rb") as f:
        assert f.read() == b"second\n"


def test_a_claimed_file_left_by_a_crashed_replay_is_replayed(tmp_path: pathlib.Path) -> None:
    cfg = cfg_for(tmp_path)
    orphan = cfg.spill_path + meter_mod.CLAIM_SUFFIX + "999-1"
    with open(orphan, "wb") as f:
        f.write(meter_mod._encode([rec(7)]))

    async def main() -> None:
        m = Meter(cfg)
        await m.start()
        await m.close()

    asyncio.run(main())
    assert request_ids(cfg.db) == {"req-7"}
    assert not os.path.exists(orphan)


# --- several workers ----------------------------------------------------------


def integrity(db: str) -> str:
    with ro(db) as c:
        return str(c.execute("PRAGMA integrity_check").fetchone()[0])


def test_two_meters_on_one_db_write_concurrently_without_loss(tmp_path: pathlib.Path) -> None:
    # Small batches and a short flush make the two writers contend for the lock.
    cfg = cfg_for(tmp_path, batch_rows=20, flush_ms=2)
    per_meter = 2000

    async def main() -> tuple[Meter, Meter]:
        a, b = Meter(cfg), Meter(cfg)
        await asyncio.gather(a.start(), b.start())  # both race to create the schema
        for i in range(per_meter):
            a.submit(rec(i, request_id=f"a-{i}"))
            b.submit(rec(i, request_id=f"b-{i}"))
            if i % 100 == 0:
                await asyncio.sleep(0.001)
        await asyncio.gather(a.close(), b.close())
        return a, b

    a, b = asyncio.run(main())
    assert count(cfg.db) == 2 * per_meter
    assert request_ids(cfg.db) == {f"{w}-{i}" for w in "ab" for i in range(per_meter)}
    assert a.stats.errors == b.stats.errors == 0
    assert a.stats.written == b.stats.written == per_meter
    assert integrity(cfg.db) == "ok"


WORKER = textwrap.dedent(
    """
    import asyncio, sys, time
    sys.path.insert(0, sys.argv[1])
    from sidecar.config import MeterConfig
    from sidecar.meter import Meter
    from tests.test_meter import rec

    async def main() -> None:
        db, name, n, go = sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
        m = Meter(MeterConfig(db=db, batch_rows=25, flush_ms=2))
        time.sleep(max(0.0, go - time.time()))  # all workers open the fresh DB at once
        await m.start()
        for i in range(n):
            m.submit(rec(i, request_id=f"{name}-{i}"))
            if i % 50 == 0:
                await asyncio.sleep(0)
        await m.close()
        s = m.stats
        print(s.written, s.spilled, s.errors)

    asyncio.run(main())
    """
)


def test_worker_processes_racing_on_a_fresh_db_lose_nothing(tmp_path: pathlib.Path) -> None:
    db = str(tmp_path / "meter.db")
    workers, per_worker = 4, 500
    go = time.time() + 1.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(REPO), db, f"w{w}", str(per_worker), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(workers)
    ]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.split() == [str(per_worker), "0", "0"], (out, err)
    assert count(db) == workers * per_worker
    assert integrity(db) == "ok"
    with ro(db) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == schema_version()
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# --- schema -------------------------------------------------------------------


def table_columns(db: str) -> list[str]:
    with ro(db) as c:
        return [r[1] for r in c.execute("PRAGMA table_info(requests)")]


def user_version(db: str) -> int:
    with ro(db) as c:
        return int(c.execute("PRAGMA user_version").fetchone()[0])


def test_schema_has_every_record_field_and_the_contract_columns(tmp_path: pathlib.Path) -> None:
    cfg = cfg_for(tmp_path)

    write_through(cfg)
    cols = table_columns(cfg.db)
    contract = (
        "ts_ms request_id key_id route upstream model status stream prompt_tokens"
        " completion_tokens total_tokens usage_source outcome ttft_ms duration_ms"
        " bytes_out cost_usd"
    ).split()
    assert cols[0] == "id"
    assert set(contract) <= set(cols)
    assert set(COLUMNS) <= set(cols)
    assert user_version(cfg.db) == schema_version()
    with ro(cfg.db) as c:
        indexed = {
            r[0]
            for r in c.execute(
                "SELECT il.name FROM pragma_index_list('requests') AS l,"
                " pragma_index_info(l.name) AS il"
            )
        }
    # Reports select by time (or id): one index, since each one costs every write.
    assert indexed == {"ts_ms"}


def test_migration_from_an_older_user_version_keeps_rows(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = cfg_for(tmp_path)

    write_through(cfg, rec(1), rec(2))
    current = schema_version()
    assert user_version(cfg.db) == current
    # A later release appends a step; this DB is one version behind it.
    monkeypatch.setattr(
        meter_mod.schema,
        "MIGRATIONS",
        (*meter_mod.MIGRATIONS, ("ALTER TABLE requests ADD COLUMN region TEXT",)),
    )
    write_through(cfg, rec(3))
    assert user_version(cfg.db) == current + 1
    assert "region" in table_columns(cfg.db)
    assert request_ids(cfg.db) == {"req-1", "req-2", "req-3"}
    # Running again does not re-apply the step (ALTER would fail on a duplicate column).
    write_through(cfg, rec(4))
    assert count(cfg.db) == 4


def test_a_version_1_db_loses_the_unused_indexes_and_keeps_its_rows(
    tmp_path: pathlib.Path,
) -> None:
    cfg = cfg_for(tmp_path)
    with sqlite3.connect(cfg.db) as c:  # what the first release left on disk
        for stmt in meter_mod.MIGRATIONS[0]:
            c.execute(stmt)
        c.execute("INSERT INTO requests (request_id, ts_ms) VALUES ('old', 1)")
        c.execute("PRAGMA user_version = 1")
        names = {r[0] for r in c.execute("SELECT name FROM pragma_index_list('requests')")}
        assert {"requests_key_ts", "requests_model_ts"} <= names

    write_through(cfg, rec(1))
    assert user_version(cfg.db) == schema_version()
    with ro(cfg.db) as c:
        names = {r[0] for r in c.execute("SELECT name FROM pragma_index_list('requests')")}
    assert names == {"requests_ts"}
    assert request_ids(cfg.db) == {"old", "req-1"}


def test_a_db_at_user_version_zero_gets_the_schema(tmp_path: pathlib.Path) -> None:
    cfg = cfg_for(tmp_path)
    with sqlite3.connect(cfg.db) as c:
        c.execute("CREATE TABLE unrelated (x)")

    write_through(cfg, rec(1))
    assert user_version(cfg.db) == schema_version()
    assert count(cfg.db) == 1


def test_a_db_migrated_by_a_newer_release_is_still_written(tmp_path: pathlib.Path) -> None:
    cfg = cfg_for(tmp_path)

    write_through(cfg, rec(1))
    with sqlite3.connect(cfg.db) as c:
        c.execute("ALTER TABLE requests ADD COLUMN region TEXT DEFAULT 'eu'")
        c.execute("PRAGMA user_version = 99")
    write_through(cfg, rec(2))
    assert user_version(cfg.db) == 99
    assert count(cfg.db) == 2


def test_an_unopenable_db_path_raises_meter_error(tmp_path: pathlib.Path) -> None:
    cfg = MeterConfig(db=str(tmp_path / "no-such-dir" / "meter.db"))

    async def main() -> None:
        await Meter(cfg).start()

    with pytest.raises(meter_mod.MeterError, match="no-such-dir"):
        asyncio.run(main())


def test_a_cancelled_writer_spills_what_is_queued(tmp_path: pathlib.Path) -> None:
    cfg = cfg_for(tmp_path, flush_ms=60_000)  # the batch would wait a minute

    async def main() -> Meter:
        m = Meter(cfg)
        await m.start()
        for i in range(7):
            m.submit(rec(i))
        await asyncio.sleep(0.01)
        assert m._writer is not None
        m._writer.cancel()  # e.g. the loop shutting down without close()
        await asyncio.sleep(0)
        await m.close()
        m.submit(rec(7))
        return m

    m = asyncio.run(main())
    assert (m.stats.written, m.stats.spilled, m.stats.lost) == (0, 8, 0)
    assert len(spill_lines(m.spill_path)) == 8


def test_a_zero_queue_size_is_refused_not_unbounded(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="queue_size"):
        Meter(cfg_for(tmp_path, queue_size=0))


def test_wal_switch_is_retried_while_another_process_holds_it() -> None:
    # SQLite answers a racing journal_mode switch with SQLITE_BUSY at once (no busy
    # handler); a real race is rare, so a connection that loses it twice stands in.
    class Racing:
        def __init__(self, losses: int) -> None:
            self.losses = losses
            self.calls = 0

        async def execute(self, sql: str) -> Any:
            assert sql == "PRAGMA journal_mode = WAL"
            self.calls += 1
            if self.losses:
                self.losses -= 1
                err = sqlite3.OperationalError("database is locked")
                err.sqlite_errorcode = sqlite3.SQLITE_BUSY  # type: ignore[attr-defined]
                raise err

            class Cur:
                async def fetchone(self) -> tuple[str]:
                    return ("wal",)

            return Cur()

    racing = Racing(losses=2)
    assert asyncio.run(meter_mod.enable_wal(racing)) == ("wal",)  # type: ignore[arg-type]
    assert racing.calls == 3

    class Broken(Racing):
        async def execute(self, sql: str) -> Any:
            raise sqlite3.OperationalError("disk I/O error")  # not BUSY: not retried

    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        asyncio.run(meter_mod.enable_wal(Broken(0)))  # type: ignore[arg-type]


def test_outcome_and_usage_source_enums_are_stored_and_spilled_as_plain_strings(
        tmp_path: pathlib.Path) -> None:
    from sidecar.meter import Outcome, UsageSource
    from sidecar.meter.schema import _record_row

    cfg = cfg_for(tmp_path)
    r = rec(1, outcome=Outcome.CLIENT_DISCONNECT, usage_source=UsageSource.ESTIMATED,
            failed_attempts='[{"upstream":"a","reason":"429"}]')
    # What sqlite3 is handed after adaptation: exact str, via the registered adapters.
    adapted = [sqlite3.adapters.get((type(v), sqlite3.PrepareProtocol), lambda x: x)(v)
               for v in _record_row(r)]
    assert type(adapted[_col("outcome")]) is str and type(adapted[_col("usage_source")]) is str

    async def main() -> None:
        m = Meter(cfg)
        await m.start()
        m.submit(r)
        await m.close()

    asyncio.run(main())
    with ro(cfg.db) as c:
        row = c.execute("SELECT outcome, usage_source, typeof(outcome), failed_attempts "
                        "FROM requests").fetchone()
    assert row == ("client_disconnect", "estimated", "text",
                   '[{"upstream":"a","reason":"429"}]')
    line = meter_mod._encode([r])
    assert b'"outcome":"client_disconnect"' in line and b'"usage_source":"estimated"' in line


def _col(name: str) -> int:
    return meter_mod.COLUMNS.index(name)
