"""The shadow report's pure core (sidecar/shadow.py) and its command (sidecar shadow report).

Lines are written the way Nginx writes the shipped ``llm_shadow`` format; the real Nginx
run is tests/test_nginx_e2e.py."""

from __future__ import annotations

import gzip
import pathlib
import sqlite3

import orjson
import pytest
from click.testing import CliRunner

from sidecar import shadow
from sidecar.cli import cli

T0 = 1_796_529_865.0


def line(via: str = "sidecar", status: int = 200, rt: str = "0.120", uht: str = "0.010",
         rid: str = "r1", msec: float = T0, **extra: str) -> str:
    fields = {"msec": f"{msec:.3f}", "request_id": rid, "via": via, "status": str(status),
              "request_time": rt, "upstream_header_time": uht,
              "upstream_response_time": rt, "upstream_addr": "127.0.0.1:8080",
              "upstream_status": str(status), "bytes_sent": "1253",
              "uri": "/v1/chat/completions", **extra}
    return "\t".join(f"{k}={v}" for k, v in fields.items()) + "\n"


# --- parsing ----------------------------------------------------------------------------


def test_a_shipped_format_line_parses_to_its_fields() -> None:
    entry = shadow.parse_line(line(rid="3e1e50e21d823409001b9c46ddcd2544", rt="1.250",
                                   uht="0.031"))
    assert entry == shadow.LogEntry(via="sidecar", request_id="3e1e50e21d823409001b9c46ddcd2544",
                                    status=200, request_time=1.25, header_time=0.031, msec=T0)


@pytest.mark.parametrize(("text", "seconds"), [
    ("0.031", 0.031),
    ("0.002, 0.130", 0.132),  # two upstreams tried, one after the other
    ("0.001 : 0.004", 0.005),  # across an internal redirect
    ("-, 0.100", 0.100),  # the first gave no response head
    ("-", None),  # no upstream answered (or none was asked)
])
def test_upstream_header_time_sums_every_upstream_tried(text: str,
                                                        seconds: float | None) -> None:
    got = shadow.upstream_seconds(text)
    assert got == (None if seconds is None else pytest.approx(seconds))


@pytest.mark.parametrize(("text", "reason"), [
    ('127.0.0.1 - - [06/Dec/2026:04:04:14 +0000] "POST /v1/chat/completions HTTP/1.1" 200 1253',
     "not the llm_shadow log format (no key=value fields)"),
    ("msec=1.0\trequest_id=a\tvia=sidecar\trequest_time=0.1", "no status field"),
    ("request_id=a\tvia=-\tstatus=200\trequest_time=0.1", "via is neither sidecar nor direct"),
    ("request_id=a\tvia=direct\tstatus=2xx\trequest_time=0.1", "status is not a number"),
    ("request_id=a\tvia=direct\tstatus=200\trequest_time=soon", "request_time is not a number"),
    ("request_id=a\tvia=direct\tstatus=200\trequest_time=0.1\tupstream_header_time=x",
     "upstream_header_time is not a number"),
])
def test_unusable_lines_say_why(text: str, reason: str) -> None:
    with pytest.raises(shadow.BadLine) as info:
        shadow.parse_line(text)
    assert str(info.value) == reason


def test_log_counts_each_path_and_each_kind_of_bad_line_without_stopping() -> None:
    log = shadow.ShadowLog()
    lines = [line("direct", rid="d1"), "garbage\n", line("sidecar", rid="s1"), "\n",
             line("sidecar", status=502, rid="s2", uht="-"), "more garbage\n",
             line("direct", status=499, rid="d2"), line("direct", status=429, rid="d3"),
             line("via-nowhere", rid="x")]
    for number, text in enumerate(lines, 1):
        log.add_line(text, f"access.log:{number}")
    assert log.lines == 8  # the blank line is not a call
    assert dict(log.bad) == {"not the llm_shadow log format (no key=value fields)": 2,
                             "via is neither sidecar nor direct": 1}
    assert log.first_bad["not the llm_shadow log format (no key=value fields)"] == "access.log:2"
    direct, side = log.paths["direct"], log.paths["sidecar"]
    assert (direct.requests, direct.errors) == (3, 0)
    assert (direct.client_closed, direct.client_errors) == (1, 1)
    assert (side.requests, side.errors) == (2, 1)
    # Latency samples: successful calls only.
    assert len(direct.total) == 1 and len(side.total) == 1 and side.ttfb == [0.010]
    assert side.request_ids == ["s1", "s2"]
    assert log.first_start == pytest.approx(T0 - 0.120) and log.last_end == T0


# --- figures ----------------------------------------------------------------------------


def test_percentiles_are_nearest_rank_observed_values() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [shadow.percentile(values, q) for q in (50, 90, 95, 99)] == [50.0, 90.0, 95.0, 99.0]
    assert shadow.percentile([7.0], 99) == 7.0
    assert shadow.percentile([], 50) is None
    assert shadow.percentile([1.0, 2.0, 3.0], 50) == 2.0


def test_buckets_are_cumulative_with_le_semantics_and_an_inf_bucket() -> None:
    counts = shadow.cumulative_buckets([0.001, 0.001, 0.003, 0.2, 500.0], (0.001, 0.005, 1.0))
    assert counts == [2, 3, 4, 5]


def test_wilson_upper_bound_of_an_error_rate() -> None:
    assert shadow.wilson_upper(0, 1000) == pytest.approx(0.00383, abs=1e-5)
    assert shadow.wilson_upper(0, 100) == pytest.approx(0.0370, abs=1e-4)
    assert shadow.wilson_upper(5, 1000) == pytest.approx(0.01165, abs=1e-5)
    assert shadow.wilson_upper(0, 0) is None


def test_meter_join_matches_by_request_id_and_counts_what_does_not_match() -> None:
    rows = [shadow.MeterRow("s1", 10, 5, 15, "reported", "ok", 0.001),
            shadow.MeterRow("s2", 20, None, 20, "estimated", "client_disconnect", None),
            shadow.MeterRow("other", 99, 99, 198, "reported", "ok", 1.0)]
    got = shadow.join_meter(["s1", "s2", "s3"], rows)
    assert got == {"rows_matched": 2, "log_lines_without_row": 1, "rows_not_in_log": 1,
                   "prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35,
                   "usage_source": {"estimated": 1, "reported": 1},
                   "outcome": {"client_disconnect": 1, "ok": 1}, "cost_usd": 0.001}
    assert shadow.join_meter([], [])["cost_usd"] is None


# --- verdict ----------------------------------------------------------------------------


def _figures(n: int, errors: int = 0, ms: float = 100.0) -> dict[str, object]:
    stats = shadow.PathStats()
    for i in range(n):
        status = 502 if i < errors else 200
        stats.add(shadow.LogEntry("sidecar", f"r{i}", status, ms / 1000, ms / 2000, None))
    return shadow.path_figures(stats, n)


CRIT = shadow.Criteria(max_error_rate=0.001, tolerance=0.10, tolerance_ms=5.0, min_requests=1000)


def test_verdict_passes_below_the_error_rate_within_the_latency_tolerance() -> None:
    # 1 error in 2,000 = 0.05%; 115 ms <= 100 x 1.1 + 5 ms.
    v = shadow.judge(_figures(40_000), _figures(2000, errors=1, ms=115.0), CRIT)
    assert v["result"] == "pass" and v["reasons"] == []
    assert [c["check"] for c in v["checks"]] == [
        "sidecar error rate", "ttfb p50", "ttfb p95", "total p50", "total p95"]
    total = v["checks"][3]
    assert (total["direct_ms"], total["sidecar_ms"], total["allowed_ms"]) == (100.0, 115.0, 115.0)
    assert all(c["ok"] for c in v["checks"])


def test_verdict_fails_at_exactly_the_error_rate_and_on_a_latency_regression() -> None:
    v = shadow.judge(_figures(40_000), _figures(2000, errors=2), CRIT)  # 0.1% is not < 0.1%
    assert v["result"] == "fail"
    assert v["reasons"] == ["sidecar error rate 0.100% (2 of 2000) is not below 0.100%"]
    v = shadow.judge(_figures(40_000), _figures(2000, ms=116.0), CRIT)
    assert v["result"] == "fail"
    assert v["reasons"] == ["total p50: sidecar 116 ms > allowed 115 ms (direct 100 ms)",
                            "total p95: sidecar 116 ms > allowed 115 ms (direct 100 ms)"]
    # An error seen on a small sample is still a fail, not "insufficient".
    assert shadow.judge(_figures(2000), _figures(50, errors=1), CRIT)["result"] == "fail"


def test_verdict_is_insufficient_on_too_few_calls_or_nothing_to_compare() -> None:
    v = shadow.judge(_figures(2000), _figures(999), CRIT)
    assert v["result"] == "insufficient"
    assert v["reasons"] == ["only 999 sidecar requests; at least 1000 needed for a verdict"]
    v = shadow.judge(_figures(0), _figures(5000), CRIT)  # after the cutover: no direct path
    assert v["result"] == "insufficient"
    assert v["reasons"] == ["no successful direct requests to compare latency with"]


# --- the command ------------------------------------------------------------------------


def _write_log(path: pathlib.Path, direct: int, sidecar: int, sidecar_errors: int = 0) -> None:
    lines = [line("direct", rid=f"d{i}", rt="0.100", uht="0.020", msec=T0 + i)
             for i in range(direct)]
    lines += [line("sidecar", status=502 if i < sidecar_errors else 200, rid=f"s{i}",
                   rt="0.101", uht="0.021", msec=T0 + i) for i in range(sidecar)]
    lines.insert(3, "not a shadow line\n")
    path.write_text("".join(lines))


def _meter_db(path: pathlib.Path, ids: list[str], ts_ms: int) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE requests (id INTEGER PRIMARY KEY, ts_ms INTEGER, request_id TEXT, "
                "prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER, "
                "usage_source TEXT, outcome TEXT, cost_usd REAL)")
    con.executemany("INSERT INTO requests (ts_ms, request_id, prompt_tokens, completion_tokens, "
                    "total_tokens, usage_source, outcome) "
                    "VALUES (?, ?, 7, 3, 10, 'reported', 'ok')",
                    [(ts_ms, rid) for rid in ids])
    # A row from long before the log: outside its time span, not looked at.
    con.execute("INSERT INTO requests (ts_ms, request_id, total_tokens) VALUES (1000, 'old', 5)")
    con.commit()
    con.close()


def test_report_json_gives_the_split_tokens_and_verdict(tmp_path: pathlib.Path) -> None:
    log = tmp_path / "access.log"
    _write_log(log, direct=95, sidecar=5)
    db = tmp_path / "meter.db"
    _meter_db(db, [f"s{i}" for i in range(4)] + ["stranger"], int(T0 * 1000) + 2000)
    res = CliRunner().invoke(cli, ["shadow", "report", "--nginx-log", str(log), "--db", str(db),
                                   "--format", "json", "--min-requests", "5"])
    assert res.exit_code == 0, res.output
    rep = orjson.loads(res.output)
    assert rep["log"]["requests"] == 100 and rep["log"]["bad_lines"] == 1
    assert rep["log"]["bad_reasons"] == {"not the llm_shadow log format (no key=value fields)": {
        "count": 1, "first": f"{log}:4"}}
    assert rep["paths"]["direct"]["requests"] == 95 and rep["paths"]["sidecar"]["requests"] == 5
    assert rep["paths"]["sidecar"]["share"] == 0.05
    assert rep["paths"]["sidecar"]["ttfb_ms"]["p50"] == 21.0
    assert rep["meter"]["rows_matched"] == 4 and rep["meter"]["log_lines_without_row"] == 1
    assert rep["meter"]["rows_not_in_log"] == 1 and rep["meter"]["total_tokens"] == 40
    assert rep["verdict"]["result"] == "pass"


def test_report_table_shows_both_paths_and_a_failing_verdict(tmp_path: pathlib.Path) -> None:
    log = tmp_path / "access.log.gz"
    plain = tmp_path / "plain.log"
    _write_log(plain, direct=90, sidecar=10, sidecar_errors=1)
    log.write_bytes(gzip.compress(plain.read_bytes()))
    res = CliRunner().invoke(cli, ["shadow", "report", "--nginx-log", str(log),
                                   "--max-error-rate", "5%", "--tolerance", "0",
                                   "--tolerance-ms", "0"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "requests                                90            10" in out
    assert "errors (5xx)                             0             1" in out
    assert "tokens metered                           -     (no --db)" in out
    assert "verdict: FAIL" in out
    assert "sidecar error rate 10.000% (1 of 10) is not below 5.000%" in out
    assert "total p50: sidecar 101 ms > allowed 100 ms (direct 100 ms)" in out


def test_report_on_a_missing_log_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    res = CliRunner().invoke(cli, ["shadow", "report", "--nginx-log", str(tmp_path / "nope.log")])
    assert res.exit_code == 1
    assert f"nginx log not found: {tmp_path / 'nope.log'}" in res.output
    res = CliRunner().invoke(cli, ["shadow", "report", "--nginx-log", str(tmp_path),
                                   "--tolerance", "lots"])
    assert res.exit_code == 2 and "'lots' is not a fraction like 0.1% or 0.001" in res.output
