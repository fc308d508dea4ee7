"""`sidecar meter top|chart|prune` and `summary`, each figure checked against SQL (and
Python) written here independently, over a DB filled by the real Meter; prune beside a
real sidecar process that keeps writing rows."""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import random
import sqlite3
import statistics
import sys
import threading
import time
from collections import defaultdict
from typing import Any

import pytest
from click.testing import CliRunner
from e2e_helpers import request_bytes, roundtrip
from test_meter import rec
from test_meter_cli import fill
from test_process_e2e import procs, start_mock, start_sidecar  # noqa: F401  (fixture)

from sidecar import meter_top
from sidecar.meter import MeterRecord
from sidecar.meter_chart import series
from sidecar.meter_cli import GROUPS, meter
from sidecar.meter_prune import prune

DAY = 86_400_000
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4", None)
KEYS = ("key_a", "key_b", "key_c", None)


def varied_rows(now_ms: int, n: int, seed: int = 7) -> tuple[MeterRecord, ...]:
    """n rows over the last 10 days (a quarter in the last minute), every kind of value."""
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        age = rnd.randrange(5_000, 50_000) if i % 4 == 0 else rnd.randrange(120_000, 10 * DAY)
        priced = rnd.random() < 0.8
        has_usage = rnd.random() < 0.9
        p, c = rnd.randrange(1, 3000), rnd.randrange(0, 800)
        rows.append(rec(
            i, ts_ms=now_ms - age, model=rnd.choice(MODELS), key_id=rnd.choice(KEYS),
            upstream=rnd.choice(("openai", "anthropic", "")),
            route=rnd.choice(("/v1/chat/completions", "/v1/messages")),
            prompt_tokens=p if has_usage else None, completion_tokens=c if has_usage else None,
            total_tokens=p + c if has_usage else None,
            usage_source=rnd.choice(("reported", "reported", "estimated", "none")),
            outcome=rnd.choice(("ok", "ok", "ok", "client_disconnect", "upstream_error")),
            ttft_ms=rnd.choice((None, round(rnd.uniform(1, 900), 3))),
            duration_ms=round(rnd.uniform(1, 9000), 3), bytes_out=rnd.randrange(0, 99999),
            cost_usd=round(rnd.uniform(0, 0.01), 9) if priced else None))
    return tuple(rows)


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, int]:
    db = str(tmp_path_factory.mktemp("ops") / "meter.db")
    now_ms = int(time.time() * 1000)
    fill(db, varied_rows(now_ms, 600))
    return db, now_ms


def _sql_rows(db: str, where: str = "1=1", params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return list(con.execute(f"SELECT * FROM requests WHERE {where}", params))
    finally:
        con.close()


def _cli(*args: str) -> Any:
    res = CliRunner().invoke(meter, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


# --- summary: every figure of every grouping against Python over the raw rows ----------


def _expected_figures(rows: list[sqlite3.Row]) -> dict[str, Any]:
    ttfts = sorted(r["ttft_ms"] for r in rows if r["ttft_ms"] is not None)
    costs = [r["cost_usd"] for r in rows if r["cost_usd"] is not None]
    durs = [r["duration_ms"] for r in rows if r["duration_ms"] is not None]
    return {
        "requests": len(rows),
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows),
        "completion_tokens": sum(r["completion_tokens"] or 0 for r in rows),
        "total_tokens": sum(r["total_tokens"] or 0 for r in rows),
        "reported": sum(r["usage_source"] == "reported" for r in rows),
        "estimated": sum(r["usage_source"] == "estimated" for r in rows),
        "none": sum(r["usage_source"] not in ("reported", "estimated") for r in rows),
        "errors": sum(r["outcome"] != "ok" for r in rows),
        "p50_ttft_ms": round(statistics.median(ttfts), 3) if ttfts else None,
        "avg_duration_ms": round(sum(durs) / len(durs), 3) if durs else None,
        "bytes_out": sum(r["bytes_out"] or 0 for r in rows),
        "cost_usd": round(sum(costs), 9) if costs else None,
    }


def _group_of(row: sqlite3.Row, by: str) -> Any:
    if by == "day":
        return dt.datetime.fromtimestamp(row["ts_ms"] / 1000, tz=dt.UTC).strftime("%Y-%m-%d")
    return row[GROUPS[by]]


@pytest.mark.parametrize("by", list(GROUPS))
@pytest.mark.parametrize("since", [None, "3d"])
def test_summary_figures_equal_independent_sums(filled: tuple[str, int], by: str,
                                                since: str | None) -> None:
    db, _ = filled
    args = ["summary", "--db", db, "--by", by, "--format", "json"]
    cutoff = None
    if since is not None:
        args += ["--since", since]
        cutoff = int(time.time() * 1000) - 3 * DAY
    doc = json.loads(_cli(*args).output)
    rows = _sql_rows(db) if cutoff is None else _sql_rows(db, "ts_ms >= ?", (cutoff,))
    assert 100 < len(rows) <= 600
    groups: dict[Any, list[sqlite3.Row]] = defaultdict(list)
    for r in rows:
        groups[_group_of(r, by)].append(r)
    got = {g[by]: {k: v for k, v in g.items() if k != by} for g in doc["groups"]}
    want = {k: _expected_figures(v) for k, v in groups.items()}
    assert got.keys() == want.keys()
    for key in want:
        for name, value in want[key].items():
            assert got[key][name] == pytest.approx(value, abs=1e-9), (key, name)
    for name, value in _expected_figures(rows).items():
        assert doc["totals"][name] == pytest.approx(value, abs=1e-9), name


# --- top -------------------------------------------------------------------------------


def test_top_once_json_equals_sql_over_the_window(filled: tuple[str, int]) -> None:
    db, _ = filled
    frame = json.loads(_cli("top", "--db", db, "--once", "--format", "json",
                            "--window", "60s", "--top", "3").output)
    cutoff = frame["now_ms"] - 60_000
    rows = _sql_rows(db, "ts_ms >= ?", (cutoff,))
    assert len(rows) > 100  # the quarter of the rows made 5-50 s before the fixture ran
    tokens = sum(r["total_tokens"] or 0 for r in rows)
    costs = [r["cost_usd"] for r in rows if r["cost_usd"] is not None]
    assert frame["requests"] == len(rows)
    assert frame["req_per_s"] == pytest.approx(len(rows) / 60)
    assert frame["tokens_per_s"] == pytest.approx(tokens / 60)
    assert frame["spend_per_min"] == pytest.approx(sum(costs))  # a 60 s window: spend/min
    assert frame["errors"] == sum(r["outcome"] != "ok" for r in rows)
    for column, listed, none in (("key_id", "top_keys", "-"), ("model", "top_models", "(none)")):
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in rows:
            counts[r[column] or none][0] += 1
            counts[r[column] or none][1] += r["total_tokens"] or 0
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))[:3]
        assert [(x["name"], x["requests"], x["tokens"]) for x in frame[listed]] == [
            (name, req, tok) for name, (req, tok) in ranked]


def test_top_iterations_refreshes_and_the_table_names_the_figures(
        filled: tuple[str, int]) -> None:
    db, _ = filled
    t0 = time.monotonic()
    out = _cli("top", "--db", db, "--iterations", "3", "--interval", "0.2",
               "--format", "json").output.splitlines()
    assert len(out) == 3 and time.monotonic() - t0 >= 0.4
    stamps = [json.loads(line)["now_ms"] for line in out]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] >= 300
    table = _cli("top", "--db", db, "--once").output
    for label in ("requests/s", "tokens/s", "spend/min", "top keys", "top models"):
        assert label in table


def test_top_figures_pure() -> None:
    cells: list[meter_top.Cell] = [("k1", "m1", 6, 600, 0.06, 1), ("k2", "m1", 3, 30, None, 0),
                                   (None, None, 3, 0, 0.03, 0)]
    f = meter_top.figures(cells, 0, 30.0, top=2)
    assert (f.requests, f.tokens, f.errors) == (12, 630, 1)
    assert (f.req_per_s, f.tokens_per_s) == (0.4, 21.0)
    assert f.spend_per_min == pytest.approx(0.18)
    assert [(x.name, x.requests, x.cost_usd) for x in f.top_keys] == [
        ("k1", 6, 0.06), ("k2", 3, None)]
    assert [(x.name, x.requests) for x in f.top_models] == [("m1", 9), ("(none)", 3)]


# --- chart -------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["day", "hour"])
@pytest.mark.parametrize("metric", ["tokens", "cost", "requests"])
def test_chart_series_equals_sql_per_bucket(filled: tuple[str, int], by: str,
                                            metric: str) -> None:
    db, _ = filled
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        points = series(con, by, metric, None)
    finally:
        con.close()
    fmt = "%Y-%m-%d" if by == "day" else "%Y-%m-%d %H"
    want: dict[str, float] = defaultdict(float)
    for r in _sql_rows(db):
        b = dt.datetime.fromtimestamp(r["ts_ms"] / 1000, tz=dt.UTC).strftime(fmt)
        want[b] += {"tokens": r["total_tokens"] or 0, "cost": r["cost_usd"] or 0.0,
                    "requests": 1}[metric]
    got = {dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime(fmt): v
           for ms, v in points}
    assert {k: v for k, v in got.items() if v} == pytest.approx(
        {k: v for k, v in want.items() if v})
    assert set(want) <= set(got)
    # No holes: one point per bucket from the first to the last.
    step = 86_400_000 if by == "day" else 3_600_000
    assert [b - a for a, b in zip([p[0] for p in points], [p[0] for p in points[1:]],
                                  strict=False)] == [step] * (len(points) - 1)


def test_chart_writes_a_png(filled: tuple[str, int], tmp_path: pathlib.Path) -> None:
    pytest.importorskip("matplotlib", reason="the [chart] extra is not installed")
    db, _ = filled
    out = tmp_path / "tokens.png"
    res = _cli("chart", "--db", db, "--by", "day", "--metric", "tokens", "--out", str(out))
    assert res.output.startswith(f"wrote {out}: ")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 700 and height >= 400
    total = sum(r["total_tokens"] or 0 for r in _sql_rows(db))
    assert f"tokens total {total:,}" in res.output


def test_chart_without_matplotlib_names_the_extra(filled: tuple[str, int],
                                                  tmp_path: pathlib.Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    db, _ = filled
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    res = CliRunner().invoke(meter, ["chart", "--db", db, "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 1
    assert "pip install 'llm-sidecar[chart]'" in res.output
    assert not (tmp_path / "x.png").exists()


# --- prune -------------------------------------------------------------------------------


def test_prune_deletes_exactly_the_old_rows_in_batches(tmp_path: pathlib.Path) -> None:
    db = str(tmp_path / "meter.db")
    now = int(time.time() * 1000)
    old = [rec(i, ts_ms=now - 100 * DAY - i) for i in range(2_345)]
    new = [rec(10_000 + i, ts_ms=now - 89 * DAY + i) for i in range(321)]
    fill(db, (*old, *new))
    dry = _cli("prune", "--db", db, "--older-than", "90d", "--dry-run").output
    assert dry.startswith("2,345 rows started before ") and "(dry run)" in dry
    assert len(_sql_rows(db)) == 2_666
    res = _cli("prune", "--db", db, "--older-than", "90d", "--batch-rows", "500")
    assert res.output.startswith("deleted 2,345 rows started before ")
    assert " in 5 batches " in res.output
    left = _sql_rows(db)
    assert sorted(r["request_id"] for r in left) == sorted(r.request_id for r in new)
    assert _cli("prune", "--db", db, "--older-than", "90d").output.startswith("0 rows")


def test_prune_refuses_what_is_not_a_meter_db(tmp_path: pathlib.Path) -> None:
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    res = CliRunner().invoke(meter, ["prune", "--db", str(other), "--older-than", "1d"])
    assert res.exit_code == 1 and "not a meter database" in res.output
    res = CliRunner().invoke(meter, ["prune", "--db", str(other), "--older-than", "soon"])
    assert res.exit_code == 2 and "--older-than" in res.output


OLD_ROWS = 30_000
PRUNE_BATCH = 500


def test_prune_beside_a_running_sidecar_loses_no_new_row(
        tmp_path: pathlib.Path, procs: list[Any]) -> None:  # noqa: F811
    """A real sidecar process keeps metering requests while prune deletes 30,000 old rows
    in batches of 500: every old row goes, every new row is written (none spilled)."""
    db = str(tmp_path / "meter.db")
    now = int(time.time() * 1000)
    fill(db, tuple(rec(i, ts_ms=now - 200 * DAY + i) for i in range(OLD_ROWS)))
    mock_port = start_mock(procs, tmp_path)
    sidecar, port = start_sidecar(procs, tmp_path, mock_port,
                                  extra="  batch_rows: 4\n  flush_ms: 5\n")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    sent: list[float] = []
    failures: list[int] = []
    stop = threading.Event()

    def client() -> None:
        deadline = time.monotonic() + 60  # bounded whatever happens
        while not stop.is_set() and time.monotonic() < deadline:
            status = roundtrip(port, request_bytes("POST", "/v1/chat/completions", body)).status
            (sent if status == 200 else failures).append(time.time())

    thread = threading.Thread(target=client)
    thread.start()
    try:
        while len(sent) < 20:  # writing before the prune starts
            time.sleep(0.01)
        t0 = time.time()
        result = prune(db, now - 90 * DAY, batch_rows=PRUNE_BATCH)
        t1 = time.time()
        during = sum(t0 <= t <= t1 for t in sent)
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join(70)
    assert sidecar.stop() == 0
    assert failures == []
    assert result.deleted == OLD_ROWS and result.batches == OLD_ROWS // PRUNE_BATCH
    assert during >= 5, "the prune did not overlap the sidecar's writes"
    rows = _sql_rows(db)
    assert all(r["ts_ms"] >= now for r in rows)
    assert len(rows) == len(sent)
    assert not pathlib.Path(db + ".spill.jsonl").exists()
    log = sidecar.log.read_text()
    assert "spilling" not in log and "failed" not in log
