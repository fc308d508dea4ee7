"""The crash journal: its line format (pure), its file (admit, close, compaction, liveness by
flock) and recovery into the meter (exactly once, idempotent, after the spill replay)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Any

import orjson
from e2e_helpers import meter_rows
from test_meter import write_through

from sidecar.config import MeterConfig
from sidecar.context import RequestContext
from sidecar.meter import Meter, MeterRecord
from sidecar.meter.journal import (
    CLOSE_BATCH,
    INTERRUPTED_ERROR,
    Journal,
    admission_line,
    claim_orphans,
    close_lines,
    interrupted_record,
    open_entries,
    owner_of,
    parse,
    prompt_estimate,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
TS = 1_700_000_000_000


def ctx_for(rid: str, ts: int = TS, bytes_in: int = 400, **kw: Any) -> RequestContext:
    fields: dict[str, Any] = dict(
        ts_ms=ts, request_id="", t_received=0.0, route="/v1/chat/completions",
        upstream="mock", model="gpt-4o-mini", key_id="k1", bytes_in=bytes_in, stream=True,
        api_format="openai", path="/v1/chat/completions", tier="free")
    fields.update(kw)
    return RequestContext(**fields)


def line(seq: int, rid: str | None = None, bytes_in: int = 400, **kw: Any) -> bytes:
    return admission_line(seq, ctx_for(rid or f"req-{seq}", TS + seq, bytes_in, **kw),
                          rid or f"req-{seq}")


# --- the pure core -------------------------------------------------------------------------


def test_open_entries_are_the_admitted_ones_never_closed_and_a_torn_line_is_skipped() -> None:
    data = (line(1) + line(2) + line(3) + close_lines([2, 9]) + line(4) + close_lines([1])
            + line(5)[:-20])  # a torn last line: power loss mid-write
    admitted, closed, bad = parse(data)
    assert sorted(admitted) == [1, 2, 3, 4]
    assert closed == {1, 2, 9}
    assert bad == 1
    assert [e.request_id for e in open_entries(admitted, closed)] == ["req-3", "req-4"]


def test_a_line_whose_fields_would_not_bind_as_a_row_is_unreadable_not_recovered() -> None:
    good = orjson.loads(line(1))
    bad_lines = []
    for i, wrong in [(3, ["route"]), (5, {"m": 1}), (7, "400"), (8, "yes"), (11, 3)]:
        fields = list(good)
        fields[i] = wrong
        bad_lines.append(orjson.dumps(fields) + b"\n")
    admitted, _, bad = parse(b"".join(bad_lines) + line(2))
    assert (sorted(admitted), bad) == ([2], 5)


def test_a_journal_line_clips_huge_names_and_estimates_the_prompt_from_the_body_size() -> None:
    admitted, _, bad = parse(line(1, model="m" * 10_000, bytes_in=1001))
    e = admitted[1]
    assert bad == 0
    assert e.model == "m" * 256
    assert interrupted_record(e).prompt_tokens == prompt_estimate(1001) == 251


def test_the_interrupted_row_says_estimated_approximate_and_why() -> None:
    admitted, _, _ = parse(line(7, bytes_in=800, upstream_model="other-model"))
    r = interrupted_record(admitted[7])
    assert (r.outcome, r.usage_source, r.usage_approx) == ("interrupted", "estimated", True)
    assert (r.prompt_tokens, r.completion_tokens, r.total_tokens) == (200, 0, 200)
    assert (r.request_id, r.ts_ms, r.key_id, r.tier) == ("req-7", TS + 7, "k1", "free")
    assert (r.upstream, r.upstream_model, r.stream, r.bytes_in) == ("mock", "other-model",
                                                                    True, 800)
    assert r.status == 0 and r.error == INTERRUPTED_ERROR


def test_owner_of_ties_a_compacted_file_to_its_process() -> None:
    assert owner_of("/x/123-456-0.journal") == owner_of("/x/123-456-3.journal") == "123-456"
    assert owner_of("/x/123-457-0.journal") != "123-456"


# --- the file --------------------------------------------------------------------------------


def admit(j: Journal, rid: str, ts: int = TS) -> int:
    return j.admit(ctx_for(rid, ts, 100), rid)


def test_admit_and_close_are_on_disk_at_once_and_a_clean_shutdown_removes_the_file(
        tmp_path: pathlib.Path) -> None:
    j = Journal(str(tmp_path / "j"), rotate_bytes=1 << 20)
    j.open()
    seqs = [admit(j, f"r{i}") for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    # No flush, no fsync: another reader sees an admission right away (page cache).
    admitted, closed, _ = parse(pathlib.Path(j.path).read_bytes())
    assert len(open_entries(admitted, closed)) == 5
    j.close_seqs([2, 4])
    assert j.open_count == 3
    # Closes wait for a batch of CLOSE_BATCH (recovery looks rows up anyway) ...
    admitted, closed, _ = parse(pathlib.Path(j.path).read_bytes())
    assert closed == set()
    more = [admit(j, f"m{i}") for i in range(CLOSE_BATCH - 2)]
    j.close_seqs(more)
    # ... then go in one write.
    admitted, closed, _ = parse(pathlib.Path(j.path).read_bytes())
    assert closed == {2, 4, *more}
    assert [e.request_id for e in open_entries(admitted, closed)] == ["r0", "r2", "r4"]
    # The line admit wrote is admission_line's (admit inlines it).
    first = pathlib.Path(j.path).read_bytes().split(b"\n", 1)[0] + b"\n"
    assert first == admission_line(1, ctx_for("r0", TS, 100), "r0")
    path = j.path
    j.closed_records([MeterRecord(ts_ms=0, request_id=f"r{i}") for i in range(5)])  # no seq
    assert j.open_count == 3
    j.close_seqs([1, 3, 5, 3])  # a seq closed twice is counted once
    assert j.open_count == 0 and j.closed == 5 + len(more)
    j.shutdown()
    assert not os.path.exists(path)


def test_compaction_keeps_only_open_lines_and_bounds_the_file(tmp_path: pathlib.Path) -> None:
    j = Journal(str(tmp_path / "j"), rotate_bytes=32768)
    j.open()
    keep = [admit(j, f"keep{i}") for i in range(3)]
    line_len = len(j._open[1])
    largest = 0
    for i in range(20_000):
        j.close_seqs([admit(j, f"done{i}")])
        largest = max(largest, os.path.getsize(j.path))
    files = list((tmp_path / "j").glob("*.journal"))
    assert len(files) == 1 and str(files[0]) == j.path
    assert j.compactions > 50
    # Compaction is looked at when closes are written: the file passes rotate_bytes by
    # at most one batch of admissions and their closes.
    assert largest < 32768 + CLOSE_BATCH * (line_len + 8)
    j.write_closes()
    admitted, closed, _ = parse(files[0].read_bytes())
    assert {e.request_id for e in open_entries(admitted, closed)} == {"keep0", "keep1", "keep2"}
    assert keep == [1, 2, 3]


def _dead_journal(directory: pathlib.Path, script: str) -> None:
    """Run ``script`` (with ``j``, an open Journal in ``directory``) in a child that then dies
    without shutting the journal down, as kill -9 would leave it."""
    code = textwrap.dedent(f"""
        import os
        from sidecar.context import RequestContext
        from sidecar.meter.journal import Journal
        j = Journal({str(directory)!r}, rotate_bytes=1 << 20)
        j.open()
        def admit(rid, ts, bytes_in=400):
            ctx = RequestContext(ts_ms=ts, request_id="", t_received=0.0, upstream="mock",
                                 route="/v1/chat/completions", model="gpt-4o-mini",
                                 bytes_in=bytes_in, stream=True, path="/v1/chat/completions")
            return j.admit(ctx, rid)
    """) + textwrap.dedent(script) + "\nos._exit(0)\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=30)


def test_a_live_journal_is_never_claimed_and_a_dead_ones_is(tmp_path: pathlib.Path) -> None:
    d = tmp_path / "j"
    live = Journal(str(d), rotate_bytes=1 << 20)
    live.open()
    admit(live, "live-1")
    _dead_journal(d, "admit('dead-1', 1); admit('dead-2', 2); j.close_seqs([1]); j.write_closes()")
    orphans = claim_orphans(str(d))
    try:
        assert [e.request_id for e in orphans.entries] == ["dead-2"]
        assert len(orphans.paths) == 1 and orphans.paths[0] != live.path
    finally:
        orphans.release(remove=False)
    live.shutdown()


# --- recovery into the meter ------------------------------------------------------------------


def meter_cfg(tmp_path: pathlib.Path) -> MeterConfig:
    return MeterConfig(db=str(tmp_path / "meter.db"), flush_ms=5)


def test_a_dead_processes_open_requests_become_interrupted_rows_exactly_once(
        tmp_path: pathlib.Path) -> None:
    cfg = meter_cfg(tmp_path)
    assert cfg.journal_path is not None
    jdir = pathlib.Path(cfg.journal_path)
    # 'committed' got its row before the crash but its close was never journalled.
    committed = MeterRecord(ts_ms=TS + 2, request_id="committed", outcome="ok",
                            usage_source="reported", prompt_tokens=5, completion_tokens=5)
    write_through(cfg, committed)
    _dead_journal(jdir, f"""
        admit('closed', {TS + 1}); admit('committed', {TS + 2})
        admit('open-a', {TS + 3}, 4000); admit('open-b', {TS + 4})
        j.close_seqs([1]); j.write_closes()
    """)
    saved = {p.name: p.read_bytes() for p in jdir.glob("*.journal")}
    m = write_through(cfg)
    assert m.stats.interrupted == 2
    got = meter_rows(tmp_path / "meter.db")
    assert [r["request_id"] for r in got] == ["committed", "open-a", "open-b"]
    a = got[1]
    assert (a["outcome"], a["usage_source"], a["usage_approx"]) == ("interrupted", "estimated", 1)
    assert (a["prompt_tokens"], a["completion_tokens"], a["ts_ms"]) == (1000, 0, TS + 3)
    assert not list(jdir.glob("*.journal"))

    # A crash after the COMMIT, before the journal was removed: the file comes back.
    for name, data in saved.items():
        (jdir / name).write_bytes(data)
    m = write_through(cfg)
    assert m.stats.interrupted == 0
    assert [r["request_id"] for r in meter_rows(tmp_path / "meter.db")] == [
        "committed", "open-a", "open-b"]
    assert not list(jdir.glob("*.journal"))


def test_a_dead_processes_spilled_row_is_replayed_not_recorded_as_interrupted(
        tmp_path: pathlib.Path) -> None:
    cfg = meter_cfg(tmp_path)
    write_through(cfg)  # the schema
    assert cfg.journal_path is not None
    # It spilled its row (the DB was locked) and died before journalling the close.
    spilled = MeterRecord(ts_ms=TS + 1, request_id="spilled", outcome="ok",
                          usage_source="reported", prompt_tokens=3, completion_tokens=4)
    from sidecar.meter.spill import _encode

    pathlib.Path(cfg.spill_path).write_bytes(_encode([spilled]))
    _dead_journal(pathlib.Path(cfg.journal_path), f"admit('spilled', {TS + 1})")
    m = write_through(cfg)
    assert (m.stats.replayed, m.stats.interrupted) == (1, 0)
    got = meter_rows(tmp_path / "meter.db")
    assert [(r["request_id"], r["outcome"]) for r in got] == [("spilled", "ok")]


def test_the_meter_closes_journalled_rows_once_committed_and_removes_its_file_at_close(
        tmp_path: pathlib.Path) -> None:
    cfg = meter_cfg(tmp_path)
    async def main() -> tuple[list[str], int, int]:
        m = Meter(cfg)
        await m.start()
        j = m.journal
        assert j is not None and j.active
        ctxs = []
        for i in range(10):
            ctx = RequestContext(ts_ms=TS + i, request_id=f"c{i}", t_received=0.0)
            ctx.journal_seq = admit(j, f"c{i}", TS + i)
            ctxs.append(ctx)
        for ctx in ctxs[:6]:
            m.submit(ctx)
        while m.stats.written < 6:
            await asyncio.sleep(0.005)
        j.write_closes()  # what the writer closed, on disk now rather than at CLOSE_BATCH
        admitted, closed, _ = parse(pathlib.Path(j.path).read_bytes())
        still_open = [e.request_id for e in open_entries(admitted, closed)]
        path = j.path
        for ctx in ctxs[6:]:
            m.submit(ctx)
        await m.close()
        return still_open, j.open_count, os.path.exists(path)

    still_open, open_count, exists = asyncio.run(main())
    assert still_open == ["c6", "c7", "c8", "c9"]
    assert (open_count, exists) == (0, False)
    assert len(meter_rows(tmp_path / "meter.db")) == 10


def test_journal_off_and_memory_db_have_no_journal(tmp_path: pathlib.Path) -> None:
    assert MeterConfig(db=":memory:").journal_path is None
    assert MeterConfig(db=str(tmp_path / "m.db"), journal=False).journal_path is None
    assert MeterConfig(db="/x/m.db", journal_dir="/y").journal_path == "/y"
    assert Meter(MeterConfig(db=":memory:")).journal is None
