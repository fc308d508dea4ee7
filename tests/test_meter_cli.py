"""`sidecar meter summary|tail|export` against a meter DB filled by the real Meter."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import pathlib
import sqlite3
import time
from typing import Any

import pytest
from click.testing import CliRunner, Result
from test_meter import rec

from sidecar import meter_cli
from sidecar.config import MeterConfig
from sidecar.meter import Meter, MeterRecord
from sidecar.meter_cli import meter

DAY1 = 1_714_521_600_000  # 2024-05-01T00:00:00Z
DAY2 = DAY1 + 86_400_000
HOUR = 3_600_000

# Five requests over two UTC days; the figures asserted below are worked out by hand.
ROWS: tuple[MeterRecord, ...] = (
    rec(
        1,
        ts_ms=DAY1 + HOUR,
        model="gpt-4o",
        key_id="k1",
        upstream="openai",
        prompt_tokens=100,
        completion_tokens=50,
        total_tokens=150,
        ttft_ms=100.0,
        duration_ms=1000.0,
        bytes_out=2000,
        cost_usd=0.00075,
    ),
    rec(
        2,
        ts_ms=DAY1 + 2 * HOUR,
        model="gpt-4o",
        key_id="k2",
        upstream="openai",
        prompt_tokens=200,
        completion_tokens=100,
        total_tokens=300,
        ttft_ms=300.0,
        duration_ms=3000.0,
        bytes_out=4000,
        cost_usd=0.0015,
    ),
    rec(
        3,
        ts_ms=DAY1 + 3 * HOUR,
        model="gpt-4o",
        key_id="k1",
        upstream="openai",
        prompt_tokens=50,
        completion_tokens=10,
        total_tokens=60,
        usage_source="estimated",
        usage_approx=True,
        outcome="client_disconnect",
        error="client went away",
        ttft_ms=200.0,
        duration_ms=500.0,
        bytes_out=100,
        cost_usd=0.000225,  # estimated rows are priced too
    ),
    rec(
        4,
        ts_ms=DAY2 + HOUR,
        model="claude-3-5-sonnet",
        key_id="k2",
        upstream="anthropic",
        route="/v1/messages",
        api_format="anthropic",
        prompt_tokens=10,
        completion_tokens=0,
        total_tokens=10,
        ttft_ms=50.0,
        duration_ms=200.0,
        bytes_out=300,
        cost_usd=0.00003,
    ),
    rec(
        5,
        ts_ms=DAY2 + 2 * HOUR,
        model=None,
        key_id=None,
        upstream="",
        status=400,
        prompt_tokens=None,
        completion_tokens=None,
        total_tokens=None,
        usage_source="none",
        outcome="rejected",
        error="bad json",
        ttft_ms=None,
        duration_ms=1.0,
        bytes_out=150,
        stream=False,
    ),
)

# requests prompt completion total reported estimated none errors p50_ttft avg_dur bytes_out
# cost_usd (the sum of the priced rows; None when no row of the group has a cost)
BY_MODEL = {
    "gpt-4o": [3, 350, 160, 510, 2, 1, 0, 1, 200.0, 1500.0, 6100, 0.002475],
    None: [1, 0, 0, 0, 0, 0, 1, 1, None, 1.0, 150, None],
    "claude-3-5-sonnet": [1, 10, 0, 10, 1, 0, 0, 0, 50.0, 200.0, 300, 0.00003],
}
TOTALS = [5, 360, 160, 520, 3, 1, 1, 2, 150.0, 940.2, 6550, 0.002505]
BY_OUTCOME = {
    "ok": [3, 310, 150, 460, 3, 0, 0, 0, 100.0, 1400.0, 6300, 0.00228],
    "client_disconnect": [1, 50, 10, 60, 0, 1, 0, 1, 200.0, 500.0, 100, 0.000225],
    "rejected": [1, 0, 0, 0, 0, 0, 1, 1, None, 1.0, 150, None],
}
BY_DAY = {
    "2024-05-01": [3, 350, 160, 510, 2, 1, 0, 1, 200.0, 1500.0, 6100, 0.002475],
    "2024-05-02": [2, 10, 0, 10, 1, 0, 1, 1, 50.0, 100.5, 450, 0.00003],
}


def fill(db: str, records: tuple[MeterRecord, ...]) -> None:
    async def main() -> None:
        m = Meter(MeterConfig(db=db))
        await m.start()
        for r in records:
            m.submit(r)
        await m.close()

    asyncio.run(main())


@pytest.fixture
def db(tmp_path: pathlib.Path) -> str:
    path = str(tmp_path / "meter.db")
    fill(path, ROWS)
    return path


def run(*args: str) -> Result:
    return CliRunner().invoke(meter, list(args), catch_exceptions=False)


def figures(d: dict[str, Any]) -> list[Any]:
    return [d[f] for f in meter_cli.FIGURES]


# --- summary ------------------------------------------------------------------


def test_summary_json_by_model_has_exact_figures_and_totals(db: str) -> None:
    res = run("summary", "--db", db, "--format", "json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["by"] == "model"
    # Most requests first; ties by name (a missing model sorts first).
    assert [g["model"] for g in doc["groups"]] == ["gpt-4o", None, "claude-3-5-sonnet"]
    assert {g["model"]: figures(g) for g in doc["groups"]} == BY_MODEL
    assert figures(doc["totals"]) == TOTALS


def test_summary_json_by_outcome_and_by_day(db: str) -> None:
    doc = json.loads(run("summary", "--db", db, "--by", "outcome", "--format", "json").stdout)
    assert [g["outcome"] for g in doc["groups"]] == ["ok", "client_disconnect", "rejected"]
    assert {g["outcome"]: figures(g) for g in doc["groups"]} == BY_OUTCOME
    doc = json.loads(run("summary", "--db", db, "--by", "day", "--format", "json").stdout)
    assert [g["day"] for g in doc["groups"]] == ["2024-05-01", "2024-05-02"]  # chronological
    assert {g["day"]: figures(g) for g in doc["groups"]} == BY_DAY
    assert figures(doc["totals"]) == TOTALS


def test_summary_csv_by_day(db: str) -> None:
    res = run("summary", "--db", db, "--by", "day", "--format", "csv")
    assert res.exit_code == 0, res.output
    rows = list(csv.reader(io.StringIO(res.stdout)))
    assert rows[0] == ["day", *meter_cli.FIGURES]
    assert rows[1:] == [
        ["2024-05-01", "3", "350", "160", "510", "2", "1", "0", "1", "200.0", "1500.0", "6100",
         "0.002475"],
        ["2024-05-02", "2", "10", "0", "10", "1", "0", "1", "1", "50.0", "100.5", "450",
         "3e-05"],
    ]


def test_summary_csv_by_model_writes_a_missing_model_as_empty(db: str) -> None:
    rows = list(csv.reader(io.StringIO(run("summary", "--db", db, "--format", "csv").stdout)))
    assert rows[1][0] == "gpt-4o"
    assert rows[2] == ["", "1", "0", "0", "0", "0", "0", "1", "1", "", "1.0", "150", ""]


def test_summary_table_is_aligned_with_a_totals_line(db: str) -> None:
    res = run("summary", "--db", db)  # defaults: --by model, table
    assert res.exit_code == 0, res.output
    lines = res.stdout.rstrip("\n").split("\n")
    assert lines[0].split()[:3] == ["model", "requests", "prompt"]
    # Every line, rules included, is the same width: figures are right-aligned.
    assert len({len(line) for line in lines}) == 1
    cells = {line.split()[0]: line.split()[1:] for line in lines[2:] if not line.startswith("-")}
    assert cells["gpt-4o"] == [
        "3",
        "350",
        "160",
        "510",
        "2",
        "1",
        "0",
        "1",
        "200.0",
        "1,500.0",
        "6,100",
        "0.002475",
    ]
    assert cells["(none)"] == ["1", "0", "0", "0", "0", "0", "1", "1", "-", "1.0", "150", "-"]
    assert cells["claude-3-5-sonnet"][0] == "1"
    assert lines[-1].split() == [
        "TOTAL",
        "5",
        "360",
        "160",
        "520",
        "3",
        "1",
        "1",
        "2",
        "150.0",
        "940.2",
        "6,550",
        "0.002505",
    ]
    assert lines[-2].startswith("------")


def test_summary_by_key_upstream_and_route_group_on_those_columns(db: str) -> None:
    def requests_by(by: str) -> dict[Any, int]:
        doc = json.loads(run("summary", "--db", db, "--by", by, "--format", "json").stdout)
        return {g[by]: g["requests"] for g in doc["groups"]}

    assert requests_by("key") == {"k1": 2, "k2": 2, None: 1}
    assert requests_by("upstream") == {"openai": 3, "anthropic": 1, "": 1}
    assert requests_by("route") == {"/v1/chat/completions": 4, "/v1/messages": 1}


def test_summary_by_key_shows_cost_per_key_and_no_key_as_a_dash(db: str) -> None:
    doc = json.loads(run("summary", "--db", db, "--by", "key", "--format", "json").stdout)
    # k1: rows 1 and 3; k2: rows 2 and 4; no key: the rejected, unpriced row 5.
    assert {g["key"]: g["cost_usd"] for g in doc["groups"]} == {
        "k1": 0.000975, "k2": 0.00153, None: None}
    lines = run("summary", "--db", db, "--by", "key").stdout.rstrip("\n").split("\n")
    assert lines[0].split()[:2] == ["key", "requests"]
    assert lines[0].rstrip().endswith("cost usd")
    cells = {line.split()[0]: line.split()[1:] for line in lines[2:-2]}
    assert set(cells) == {"k1", "k2", "-"}
    assert cells["k1"][0] == "2" and cells["k1"][-1] == "0.000975"
    assert cells["k2"][-1] == "0.001530"
    assert cells["-"][0] == "1" and cells["-"][-1] == "-"
    assert lines[-1].split()[-1] == "0.002505"


def test_summary_since_counts_only_recent_requests(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "recent.db")
    now = int(time.time() * 1000)
    fill(path, (rec(1, ts_ms=now - 30 * 60_000), rec(2, ts_ms=now - 2 * 86_400_000)))

    def total(since: str) -> int:
        res = run("summary", "--db", path, "--since", since, "--format", "json")
        assert res.exit_code == 0, res.output
        return int(json.loads(res.stdout)["totals"]["requests"])

    assert total("1h") == 1
    assert total("90m") == 1
    assert total("3d") == 2
    assert total("all") == 2
    res = run("summary", "--db", path, "--since", "10m")
    assert res.exit_code == 0
    assert "no requests recorded in that period" in res.stdout


def test_summary_rejects_a_bad_duration(db: str) -> None:
    res = CliRunner().invoke(meter, ["summary", "--db", db, "--since", "3 fortnights"])
    assert res.exit_code == 2
    assert "not a duration like 30m, 24h or 7d" in res.output


def test_parse_duration() -> None:
    assert meter_cli.parse_duration("30m") == 30 * 60_000
    assert meter_cli.parse_duration("24h") == 24 * HOUR
    assert meter_cli.parse_duration("7d") == 7 * 86_400_000
    assert meter_cli.parse_duration("45s") == 45_000
    with pytest.raises(ValueError):
        meter_cli.parse_duration("7")


def test_summary_reads_while_a_writer_holds_the_lock(db: str) -> None:
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("DELETE FROM requests")  # uncommitted: readers still see 5 rows
    try:
        t0 = time.monotonic()
        res = run("summary", "--db", db, "--format", "json")
        assert time.monotonic() - t0 < 2.0
        assert json.loads(res.stdout)["totals"]["requests"] == 5
    finally:
        writer.rollback()
        writer.close()


# --- tail ---------------------------------------------------------------------


def test_tail_prints_the_last_n_rows_oldest_first(db: str) -> None:
    res = run("tail", "--db", db, "-n", "2")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[:5] == [
        "2024-05-02T01:00:00.000Z",
        "req-4",
        "200",
        "ok",
        "claude-3-5-sonnet",
    ]
    assert "tok 10/0/10 reported" in lines[0]
    assert lines[0].endswith(" cost $0.000030")
    assert lines[1].split()[:5] == [
        "2024-05-02T02:00:00.000Z",
        "req-5",
        "400",
        "rejected",
        "(none)",
    ]
    assert "tok -/-/- none" in lines[1]
    assert "ttft -" in lines[1]
    assert lines[1].endswith(" cost -")
    assert len(run("tail", "--db", db).stdout.splitlines()) == 5  # default 20, only 5 exist


def test_tail_follow_prints_new_rows_until_ctrl_c(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    polls = 0

    def fake_sleep(seconds: float) -> None:
        nonlocal polls
        polls += 1
        assert seconds == meter_cli.TAIL_POLL_S
        if polls == 1:
            fill(db, (rec(6, request_id="req-late"),))  # another worker commits a row
        elif polls == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", fake_sleep)  # meter_cli polls with time.sleep
    res = run("tail", "--db", db, "-n", "1", "-f")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["req-5", "req-late"]  # printed once


# --- export -------------------------------------------------------------------


def db_rows(db: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        cur = c.execute("SELECT * FROM requests ORDER BY id")
        return [d[0] for d in cur.description], cur.fetchall()


def test_export_jsonl_round_trips_every_column(db: str) -> None:
    res = run("export", "--db", db, "--format", "jsonl")
    assert res.exit_code == 0, res.output
    names, rows = db_rows(db)
    exported = [json.loads(line) for line in res.stdout.splitlines()]
    assert exported == [dict(zip(names, r, strict=True)) for r in rows]
    assert exported[3]["completion_tokens"] == 0  # zero, not null
    assert exported[4]["prompt_tokens"] is None


def test_export_csv_to_a_file_round_trips(db: str, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out.csv"
    res = run("export", "--db", db, "--format", "csv", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    names, rows = db_rows(db)
    with open(out, newline="", encoding="utf-8") as f:
        got = list(csv.reader(f))
    assert got[0] == names
    assert got[1:] == [["" if v is None else str(v) for v in r] for r in rows]


def test_export_since_filters_rows(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "recent.db")
    now = int(time.time() * 1000)
    fill(path, (rec(1, ts_ms=now - 60_000), rec(2, ts_ms=now - 2 * 86_400_000)))
    res = run("export", "--db", path, "--format", "jsonl", "--since", "24h")
    assert [json.loads(x)["request_id"] for x in res.stdout.splitlines()] == ["req-1"]


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [("summary",), ("tail",), ("tail", "-f"), ("export", "--format", "csv")],
)
def test_a_missing_db_is_a_clear_error_and_is_not_created(
    tmp_path: pathlib.Path, args: tuple[str, ...]
) -> None:
    missing = str(tmp_path / "nope.db")
    res = CliRunner().invoke(meter, [*args, "--db", missing])
    assert res.exit_code == 1
    assert res.output == f"Error: meter database not found: {missing}\n"
    assert not os.path.exists(missing)


def test_a_file_that_is_not_a_meter_db_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE t (x)")
    res = CliRunner().invoke(meter, ["summary", "--db", str(other)])
    assert res.exit_code == 1
    assert "is not a meter database" in res.output
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite at all" * 100)
    res = CliRunner().invoke(meter, ["tail", "--db", str(garbage)])
    assert res.exit_code == 1
    assert "cannot read meter database" in res.output
    assert "Traceback" not in res.output
